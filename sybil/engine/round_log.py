"""One JSON line per round of the engine (`python -m sybil.serve --round-log PATH`).

Why: whether a draft pays under load is decided round by round (sybil.spec.batch_k), from
timings that are noisy and one-sided. The summary that bench.serve prints hides why
a run lost; the rounds show it (a first forward at 3x the rest, a token priced at
12 ms from two widths one token apart, rows that never started drafting). Each
line says what the round fed, chose and cost:

    {"round": 17, "t_s": 4.212, "rows": 3, "prefill_tokens": 0, "windows": [2, 0, 2],
     "tokens": 7, "drafted": 4, "accepted": 3, "committed": 6,
     "verify_ms": 61.2, "draft_ms": 17.9, "catchup_tokens": 0, "catchup_ms": 0.0,
     "predicted_ms": 75.0, "plain_predicted_ms": 48.3, "predicted_tokens": 5.4,
     "predicted_catchup_ms": 0.0}

`windows` holds each decoding row's chosen draft window in slot order (free and
prefilling slots left out); `drafted` what the drafters proposed (a draft may stop
short of its window); `tokens` what the target's forward fed (each row's drafts + 1,
and prompt chunks); `draft_ms` includes the catch-up forwards, also given apart. With
`--k auto` (sybil.spec.batch_k), `predicted_ms` is what the controller expected the chosen
windows to cost and `plain_predicted_ms` a plain round of the same rows (both without
catch-ups; null before its first measurement): set against `verify_ms + draft_ms -
catchup_ms`, they show where its price of a round is wrong; `predicted_tokens` is
what it expected the round to commit (set against `committed`) and
`predicted_catchup_ms` the share of draft catch-ups it charged to it. The controller
drafted because predicted_tokens / (predicted_ms + predicted_catchup_ms) beat rows /
plain_predicted_ms; the same ratio from what happened says whether that paid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from sybil.errors import SybilError
from sybil.spec.controller import Prediction


@dataclass
class RoundRecord:
    """What one round fed, chose and cost (seconds here, milliseconds in the line)."""

    round: int
    t_s: float  # since the engine was made
    windows: list[int]  # each decoding row's chosen window, in slot order
    prefill_tokens: int
    drafted: int
    accepted: int
    committed: int
    verify_s: float
    draft_s: float  # catch-ups included
    catchup_tokens: int
    catchup_s: float
    predicted: Prediction | None = None  # with k="auto"

    def line(self) -> str:
        return json.dumps({
            "round": self.round, "t_s": round(self.t_s, 3), "rows": len(self.windows),
            "prefill_tokens": self.prefill_tokens, "windows": self.windows,
            "tokens": len(self.windows) + self.drafted + self.prefill_tokens,
            "drafted": self.drafted, "accepted": self.accepted, "committed": self.committed,
            "verify_ms": round(1000 * self.verify_s, 1), "draft_ms": round(1000 * self.draft_s, 1),
            "catchup_tokens": self.catchup_tokens, "catchup_ms": round(1000 * self.catchup_s, 1),
            **self._predicted(),
        })

    def _predicted(self) -> dict:
        keys = ("predicted_ms", "plain_predicted_ms", "predicted_tokens", "predicted_catchup_ms")
        p = self.predicted
        if p is None:
            return dict.fromkeys(keys)
        values = (1000 * p.seconds, 1000 * p.plain_seconds, p.tokens, 1000 * p.catchup_seconds)
        return {k: round(v, 2 if k == "predicted_tokens" else 1) for k, v in zip(keys, values)}


class RoundLog:
    """Appends round records to a file, one flushed line each, so a log read while the
    server runs (or after it is killed) ends on a whole line."""

    def __init__(self, path: str | Path) -> None:
        try:
            self.file: TextIO = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise SybilError(f"cannot write --round-log {path}: {e.strerror}") from None

    def __call__(self, record: RoundRecord) -> None:
        self.file.write(record.line() + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
