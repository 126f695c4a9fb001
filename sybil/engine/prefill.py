"""How many prompt tokens a round feeds (chunked prefill, `--prefill-chunk`).

A joining prompt is fed inside the rounds that decode the running rows, so a running
row waits for one chunk, never for a whole prompt. The chunk trades the running rows'
inter-token latency against the joining row's time to first token: each prompt token fed
beside the decoding rows adds to the round what a few percent of a plain round costs.

"auto" keeps that trade fixed as the batch changes: it measures a round without prompt
tokens (r0) and the cost of each prompt token (c) as it runs, and feeds
(STALL - 1) * r0 / c tokens, so a round with a chunk costs about STALL rounds without.
STALL is just under 3: a running row's slowest gaps (the rounds with a chunk) stay
within 3x its typical one, and prompts are fed at (STALL - 1) / STALL of the speed of
a prefill alone (at STALL 2, half, and the time to first token of a mixed load grew
several-fold).
When no row is decoding nobody waits, and the round feeds up to IDLE tokens.
"""

from __future__ import annotations

from sybil.errors import SybilError


class PrefillBudget:
    STALL = 2.75  # a round with a chunk costs about this many rounds without one
    FIRST = 32  # tokens per round until the costs are measured
    LEAST, IDLE = 8, 512

    def __init__(self, chunk: int | str, decay: float = 0.5) -> None:
        if chunk != "auto" and (not isinstance(chunk, int) or chunk < 1):
            raise SybilError(f"the prefill chunk must be a positive number of tokens or 'auto', got {chunk!r}")
        self.fixed = None if chunk == "auto" else chunk
        self.decay = decay
        self.round_s: float | None = None  # a round without prompt tokens
        self.token_s: float | None = None  # each prompt token fed beside the decoding rows

    def tokens(self, decoding: int) -> int:
        """This round's budget, with `decoding` rows decoding beside it."""
        if self.fixed is not None:
            return self.fixed
        if not decoding:
            return self.IDLE
        if self.round_s is None or self.token_s is None:
            return self.FIRST
        return int(min(self.IDLE, max(self.LEAST, (self.STALL - 1) * self.round_s / self.token_s)))

    def update(self, prefilled: int, decoding: int, seconds: float, drafted: int = 0) -> None:
        """Record a round's forward: prompt tokens fed, rows decoding, its seconds, and
        the draft tokens it verified. A draft token costs the forward what a prompt token
        does, so both count as the tokens past a plain round's: priced as prompt cost,
        the drafts of a speculating batch shrank its chunk to LEAST (a server with a
        draft took 11 rounds instead of 4 to fill its 8 slots)."""
        if not decoding:
            return  # a prefill alone says nothing about a decoding round
        ema = lambda old, new: new if old is None else self.decay * old + (1 - self.decay) * new  # noqa: E731
        extra = prefilled + drafted
        if extra == 0:
            self.round_s = ema(self.round_s, seconds)
        elif self.round_s is not None:
            self.token_s = ema(self.token_s, max(seconds - self.round_s, 1e-6) / extra)
