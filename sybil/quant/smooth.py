"""SmoothQuant, folded into the layer norms before int8 activations are used."""

from __future__ import annotations

import torch

SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength (the paper's default for OPT/BLOOM)


@torch.no_grad()
def smooth(model, tokens: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> None:
    """SmoothQuant (Xiao et al. 2023), folded into the layer norms: for each input channel
    j of c_attn and c_fc, s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) from the activations
    of `tokens`; ln weight and bias are divided by s, the weight's column j multiplied by
    it. The float function is unchanged; an outlier channel's size moves into the weights,
    where a per-output-channel scale absorbs it, so the activation blocks keep their
    resolution."""
    pairs = [(b.ln_1, b.attn.c_attn) for b in model.h] + [(b.ln_2, b.mlp.c_fc) for b in model.h]
    amax: dict[int, torch.Tensor] = {}
    hooks = [ln.register_forward_hook(lambda m, i, o, j=j: amax.__setitem__(j, o.detach().abs().flatten(0, -2).amax(0)))
             for j, (ln, _) in enumerate(pairs)]
    c = model.config
    tokens = tokens[:, : c.n_positions] % c.vocab_size  # a test model's smaller vocabulary or context
    try:
        model(tokens.to(model.device), vocab=0)  # the layer norms are all it needs: no head
    finally:
        for h in hooks:
            h.remove()
    for j, (ln, lin) in enumerate(pairs):
        ax = amax[j].float().clamp(min=1e-5)
        aw = lin.weight.detach().float().abs().amax(0).clamp(min=1e-5)  # per input channel
        s = (ax.pow(alpha) / aw.pow(1 - alpha)).clamp(min=1e-5).to(lin.weight.dtype)
        ln.weight.div_(s)
        ln.bias.div_(s)
        lin.weight.mul_(s)
