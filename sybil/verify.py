"""Accepting drafted tokens so that the output keeps the target's distribution.

Sampling uses the rule of Leviathan et al. and Chen et al. (2023): draft token x
drawn from q is kept with probability min(1, p(x) / q(x)); on the first rejection
the replacement is drawn from normalize(max(p - q, 0)); if every draft token is
kept, a bonus token is drawn from the target's next distribution. Each emitted
token is then distributed exactly as p. Greedy is the same rule with one-hot p
and q, written without random draws so it is exact and cheap.
"""

from __future__ import annotations

import torch

from sybil.sampling import SamplingParams, probs_from_logits, sample


def accept_greedy(draft: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """(number of draft tokens accepted, the target's token after them).

    target_logits [k+1, V]: row i is the target's prediction after draft[:i].
    """
    best = target_logits.argmax(-1).tolist()
    n = 0
    while n < len(draft) and draft[n] == best[n]:
        n += 1
    return n, best[n]


def accept_sampled(
    draft: list[int],
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """(number accepted, next token) by the speculative rejection rule.

    draft_probs [k, V] is the distribution each draft token was actually sampled
    from, after the same temperature/top-k/top-p transform as the target's; None
    means a deterministic drafter (q is one-hot at the drafted token).
    """
    p = probs_from_logits(target_logits, params)  # [k+1, V]
    for i, x in enumerate(draft):
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        u = float(torch.rand((), generator=generator))
        if u * q_x < float(p[i, x]):  # u < p/q without dividing by a tiny q
            continue
        if draft_probs is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - draft_probs[i]).clamp_min(0.0)
        total = float(residual.sum())
        # A rejection implies p(x) < q(x), so p has excess mass elsewhere; the
        # fallback to p only guards against that mass rounding to zero.
        residual = residual / total if total > 0 else p[i]
        return i, int(sample(residual, generator))
    return len(draft), int(sample(p[len(draft)], generator))
