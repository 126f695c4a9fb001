"""Choosing each row's draft window per round, for the whole batch (`k="auto"`).

One K for every row (sybil.spec.adaptive) loses once rows are many: a verify of B rows
feeds B * (K + 1) tokens, so on a machine that is compute-bound past a few tokens the
round costs far more than a plain step of B rows, while each row still commits about
E(K) tokens. So the round is priced as a whole, as SmartSpec and TurboSpec do, and
each row gets its own window (0 included):

    rate(k_1..k_B) = sum_b E(a_b, k_b) / (V(tokens) + max_b(k_b) * D(drafting rows))

E(a, k) = (1 - a^(k+1)) / (1 - a) is a round's expected commit at per-token acceptance
a (sybil.spec.controller.expected_tokens); V(n), the target forward of n tokens, and D(r), a
draft step of r rows, are lines fitted to the rounds as they run (recent ones weigh
more). The windows that maximise the rate are found by Dinkelbach's iteration for
each cap K on the draft steps: at a trial rate R, row b takes the k that maximises
E(a_b, k) - 1 - R * k * (V' + D'), its own marginal tokens against the time its k
tokens add; the shared part of a draft step (D's intercept) is priced per K.

A row whose draft cache lags (a new prompt, or the tokens of its plain rounds) must
first be caught up, a draft forward of its lag: that is priced too, spread over the
rounds of drafting it enables (the row's tokens left over E(a, k)), at a per-token
cost measured from the catch-ups run (a batch of 8 new prompts cost a second of
catch-up on the 2-core machine, 14 plain rounds, before this was priced).

Every row keeps its own acceptance (a row that rarely agrees with the draft stops
drafting while the others go on), on top of the pooled acceptance of all rows
(which a row that has not drafted yet follows), and rows start one per round (one
catch-up per round). A row that has not drafted for a while probes with one token, at
gaps that double while probes find nothing, one row per round, and only where drafting
would pay if the row agreed: when the batch's cost is what rules drafting out, a probe
would learn nothing. A window (probes apart) must beat a plain round by MARGIN to be chosen: the
round logs found rounds of several rows realizing about 0.08 less than the gain
predicted. When no window pays, every row gets 0 and the round is a plain
step of the batch: no draft forward runs at all.
"""

from __future__ import annotations

from sybil.spec.controller import Controller, Prediction, RoundOutcome, expected_tokens


