"""Prompt lookup (`--draft ngram`): drafts copied from the row's own earlier tokens."""

from __future__ import annotations

from sybil.sample.params import SamplingParams
from sybil.spec.drafter import Drafter, Proposal


class NgramDrafter(Drafter):
    """Prompt lookup: find the latest earlier occurrence of the last n tokens and
    propose what followed it. No model; proposals are deterministic."""

    cost_prior = 0.0  # a lookup in the committed tokens: next to a forward, free

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, seqs: list[list[int]], ks: list[int], seeds: list[int | None] | None = None,
                params: list[SamplingParams] | None = None) -> list[Proposal]:
        return [self.lookup(s, k) for s, k in zip(seqs, ks)]

    def lookup(self, committed: list[int], k: int) -> Proposal:
        if k <= 0:
            return Proposal([])
        n_tok = len(committed)
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            tail = committed[n_tok - n :]
            for start in range(n_tok - n - 1, -1, -1):
                if committed[start : start + n] == tail:
                    follow = committed[start + n : start + n + k]
                    return Proposal(follow)
        return Proposal([])
