"""Choosing the draft window K each round (`k="auto"`).

With per-token acceptance a, a round that drafts k tokens commits on average
E(k) = (1 - a^(k+1)) / (1 - a) tokens (Leviathan et al.) and costs
k * draft_step + verify(k + 1 tokens). We pick the k in 0..k_max with the highest
E(k) / cost(k); k = 0 is a plain target step, chosen when speculation would not pay.
Acceptance and costs are running estimates from the rounds already run.
"""

from __future__ import annotations


def expected_tokens(alpha: float, k: int) -> float:
    """Mean tokens committed by a round of k drafts at per-token acceptance alpha."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class AdaptiveK:
    K_MAX = 8
    # Rounds run first, in this order: a draft step and a plain step are measured, and
    # longer windows are tried only once the estimates say they pay (a useless draft
    # then costs one round, not a K=4 one).
    WARMUP = (2, 0)  # K=2: its first draft forward is the draft's prompt prefill (a catch-up,
    # kept out of the step estimate), so a second one is needed to measure a draft step
    PROBE_EVERY = 32  # after this many plain steps in a row, draft once to refresh acceptance;
    # the gap doubles after each probe, since a probe that changes nothing is pure cost

    def __init__(self, k_max: int = K_MAX, decay: float = 0.9, prior_alpha: float = 0.5) -> None:
        self.k_max = k_max
        self.decay = decay
        self.hits, self.misses = prior_alpha, 1.0 - prior_alpha  # pseudo-counts of one round
        self.draft_step: float | None = None
        self.verify: dict[int, float] = {}  # tokens in the verify forward -> seconds
        self.rounds = 0
        self.plain_streak = 0
        self.probe_gap = self.PROBE_EVERY

    @property
    def alpha(self) -> float:
        return self.hits / (self.hits + self.misses)

    def verify_cost(self, n_tokens: int) -> float:
        """Measured cost of an n-token forward, else a line through the measured ones."""
        if n_tokens in self.verify:
            return self.verify[n_tokens]
        pts = sorted(self.verify.items())
        if len(pts) == 1:
            return pts[0][1]
        (n0, c0), (n1, c1) = pts[0], pts[-1]
        return max(c0 + (c1 - c0) * (n_tokens - n0) / (n1 - n0), 1e-9)

    def rate(self, k: int) -> float:
        """Expected committed tokens per second for a window of k. A draft step not yet
        measured is priced as a target step: never as free."""
        step = self.draft_step if self.draft_step is not None else self.verify_cost(1)
        cost = self.verify_cost(k + 1) + k * step
        return expected_tokens(self.alpha, k) / cost

    def choose(self, k_limit: int) -> int:
        k_limit = min(k_limit, self.k_max)
        if self.rounds < len(self.WARMUP):
            return min(self.WARMUP[self.rounds], k_limit)
        if self.plain_streak >= self.probe_gap:
            self.probe_gap *= 2
            return min(1, k_limit)
        # Verify costs past the widest one measured are extrapolated: grow K at most
        # twofold past what was tried, so a noisy line cannot send K to k_max at once.
        k_limit = min(k_limit, 2 * max(1, max(self.verify, default=1) - 1))
        return max(range(k_limit + 1), key=self.rate)

    def min_confidence(self) -> float:
        """Stop drafting once the draft's own chance of full acceptance is below the
        cost of one more draft step in target-step units: past that, a further
        draft token costs more than it is expected to return."""
        if self.draft_step is None or 1 not in self.verify:
            return 0.0
        return min(self.draft_step / self.verify[1], 1.0)

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
        self.verify[n_fed] = ema(self.verify.get(n_fed), verify_s)
        if drafted:
            steps = drafted if steps is None else steps
            if steps > 0:  # 0: the only draft forward was a catch-up
                self.draft_step = ema(self.draft_step, draft_s / steps)
            self.hits = self.decay * self.hits + accepted
            if misses is None:
                misses = int(accepted < drafted)
            self.misses = self.decay * self.misses + misses