class _Line:
    """y = a + b * x by least squares over decayed observations, its slope drawn toward
    `prior_slope` (a fraction of the intercept) as much as the widths seen are close.

    Timing noise is one-sided and bursty: the first forward of a new width (buffers,
    kernel set-up) or a moment another process holds the core can cost several times
    the rest. Least squares through two clusters of widths keeps such a point's slope
    however much it decays (a 2-token verify's warm-up at 7x pinned a tiny model's slope
    at 4x its step for good, and no row drafted again). So an observation over SPIKE
    times the prediction is held back until the next one: if that one is high too, the
    cost has changed and both count; if not, it was a spike and is dropped.
    """

    SPIKE = 1.5
    PRIOR_WEIGHT = 16.0  # the prior slope weighs as much as this sum of squared widths from the mean

    def __init__(self, decay: float, prior_slope: float) -> None:
        self.decay, self.prior_slope = decay, prior_slope
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.widest = 0.0
        self.held: tuple[float, float] | None = None  # a spike, until the next observation

    def add(self, x: float, y: float) -> None:
        if not self.w:  # the first observation has nothing to be judged against: see _first
            self._first(x, y)
            return
        if y > self.SPIKE * self(x):
            if self.held is None:
                self.held = (x, y)
                return
            self._add(*self.held)  # two high in a row: the cost changed
        self.held = None
        self._add(x, y)

    def _first(self, x: float, y: float) -> None:
        """The very first forward is the likeliest spike of all (a server's first round
        touches the weights and the cache's pages: 3.3 s for 8 prompts of 25 tokens on
        the 2-core machine, where the line fitted later gave 1.5 s), and least squares keeps its slope
        however much it decays. So it is held (and predicts alone) until the second,
        then dropped if over SPIKE times what the second alone predicts for it."""
        if self.held is None:
            self.held = (x, y)
            return
        (hx, hy), self.held = self.held, None
        second = _Line(self.decay, self.prior_slope)
        second._add(x, y)
        if hy > self.SPIKE * second(hx):
            self._add(x, y)
            return
        self._add(hx, hy)
        self.add(x, y)

    def _add(self, x: float, y: float) -> None:
        d = self.decay
        self.w, self.sx, self.sy = d * self.w + 1, d * self.sx + x, d * self.sy + y
        self.sxx, self.sxy = d * self.sxx + x * x, d * self.sxy + x * y
        self.widest = max(self.widest, x)

    @property
    def known(self) -> bool:
        return self.w > 0 or self.held is not None

    def coefficients(self) -> tuple[float, float]:
        if not self.w:  # only the first observation, held: it alone
            mx, my = self.held
            return self._through(mx, my, self._prior(mx, my))
        mx, my = self.sx / self.w, self.sy / self.w
        prior = self._prior(mx, my)
        sxx, sxy = self.sxx - self.sx * mx, self.sxy - self.sx * my  # centred, decayed sums
        # Ridge toward the prior: the data's slope wins as the widths spread (sxx grows),
        # the prior where they hardly differ, so that the noise of rounds one token apart
        # cannot set the price of every token (100 ms rounds of 8 and 9 tokens that
        # differed by 10 ms of noise made a token cost 12 ms, and nothing drafted).
        return self._through(mx, my, max((sxy + self.PRIOR_WEIGHT * prior) / (sxx + self.PRIOR_WEIGHT), 0.0))

    def _prior(self, mx: float, my: float) -> float:
        """The prior slope for a line through (mx, my): prior_slope times its intercept."""
        return self.prior_slope * my / (1 + self.prior_slope * mx)

    @staticmethod
    def _through(mx: float, my: float, slope: float) -> tuple[float, float]:
        """(intercept, slope) of the line of that slope through the point (mx, my); the
        intercept never below 0."""
        slope = min(slope, my / max(mx, 1e-9))
        return my - slope * mx, slope

    def __call__(self, x: float) -> float:
        a, b = self.coefficients()
        return a + b * x


