"""One request in one slot: everything the engine keeps per slot, in one type.

A slot is one row of the preallocated caches. A `Sequence` holds what the engine knows of
the request in it: its committed tokens (the prompt and what was generated; the target's
cache holds all but the last), its sampling and limits, what is left of its prompt to
feed (chunked prefill), and its telemetry. When it ends, it stays in its slot, not
running, so that the next request can reuse the cache entries of a shared prefix.

Glossary (docs/architecture.md): a *round* is one target forward for every running row;
a *row* is a sequence taking part in it; a row's *window* is how many draft tokens it
verifies in that round (0: a plain step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sybil.sample.logprobs import TokenLogprob
from sybil.sample.params import SamplingParams
from sybil.weights.tokenizer import EOT_ID


@dataclass
class Generation:
    """The result of one prompt, as generate() returns it and the server reports it."""

    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)  # generated ids only (an ending <|endoftext|> included)
    finish_reason: str = ""  # "eos", "length" (max_new_tokens), "context" (context full) or "error"
    stats: dict = field(default_factory=dict)
    error: str | None = None  # why the prompt could not be run (batched calls only)
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None for the first)


@dataclass
class Telemetry:
    """A sequence's speculation counters and times, summed over its rounds."""

    k_max: int
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    target_tokens: int = 0
    time_draft_s: float = 0.0
    time_verify_s: float = 0.0
    histogram: list[int] = field(default_factory=list)  # histogram[i]: rounds whose i-th draft was accepted

    def __post_init__(self) -> None:
        self.histogram = [0] * self.k_max

    def as_dict(self, total_s: float) -> dict:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "rejected": self.drafted - self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "mean_accepted": (self.accepted + self.target_tokens) / self.rounds if self.rounds else 0.0,
            "accept_histogram": self.histogram,
            "target_tokens": self.target_tokens,
            "time_draft_s": self.time_draft_s,
            "time_verify_s": self.time_verify_s,
            "time_other_s": max(total_s - self.time_draft_s - self.time_verify_s, 0.0),
        }


@dataclass
class Sequence:
    """One request's state in its slot (see the module docstring)."""

    out: Generation  # what the caller reads: tokens, finish_reason, stats, logprobs
    params: SamplingParams
    seed: int | None  # a sampled row's noise per position (sybil.sample.keyed)
    max_new: int
    stop_at_eos: bool
    tel: Telemetry
    start: float  # perf_counter when it was added
    top: int | None = None  # log-probabilities wanted per token, with this many alternatives
    counts: torch.Tensor | None = None  # generated-token counts, for presence/frequency penalties
    tokens: list[int] = field(default_factory=list)  # committed: the prompt, then what was generated
    pending: list[int] = field(default_factory=list)  # prompt tokens still to feed (chunked prefill)
    waited: int = 0  # rounds its pending prompt has waited for a chunk
    cached: int = 0  # prompt tokens whose cache entries the slot already held
    running: bool = True  # False once it ended or was cancelled (its tokens stay for the prompt cache)
    order: int = 0  # the engine's count of adds when it started: the slot choice's least recently used
    first_s: float | None = None  # seconds to its first round's commit (time to first token)
    first_n: int = 0  # tokens committed by then

    @property
    def prefilling(self) -> bool:
        """Whether its prompt is still being fed (no token of it committed yet)."""
        return bool(self.pending)

    def room(self, max_len: int) -> int:
        """The most drafts its next round may carry: a round commits accepted drafts + 1,
        never past max_new or the cache."""
        return min(self.max_new - len(self.out.tokens), max_len - len(self.tokens)) - 1

    def stop_reason(self, token: int, n_new: int, context: int) -> str:
        """Why it ends at this token ('' if it goes on), n_new tokens into the round."""
        if self.stop_at_eos and token == EOT_ID:
            return "eos"
        if len(self.out.tokens) + n_new >= self.max_new:
            return "length"
        if len(self.out.prompt_ids) + len(self.out.tokens) + n_new >= context:
            return "context"
        return ""

    def stats(self, end_s: float) -> dict:
        """What generate() reports of it (`Generation.stats`)."""
        decode_s, decode_tokens = end_s - self.first_s, len(self.out.tokens) - self.first_n
        return {
            "prefill_ms": 1000 * self.first_s,  # prompt forward and first round: time to first token
            "decode_tokens_per_s": decode_tokens / decode_s if decode_tokens and decode_s > 0 else 0.0,
            "total_s": end_s,
            "new_tokens": len(self.out.tokens),
            "cached_prompt_tokens": self.cached,
            **self.tel.as_dict(end_s),
        }
