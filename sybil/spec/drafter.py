"""The drafter interface: every method the engine calls on a drafter, in one class.

Drafters propose tokens; they never decide what is kept (that is sybil.sample.accept).
A drafter sees each row's committed tokens, proposes up to k more, and is told after
verification how many of the tokens it saw and proposed still stand. The defaults here
are those of a drafter that runs no model and keeps no per-row state (a lookup); a model
drafter overrides the cache-keeping methods (sybil.spec.model_drafter).
"""

from __future__ import annotations

from dataclasses import dataclass

from sybil.sample.params import SamplingParams


@dataclass
class Proposal:
    """Drafted tokens. Every proposal is deterministic given the row's seed: a sampled
    row drafts by its position-keyed noise, as the target chooses (sybil.sample.accept)."""

    tokens: list[int]


class Drafter:
    """Base class of every drafter. Subclasses implement propose; the rest have defaults."""

    cost_prior: float = 1.0  # a draft step in target steps, before one is measured (the controllers' prior)

    def propose(self, seqs: list[list[int]], ks: list[int], seeds: list[int | None],
                params: list[SamplingParams] | None = None) -> list[Proposal]:
        """Up to ks[b] draft tokens after each row's committed tokens seqs[b], chosen with
        row b's sampling parameters params[b] (sampled rows: by the Gumbel noise of each
        position from seeds[b], as the target chooses)."""
        raise NotImplementedError

    def rewind(self, n_valid: list[int]) -> None:
        """Only the first n_valid[b] tokens of what row b last saw and proposed still stand."""

    def begin(self, slot: int, source: int, keep: int) -> None:
        """Slot starts a new sequence whose first `keep` tokens are those of slot source's
        sequence (source == slot: its own earlier one; keep may be 0)."""

    def retire(self, slot: int, tokens: list[int]) -> None:
        """The sequence the slot held ended with these tokens (a lookup may keep them)."""

    def lag(self, seqs: list[list[int]]) -> list[int] | None:
        """Tokens each row's draft state lacks of its committed sequence: what drafting it
        next must first feed. None: nothing to catch up on (no model)."""
        return None

    def catchup(self) -> tuple[int, float]:
        """(tokens, seconds) of the catch-up forwards the last proposal ran."""
        return 0, 0.0

    def set_chunk(self, chunk: int | None) -> None:
        """Catch up at most chunk tokens per proposal (the server's chunked prefill)."""

    def set_min_confidence(self, confidence: float) -> None:
        """End a row's proposal once the draft's own chance of full acceptance is below this."""

    def prefault(self) -> None:
        """Back the pages of any cache it holds now, not in the first rounds."""

    def capture_s(self) -> float:
        """Seconds spent capturing CUDA graphs."""
        return 0.0
