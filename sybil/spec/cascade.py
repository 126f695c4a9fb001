"""Several drafters in order of preference (`--draft suffix+MODEL`)."""

from __future__ import annotations

from sybil.sample.params import SamplingParams
from sybil.spec.drafter import Drafter, Proposal


class Cascade(Drafter):
    """Drafters in order of preference, each row taking the first proposal that is not
    empty: a free lookup (suffix, n-gram) in front of a model, which then drafts only
    the rows the lookup could not (it catches up on the others when it next drafts them)."""

    def __init__(self, drafters: list[Drafter]) -> None:
        self.drafters = drafters
        self.cost_prior = max(d.cost_prior for d in drafters)

    def propose(self, seqs: list[list[int]], ks: list[int], seeds: list[int | None],
                params: list[SamplingParams] | None = None) -> list[Proposal]:
        out = [Proposal([]) for _ in seqs]
        left = list(ks)
        for d in self.drafters:
            if not any(left):
                break
            for b, p in enumerate(d.propose(seqs, left, seeds, params)):
                if p.tokens and left[b]:
                    out[b], left[b] = p, 0
        return out

    def rewind(self, n_valid: list[int]) -> None:
        for d in self.drafters:
            d.rewind(n_valid)

    def begin(self, slot: int, source: int, keep: int) -> None:
        for d in self.drafters:
            d.begin(slot, source, keep)

    def retire(self, slot: int, tokens: list[int]) -> None:
        for d in self.drafters:
            d.retire(slot, tokens)

    def lag(self, seqs: list[list[int]]) -> list[int] | None:
        """The largest lag of any drafter's state, per row."""
        lags = [lag for d in self.drafters if (lag := d.lag(seqs)) is not None]
        return [max(col) for col in zip(*lags)] if lags else None

    def catchup(self) -> tuple[int, float]:
        parts = [d.catchup() for d in self.drafters]
        return sum(n for n, _ in parts), sum(s for _, s in parts)

    def set_chunk(self, chunk: int | None) -> None:
        for d in self.drafters:
            d.set_chunk(chunk)

    def set_min_confidence(self, confidence: float) -> None:
        for d in self.drafters:
            d.set_min_confidence(confidence)

    def prefault(self) -> None:
        for d in self.drafters:
            d.prefault()

    def capture_s(self) -> float:
        return sum(d.capture_s() for d in self.drafters)
