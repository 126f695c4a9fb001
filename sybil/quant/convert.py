"""Quantizing a model in place: every linear and the tied head become one format."""

from __future__ import annotations

import torch

from sybil.quant.formats import MODES, check_width
from sybil.quant.linears import Int4Linear, Int8Linear, Int8WOLinear, QuantEmbedding
from sybil.quant.smooth import smooth

LINEARS = {"int8": Int8Linear, "int4": Int4Linear, "int8wo": Int8WOLinear}
HEADS = {"int8": Int8Linear, "int4": Int8Linear, "int8wo": Int8WOLinear}


@torch.no_grad()
def quantize_model(model, mode: str, calibration: torch.Tensor | None = None):
    """Make every linear of a sybil.model.GPT and its tied head `mode`, in place,
    dropping each float weight as soon as its quantized copy exists (gpt2-xl in
    float32 is 6 GB). For int8 and int4, SmoothQuant is folded in first from the
    activations of `calibration` token ids [1, T] (sybil.weights.loader.quantize passes
    the built-in text; None skips it, as bench.accuracy's comparison does)."""
    if mode not in MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; use one of {', '.join(MODES)}")
    if model.quantized:
        if model.quantized != mode:
            raise ValueError(f"the model is already {model.quantized}")
        return model
    if mode != "int8wo":
        check_width(model.config.n_embd, mode)
        if calibration is not None:  # int8 activations: outlier channels into the weights first
            smooth(model, calibration)
    lin = LINEARS[mode]
    for block in model.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj")):
            old = getattr(parent, name)
            setattr(parent, name, lin.from_weight(old.weight, old.bias))
    dtype = model.dtype
    model.lm_head = HEADS[mode].from_weight(model.wte.weight, None)
    model.wte = QuantEmbedding(model.lm_head, dtype)
    model.quant_mode = mode
    return model
