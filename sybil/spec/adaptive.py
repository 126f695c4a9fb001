"""One draft window for every row, chosen each round (an `AdaptiveK` given as k; the
default `k="auto"` is each row's own window, sybil.spec.batch_k).

With per-token acceptance a, a round that drafts k tokens commits on average
E(k) = (1 - a^(k+1)) / (1 - a) tokens (Leviathan et al.) and costs
k * draft_step + verify(k + 1 tokens). We pick the k in 0..k_max with the highest
E(k) / cost(k); k = 0 is a plain target step, chosen when speculation would not pay.
Acceptance and costs are running estimates from the rounds already run.

Costs are kept in units of the current one-token target step: on a shared machine
the absolute time of a forward drifts by a third within minutes, while the ratio of
two forwards measured minutes apart holds, and a stale absolute verify cost next to
a fresh step cost would make drafting look cheaper (or dearer) than it is.

A forward of n tokens is modelled as 1 + slope * (n - 1) steps, the slope fitted to
every verify round (recent ones weigh more). Per-width estimates were tried first:
one slow sample of a width (forwards here vary by a third from run to run) priced
that width out for good, since it was never run again to correct the estimate
(tests/spec/test_adaptive.py pins that case).
"""

from __future__ import annotations

from sybil.spec.controller import Controller, RoundOutcome, expected_tokens


class AdaptiveK(Controller):
    """One window for every row, the best E(k) / cost(k) by running estimates."""

    K_MAX = 8
    # Rounds run first, in this order: a plain step (the unit of cost), then one draft
    # token. The draft catches up on the prompt in a forward timed apart and drafts in a
    # one-token step, so that round measures a draft step; longer windows are tried only
    # once the estimates say they pay (a useless draft then costs a round or two).
    WARMUP = (0, 1)
    PROBE_EVERY = 32  # after this many plain steps in a row, draft once to refresh acceptance;
    # the gap doubles after each probe, since a probe that changes nothing is pure cost,
    # and starts over once drafting pays again.
    # A probe's draft first catches up on every token it missed (about a prefill of the
    # gap), and what it finds can only pay on the tokens left: it runs only while at
    # least as many tokens are left as the gap.

    def __init__(self, k_max: int = K_MAX, decay: float = 0.9, prior_alpha: float = 0.5,
                 draft_prior: float = 1.0) -> None:
        self.k_max = k_max
        # a draft step in target steps until one is measured: the drafter's own guess
        # (Drafter.cost_prior: 0 for a lookup that runs no model, the weight ratio for a
        # model); 1.0, a target step, where nothing better is known, so never free
        self.draft_prior = draft_prior
        self.decay = decay
        self.hits, self.misses = prior_alpha, 1.0 - prior_alpha  # pseudo-counts of one round
        self.step_s: float | None = None  # a one-token target forward, seconds
        self.draft_ratio: float | None = None  # a draft step / step_s
        # decayed sums of (n - 1)^2 and (n - 1) * (cost / step_s - 1) over verify rounds
        self.sxx = self.sxy = 0.0
        self.widest = 1  # tokens in the widest verify forward run so far
        self.rounds = 0
        self.plain_streak = 0
        self.probe_gap = self.PROBE_EVERY

    @property
    def alpha(self) -> float:
        return self.hits / (self.hits + self.misses)

    def verify_cost(self, n_tokens: int) -> float:
        """An n-token forward in steps, on the fitted line through the step itself. Never
        below a step: a wider forward does the step's work and more, whatever a noisy
        measurement says."""
        slope = max(self.sxy / self.sxx, 0.0) if self.sxx else 0.0
        return 1.0 + slope * (max(n_tokens, 1) - 1)

    def rate(self, k: int) -> float:
        """Expected committed tokens per step's worth of time for a window of k. A draft
        step not yet measured is priced at the drafter's prior (draft_prior)."""
        draft = self.draft_ratio if self.draft_ratio is not None else self.draft_prior
        return expected_tokens(self.alpha, k) / (self.verify_cost(k + 1) + k * draft)

    def choose(self, room: int) -> int:
        """The window for the next round; room is the most drafts it may carry (the
        tokens left, less the one a round always commits)."""
        k_limit = min(room, self.k_max)
        if self.rounds < len(self.WARMUP):
            return min(self.WARMUP[self.rounds], k_limit)
        if self.plain_streak >= self.probe_gap and room + 1 >= self.probe_gap:
            self.probe_gap *= 2
            return min(1, k_limit)
        # Verify costs past the widest one measured are extrapolated: grow K at most
        # twofold past what was tried, so a noisy line cannot send K to k_max at once.
        k_limit = min(k_limit, 2 * max(1, self.widest - 1))
        k = max(range(k_limit + 1), key=self.rate)
        if k:  # drafting pays again (a probe found it so): the next fallback probes early again
            self.probe_gap = self.PROBE_EVERY
        return k

    # ---- the engine's interface (sybil.spec.controller.Controller)
    def windows(self, rooms: dict[int, int], extra_tokens: int = 0, lags: dict[int, int] | None = None
                ) -> dict[int, int]:
        """One window for all rows (chosen for the roomiest), cut to each row's room."""
        if not rooms:
            return {}
        k = self.choose(max(rooms.values()))
        return {b: min(k, room) for b, room in rooms.items()}

    def learn(self, outcome: RoundOutcome) -> None:
        """A round's totals over its rows; a round that fed a prompt chunk is not a verify."""
        if outcome.prefilled:
            return
        rows = outcome.rows.values()
        self.update(sum(d for d, _ in rows), sum(a for _, a in rows), outcome.draft_s, outcome.verify_s,
                    1 + outcome.draft_steps, misses=sum(a < d for d, a in rows), steps=outcome.draft_steps)

    def prime(self, draft_prior: float) -> None:
        if self.rounds == 0:
            self.draft_prior = draft_prior

    def min_confidence(self) -> float:
        """Stop drafting once the draft's own chance of full acceptance is below the
        cost of one more draft step in target-step units: past that, a further
        draft token costs more than it is expected to return."""
        return min(self.draft_ratio, 1.0) if self.draft_ratio is not None else 0.0

    def update(
        self,
        drafted: int,
        accepted: int,
        draft_s: float,
        verify_s: float,
        n_fed: int,
        misses: int | None = None,
        steps: int | None = None,
    ) -> None:
        """Record a round: drafted and accepted tokens (summed over rows), its draft
        and verify seconds, the tokens per row in its forward, and how many rows
        saw a rejection and how many draft steps ran (defaults: one sequence)."""
        self.rounds += 1
        self.plain_streak = self.plain_streak + 1 if drafted == 0 else 0
        ema = lambda old, new: new if old is None else self.decay * old + (1 - self.decay) * new  # noqa: E731
        if n_fed == 1:
            self.step_s = ema(self.step_s, verify_s)
        elif self.step_s is not None:
            x = n_fed - 1
            self.sxx = self.decay * self.sxx + x * x
            self.sxy = self.decay * self.sxy + x * (verify_s / self.step_s - 1.0)
            self.widest = max(self.widest, n_fed)
        if drafted:
            steps = drafted if steps is None else steps
            if steps > 0 and self.step_s is not None:  # 0: the only draft forward was a catch-up
                self.draft_ratio = ema(self.draft_ratio, draft_s / steps / self.step_s)
            self.hits = self.decay * self.hits + accepted
            if misses is None:
                misses = int(accepted < drafted)
            self.misses = self.decay * self.misses + misses
