"""The draft window controllers' interface: what the engine asks of one each round.

A controller chooses each decoding row's window (how many tokens to draft, 0 for a
plain step) before a round, and learns from what the round drafted, accepted and cost
after it. The engine calls only the methods of `Controller`; `FixedK` is the fixed
window (`--k 4`), `AdaptiveK` one window for every row (sybil.spec.adaptive) and
`BatchK` each row's own window priced for the whole batch (sybil.spec.batch_k, the
default `k="auto"`).

With per-token acceptance a, a round that drafts k tokens commits on average
E(k) = (1 - a^(k+1)) / (1 - a) tokens (Leviathan et al., 2023): `expected_tokens`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


def expected_tokens(alpha: float, k: int) -> float:
    """Mean tokens committed by a round of k drafts at per-token acceptance alpha."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass
class Prediction:
    """What a controller expected of a round before it ran (the round log compares)."""

    seconds: float  # the chosen windows' round, catch-ups apart
    plain_seconds: float  # a plain round of the same rows
    tokens: float  # the tokens the chosen windows are expected to commit
    catchup_seconds: float  # the share of the draft catch-ups it priced into this round


@dataclass
class RoundOutcome:
    """What one round drafted, accepted and cost, as the engine measured it."""

    rows: dict[int, tuple[int, int]]  # slot -> (drafted, accepted), the rows that decoded
    tokens: int  # tokens the target forward fed, prompt chunks included
    prefilled: int  # of which prompt-chunk tokens
    verify_s: float  # the target forward and the acceptance
    draft_steps: int  # draft forwards run in lockstep (the widest window)
    draft_s: float  # their seconds, catch-ups excluded
    catchup_tokens: int = 0  # tokens the draft fed to catch up before drafting
    catchup_s: float = 0.0


class Controller(ABC):
    """Chooses draft windows and learns from rounds. A controller may be given to many
    generate() calls (or kept by a server) and carries what it learnt across them."""

    k_max: int

    @abstractmethod
    def windows(self, rooms: dict[int, int], extra_tokens: int = 0, lags: dict[int, int] | None = None
                ) -> dict[int, int]:
        """Each decoding row's window this round. rooms[slot] is the most drafts the row
        may carry; extra_tokens are prompt-chunk tokens fed beside the rows; lags[slot] is
        what the row's draft cache lacks (None: the drafter keeps no cache)."""

    @abstractmethod
    def learn(self, outcome: RoundOutcome) -> None:
        """Record a round that ran with the windows this controller chose."""

    def prime(self, draft_prior: float) -> None:
        """The drafter's guess of a draft step in target steps (Drafter.cost_prior), used
        until a draft step is measured."""

    def start(self, slot: int) -> None:
        """A new sequence takes slot: nothing of its own is known yet."""

    def min_confidence(self) -> float | None:
        """The draft's own probability of full acceptance below which it stops a proposal
        early (0: never stops early; None: leave the drafter's own setting)."""
        return None

    def predict(self, ks: dict[int, int], rooms: dict[int, int], extra_tokens: int = 0,
                lags: dict[int, int] | None = None) -> Prediction | None:
        """What the windows ks (chosen by windows() from the same arguments) are expected
        to give (None: this controller does not price rounds)."""
        return None


class FixedK(Controller):
    """The same window every round (`k=4`), cut to each row's room."""

    def __init__(self, k: int) -> None:
        self.k_max = k

    def windows(self, rooms: dict[int, int], extra_tokens: int = 0, lags: dict[int, int] | None = None
                ) -> dict[int, int]:
        return {b: min(self.k_max, room) for b, room in rooms.items()}

    def learn(self, outcome: RoundOutcome) -> None:
        pass