class BatchK(Controller):
    """Each row's own window, the round priced as a whole (the module docstring says how)."""

    K_MAX = 8
    PROBE_EVERY = 16  # rounds without drafting before a row probes with one token; doubles per failed probe
    GAP_MAX = 1024  # the longest gap between probes
    # A round drafts only where its predicted rate beats a plain round's by this much. The
    # round log of bench.serve at 4 and 8 clients (2-core Zen 3, float32 gpt2-medium, int8
    # gpt2 draft) found rounds of 4 rows or more realizing about 0.08 less than the gain
    # predicted: predicted 1.05-1.20 gave 1.00-1.02, under 1.05 gave 0.97 (a row's acceptance
    # read from a lucky streak; catch-ups that come back as rows go in and out of drafting).
    MARGIN = 0.1

    def __init__(self, k_max: int = K_MAX, decay: float = 0.9, prior_alpha: float = 0.5,
                 draft_prior: float = 1.0, margin: float = MARGIN) -> None:
        self.k_max = k_max
        self.margin = margin
        self.decay = decay
        # a draft step in target forwards of as many tokens, until one is measured (Drafter.cost_prior)
        self.draft_prior = draft_prior
        # A forward of one more token costs about a tenth of a one-token step on the 2-core
        # machine (8 rows: 75 ms against 44 ms for one); the fits replace this within rounds.
        self.verify = _Line(decay, prior_slope=0.1)
        self.draft = _Line(decay, prior_slope=0.1)
        self.pool = [prior_alpha, 1.0 - prior_alpha]  # pooled hits and misses: a new row's prior
        self.catchup_token_s: float | None = None  # a draft catch-up forward, per token fed
        self.rows: dict[int, list[float]] = {}  # slot -> its own [hits, misses]
        self.plain: dict[int, int] = {}  # slot -> rounds since it last drafted
        self.gap: dict[int, int] = {}  # slot -> rounds between its probes
        self.probe_gap = self.PROBE_EVERY  # the last gap any row probed at: a new row's first
        self.rounds = 0

    # ---- the engine's interface (sybil.spec.controller.Controller)
    def windows(self, rooms: dict[int, int], extra_tokens: int = 0, lags: dict[int, int] | None = None
                ) -> dict[int, int]:
        return self.choose(rooms, extra_tokens, lags)

    def learn(self, outcome: RoundOutcome) -> None:
        self.update(outcome.rows, outcome.tokens, outcome.verify_s, outcome.draft_steps, outcome.draft_s,
                    outcome.catchup_tokens, outcome.catchup_s)

    def prime(self, draft_prior: float) -> None:
        if self.rounds == 0:
            self.draft_prior = draft_prior

    def predict(self, ks: dict[int, int], rooms: dict[int, int], extra_tokens: int = 0,
                lags: dict[int, int] | None = None) -> Prediction | None:
        if not self.verify.known:
            return None
        chosen = {b: ks.get(b, 0) for b in rooms}
        return Prediction(self.cost_s(chosen, extra_tokens), self.cost_s({b: 0 for b in rooms}, extra_tokens),
                          self.expected(chosen), self.catchups_s(chosen, lags, rooms))

    # ---- rows
    def start(self, slot: int) -> None:
        """A new sequence in slot: nothing of its own known yet."""
        self.rows[slot] = [0.0, 0.0]
        self.plain[slot], self.gap[slot] = 0, self.probe_gap

    def alpha(self, slot: int) -> float:
        """The row's own hits and misses on top of the pooled acceptance, weighing one
        round, so a row that has not drafted yet follows what the others find. (Held at
        the pool of its start, 7 rows stayed at a prior 0.5 while one had found 0.76, and
        no round found that drafting them all would pay.)"""
        hits, misses = self.rows.get(slot) or (0.0, 0.0)
        return (hits + self.pool[0] / (self.pool[0] + self.pool[1])) / (hits + misses + 1.0)

    # ---- costs
    def verify_s(self, tokens: int) -> float:
        return self.verify(tokens)

    def draft_s(self, rows: int) -> float:
        """One draft step of `rows` rows: measured, or the prior share of a target forward."""
        return self.draft(rows) if self.draft.known else self.draft_prior * self.verify(rows)

    def min_confidence(self) -> float:
        """A draft stops once its own chance that all its tokens land is below the cost of
        one more draft step in one-token target steps (see AdaptiveK.min_confidence)."""
        if not (self.draft.known and self.verify.known):
            return 0.0
        return min(self.draft(1) / max(self.verify(1), 1e-9), 1.0)

    def catchup_s(self, slot: int, k: int, lag: int, room: int) -> float:
        """Row slot's draft catch-up (lag tokens) before a window of k, spread over the
        rounds of drafting it enables: its tokens left over E(a, k)."""
        if lag <= 2 or not k:
            return 0.0
        per = self.catchup_token_s
        if per is None:  # none run yet: a draft step's cost per row (nothing before a step is measured)
            per = self.draft.coefficients()[1] if self.draft.known else 0.0
        return per * lag / max(1.0, (room + 1) / expected_tokens(self.alpha(slot), k))

    def cost_s(self, ks: dict[int, int], extra_tokens: int = 0) -> float:
        """The predicted seconds of a round with windows ks: its target forward and its
        draft steps (catch-ups apart)."""
        tokens = sum(1 + k for k in ks.values()) + extra_tokens
        steps = max(ks.values(), default=0)
        drafting = sum(k > 0 for k in ks.values())
        return self.verify_s(tokens) + (steps * self.draft_s(drafting) if steps else 0.0)

    def rate(self, ks: dict[int, int], extra_tokens: int = 0, lags: dict[int, int] | None = None,
             rooms: dict[int, int] | None = None) -> float:
        """Expected committed tokens per second of a round with windows ks (slot -> k);
        lags and rooms: each row's draft-cache lag (what drafting it would first feed) and
        the most drafts it may carry (how long it goes on)."""
        cost = self.cost_s(ks, extra_tokens) + self.catchups_s(ks, lags, rooms)
        return self.expected(ks) / max(cost, 1e-9)

    def expected(self, ks: dict[int, int]) -> float:
        """The tokens a round with windows ks is expected to commit."""
        return sum(expected_tokens(self.alpha(b), k) for b, k in ks.items())

    def catchups_s(self, ks: dict[int, int], lags: dict[int, int] | None, rooms: dict[int, int] | None) -> float:
        """The rows' draft catch-ups, each spread over the rounds it enables (catchup_s)."""
        if not lags or not max(ks.values(), default=0):
            return 0.0
        return sum(self.catchup_s(b, k, lags.get(b, 0), (rooms or {}).get(b, k)) for b, k in ks.items())

    # ---- the choice
    def choose(self, rooms: dict[int, int], extra_tokens: int = 0, lags: dict[int, int] | None = None
               ) -> dict[int, int]:
        """Windows for the rows that decode this round: rooms[slot] is the most drafts the
        row may carry; extra_tokens are fed beside them (prompt chunks); lags[slot] is
        what its draft cache lacks (a catch-up to pay before it drafts)."""
        plain = {b: 0 for b in rooms}
        if not rooms or self.rounds == 0 or not self.verify.known:
            return plain  # the first round measures a plain forward
        if not self.draft.known:  # the second measures a draft step, on one row: a cheap catch-up
            first = min((b for b, room in rooms.items() if room >= 1), default=None)
            return {**plain, first: 1} if first is not None else plain
        _, v_slope = self.verify.coefficients()
        _, d_slope = self.draft.coefficients()
        lags = lags or {}
        # a verify wider than twice the widest measured is extrapolated too far
        widest = max(2 * self.verify.widest, len(rooms) + extra_tokens + len(rooms))
        best, best_rate = plain, self.rate(plain, extra_tokens)
        base_rate = best_rate
        # Each row's expected commit and spread catch-up per window, once: the search below
        # prices windows hundreds of times a round (8 rows: 0.7-1.1 ms of Python per round
        # on the 2-core machine before, about 1% of a round of 8).
        top = min(self.k_max, max(rooms.values(), default=0))
        gains = {b: [expected_tokens(self.alpha(b), k) for k in range(min(top, room) + 1)] for b, room in rooms.items()}
        spread = {b: [self.catchup_s(b, k, lags.get(b, 0), room) for k in range(len(gains[b]))]
                  for b, room in rooms.items()}
        slope = v_slope + d_slope

        def rate(ks: dict[int, int]) -> float:  # self.rate(ks, extra_tokens, lags, rooms), from the tables
            catchups = sum(spread[b][k] for b, k in ks.items())  # 0 where k or the lag is 0 (catchup_s)
            return sum(gains[b][k] for b, k in ks.items()) / max(self.cost_s(ks, extra_tokens) + catchups, 1e-9)

        for cap in range(1, top + 1):
            trial = best_rate
            for _ in range(3):  # Dinkelbach: each row's best window at the trial rate, then the rate
                ks = {}
                for b, g in gains.items():
                    c = spread[b]
                    ks[b] = max(range(min(cap, len(g) - 1) + 1), key=lambda k: g[k] - 1 - trial * (k * slope + c[k]))
                if sum(1 + k for k in ks.values()) + extra_tokens > widest:
                    break
                r = rate(ks)
                if r <= trial:
                    break
                trial = r
                if r > best_rate:
                    best, best_rate = ks, r
        # One catch-up per round: rows start drafting one at a time, each on what the rows
        # before it found (the pooled acceptance), so a draft that never lands costs one
        # row's catch-up, not a batch's (8 prompts: a second, 14 plain rounds, at 0.86x).
        starting = sorted((lags.get(b, 0), b) for b, k in best.items() if k and lags.get(b, 0) > 2)
        for _, b in starting[1:]:
            best = {**best, b: 0}
        # Draft only past a margin: what is left after that filter, and any window whose
        # predicted gain is within the controller's own error, is a plain round.
        if any(best.values()) and rate(best) < (1 + self.margin) * base_rate:
            best = plain
        return self._probes(best, rooms, extra_tokens, lags, base_rate)

    def _probes(self, ks: dict[int, int], rooms: dict[int, int], extra_tokens: int, lags: dict[int, int],
                base_rate: float) -> dict[int, int]:
        """One row that has not drafted for its gap drafts one token, to learn whether it
        pays again, if drafting it would pay were its acceptance high: otherwise the
        batch's cost, not the row, rules drafting out. The gap doubles at each probe (up
        to GAP_MAX) and starts over once a row drafts by choice; a new row starts from
        the last gap any row probed at, so that a server whose draft never lands does
        not probe each new request as if nothing were known (two probes of a 64-token
        request with their catch-ups: an estimated 4% of it at one client)."""
        out, probed = dict(ks), False
        for b, k in ks.items():
            if k:
                self.gap[b] = self.probe_gap = self.PROBE_EVERY
                continue
            if probed or self.plain.get(b, 0) < self.gap.get(b, self.PROBE_EVERY) or rooms[b] < 1:
                continue
            saved = self.rows.get(b)
            self.rows[b] = [9.0, 1.0]  # were it to agree 9 times in 10
            worth = self.rate({**ks, b: 1}, extra_tokens, lags, rooms) > base_rate
            if saved is None:
                del self.rows[b]
            else:
                self.rows[b] = saved
            if worth:
                out[b], probed = 1, True
                self.gap[b] = self.probe_gap = min(2 * self.gap.get(b, self.PROBE_EVERY), self.GAP_MAX)
                self.plain[b] = 0
        return out

    # ---- learning
    def update(self, rows: dict[int, tuple[int, int]], tokens: int, verify_s: float, draft_steps: int,
               draft_s: float, catchup_tokens: int = 0, catchup_s: float = 0.0) -> None:
        """Record a round: per slot (drafted, accepted), the tokens its target forward fed,
        its seconds, the draft steps it ran (all rows in lockstep) and their seconds
        (catch-up forwards excluded), and the catch-up forwards' tokens and seconds."""
        self.rounds += 1
        if catchup_tokens > 0:
            per = catchup_s / catchup_tokens
            self.catchup_token_s = per if self.catchup_token_s is None else (
                self.decay * self.catchup_token_s + (1 - self.decay) * per)
        self.verify.add(tokens, verify_s)
        drafting = sum(d > 0 for d, _ in rows.values())
        if draft_steps and drafting:
            self.draft.add(drafting, draft_s / draft_steps)
        hits = misses = 0.0
        for b, (drafted, accepted) in rows.items():
            if not drafted:
                self.plain[b] = self.plain.get(b, 0) + 1
                continue
            self.plain[b] = 0
            h, m = self.rows.setdefault(b, [0.0, 0.0])
            miss = float(accepted < drafted)
            self.rows[b] = [self.decay * h + accepted, self.decay * m + miss]
            hits, misses = hits + accepted, misses + miss
        if hits or misses:
            self.pool = [self.decay * self.pool[0] + hits, self.decay * self.pool[1] + misses]
