"""Accepting drafted tokens so that the output keeps the target's distribution.

Sampling in the engine uses the position-keyed rule (accept_keyed): the target's
token at absolute position p is argmax(log p_target + g_p), with Gumbel noise g_p
drawn from (seed, p) alone, which is a draw from p_target; the draft proposes
argmax(log q + g_p) with the same noise, and a draft is kept iff it equals the
target's choice. The output is then a function of the seed and the target's logits
only: the same tokens with any draft, any K and in any batch (drafter-invariant
speculative decoding, Daliri, Musco and Suresh 2024). It replaced the rejection rule
of Leviathan et al. and Chen et al. (2023), whose draws depend on how many drafts were
proposed and rejected before a position; bench.rules measures what it costs in
acceptance (docs/exactness.md).
Greedy is the limit of both, written without noise so it is exact and cheap.
"""

from __future__ import annotations

import torch

from sybil.sample.keyed import keyed_token
from sybil.sample.params import SamplingParams, probs_from_logits


def accept_greedy(draft: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """(number of draft tokens accepted, the target's token after them).

    target_logits [k+1, V]: row i is the target's prediction after draft[:i].
    """
    best = target_logits.argmax(-1).tolist()
    n = 0
    while n < len(draft) and draft[n] == best[n]:
        n += 1
    return n, best[n]


def accept_keyed(
    draft: list[int], target_logits: torch.Tensor, params: SamplingParams, seed: int, first_position: int
) -> tuple[int, int]:
    """(number accepted, next token) by the position-keyed rule: target_logits[i]
    (already adjusted) chooses the token at absolute position first_position + i.
    Positions after the first mismatch are never drawn."""
    p = probs_from_logits(target_logits, params)  # [k+1, V]
    for i in range(len(draft) + 1):
        tok = keyed_token(p[i], seed, first_position + i)
        if i == len(draft) or draft[i] != tok:
            return i, tok
    raise AssertionError("unreachable")
