"""One configuration to one engine: the CLIs, the server and the benchmarks all go
through here, so a flag means the same thing everywhere.

An EngineConfig names what the engine runs (the target, its precision and device, the
draft, the window, the server's slots and prefill); `load` resolves it (device, dtype,
threads) and loads the models. `build` loads one model: checkpoints by default, random
weights in the real shapes for the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from sybil.errors import SybilError
from sybil.model.gpt import GPT
from sybil.ops import native
from sybil.weights.loader import (
    check_quantize,
    load_model,
    resolve_device,
    resolve_draft_quantize,
    resolve_dtype,
)

Draft = GPT | str | list | None  # what generate() and the Scheduler take as draft
Build = Callable[[str, torch.dtype, torch.device, str | None], GPT]  # (name, dtype, device, quantize) -> model


def load_checkpoint_model(name: str, dtype: torch.dtype, device: torch.device, quantize: str | None) -> GPT:
    """The default Build: a preset (downloaded once) or a checkpoint path."""
    return load_model(name, dtype, device, quantize=quantize)


@dataclass(frozen=True)
class EngineConfig:
    """Everything that decides which engine runs, as the command lines' flags name it."""

    model: str = "gpt2-medium"  # preset or checkpoint path
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    device: str = "auto"  # auto, cpu, cuda
    quantize: str = "none"  # none, int8, int4, int8wo (sybil.quant)
    draft: str | None = None  # preset or path, "ngram", "suffix", "suffix+MODEL", or None
    draft_quantize: str = "auto"  # auto (int4 on the CPU) or a quantize value
    draft_vocab: int | None = None  # the draft's head covers ids below this and <|endoftext|>
    k: int | str = "auto"  # the draft window: a number or auto
    threads: int | None = None  # CPU threads for the kernels (None: SYBIL_THREADS, else the cores)
    max_batch: int = 8  # the server's slots
    max_queue: int = 64  # requests waiting beyond those
    prefill_chunk: int | str | None = "auto"  # prompt tokens per round beside decoding rows (None: whole)
    prompt_cache: bool = True  # reuse cache entries of a prefix a slot holds


@dataclass
class Loaded:
    """A configuration resolved: the models and what was chosen for 'auto'."""

    config: EngineConfig
    model: GPT
    draft: Draft
    dtype: torch.dtype
    device: torch.device
    dtype_reason: str  # why dtype "auto" chose what it did

    def describe(self, name: str | None = None) -> str:
        """One line for logs: the model (as `name` if given), its precision and the draft."""
        c = self.config
        what = f"{name or c.model} ({str(self.dtype).removeprefix('torch.')} on {self.device}"
        what += f", {self.model.quantized} weights" if self.model.quantized else ""
        return what + (f", draft {c.draft} k={c.k})" if c.draft else ")")


def load(config: EngineConfig, build: Build = load_checkpoint_model) -> Loaded:
    """Resolve the device, dtype and threads, then load the target and its draft."""
    if config.threads is not None:
        native.set_threads(config.threads)
    device = resolve_device(config.device)
    dtype, why = resolve_dtype(config.dtype, device)
    model = build(config.model, dtype, device, check_quantize(config.quantize, device))
    draft = load_draft(config, model, build)
    return Loaded(config, model, draft, dtype, device, why)


def load_draft(config: EngineConfig, target: GPT, build: Build = load_checkpoint_model) -> Draft:
    """The draft: None, "ngram", "suffix", or a model in the target's dtype and device, with
    draft_quantize resolved ("auto": int4 on the CPU, or int8wo for a width int4 cannot
    hold); the target itself when it names the same checkpoint at the same precision (one
    copy, two roles). "suffix+MODEL" is ["suffix", that model]."""
    draft = config.draft
    if draft in (None, "ngram", "suffix"):
        return draft
    if draft.startswith("suffix+"):
        return ["suffix", load_draft(replace(config, draft=draft.removeprefix("suffix+")), target, build)]
    device = target.device
    draft_q = resolve_draft_quantize(config.draft_quantize, device)
    if draft == config.model and draft_q == check_quantize(config.quantize, device):
        return target
    try:
        return build(draft, target.dtype, device, draft_q)
    except SybilError as e:
        if config.draft_quantize != "auto" or "divisible" not in str(e):
            raise
        return build(draft, target.dtype, device, "int8wo")
