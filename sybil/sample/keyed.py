"""Position-keyed sampling (the Gumbel-max rule): a sampled token at absolute position p
is argmax(log probs + g_p), g_p drawn from (seed, p) alone, so any model scored with
the same noise at the same position chooses by the same rule. This is what makes a
seeded sample the same tokens with any draft, window or batch (sybil.sample.accept)."""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """A generator seed determined by (seed, position) alone: splitmix64 of both, so
    neighbouring seeds and positions get unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> shift)) * mul) & _MASK64
    return (z ^ (z >> 31)) >> 1  # torch takes seeds below 2**63


def position_noise(seed: int, position: int, vocab: int) -> torch.Tensor:
    """Gumbel noise [vocab] (float64) for one absolute position of one sequence."""
    g = torch.Generator().manual_seed(position_seed(seed, position))
    u = torch.rand(vocab, generator=g, dtype=torch.float64).clamp_(min=1e-300)
    return -torch.log(-torch.log(u))


def keyed_token(probs: torch.Tensor, seed: int, position: int) -> int:
    """argmax(log probs + Gumbel noise of this position): a draw from probs [V] (the
    Gumbel-max trick) that depends on the seed, the position and probs only, so any
    model scored with the same noise at the same position proposes by the same rule."""
    scores = probs.double().log() + position_noise(seed, position, probs.shape[-1]).to(probs.device)
    return int(scores.argmax())
