"""The batch controller: each row's window from the cost of the whole batch's round."""

import pytest

from sybil.spec.batch_k import BatchK
from sybil.spec.controller import expected_tokens


def _trained(step_s=0.050, per_token_s=0.005, draft_step_s=0.004, draft_per_row_s=0.001, rows=8):
    """A controller that has measured forwards of 1..40 tokens on a line and draft steps
    of 1..rows rows on a line (seconds)."""
    c = BatchK(k_max=8)
    for n in range(1, 41, 3):
        c.update({}, n, step_s + per_token_s * (n - 1), 0, 0.0)
    for r in range(1, rows + 1):
        c.update({b: (1, 1) for b in range(r)}, 2 * r, step_s + per_token_s * (2 * r - 1),
                 1, draft_step_s + draft_per_row_s * r)
    return c


def _set_alpha(c, slot, alpha, weight=50.0):
    c.start(slot)
    c.rows[slot] = [alpha * weight, (1 - alpha) * weight]


def test_the_first_rounds_measure_a_plain_forward_then_a_draft_step():
    c = BatchK()
    assert c.choose({0: 5, 1: 5}) == {0: 0, 1: 0}
    c.update({0: (0, 0), 1: (0, 0)}, 2, 0.05, 0, 0.0)
    assert c.choose({0: 5, 1: 0}) == {0: 1, 1: 0}  # one token each, within each row's room


def test_the_fitted_lines_recover_the_costs():
    c = _trained()
    a, b = c.verify.coefficients()  # the prior's pull: 16 squared widths against hundreds
    assert a + b == pytest.approx(0.050, rel=0.01) and b == pytest.approx(0.005, rel=0.01)
    assert c.draft_s(4) == pytest.approx(0.004 + 0.001 * 4, rel=0.02)


def test_a_row_that_agrees_drafts_and_one_that_does_not_steps_plainly():
    c = _trained()
    _set_alpha(c, 0, 0.9)
    _set_alpha(c, 1, 0.02)
    ks = c.choose({0: 20, 1: 20})
    assert ks[0] >= 3 and ks[1] == 0


def test_drafting_stops_paying_when_the_batch_makes_every_token_dear():
    """The same acceptance: one row drafts, but when eight rows share a round on a machine
    where each token fed costs a fifth of a step, every window is 0 (a plain round)."""
    cheap, dear = _trained(per_token_s=0.001), _trained(per_token_s=0.010)
    for c in (cheap, dear):
        for b in range(8):
            _set_alpha(c, b, 0.5)
    assert cheap.choose({0: 20})[0] > 0
    assert set(dear.choose({b: 20 for b in range(8)}).values()) == {0}
    ks = cheap.choose({b: 20 for b in range(8)})
    assert max(ks.values()) > 0  # cheap tokens: the batch still drafts
    rate = lambda c, ks: c.rate(ks)  # noqa: E731
    assert rate(dear, {b: 0 for b in range(8)}) > rate(dear, {b: 2 for b in range(8)})


def test_the_choice_maximises_the_rate_over_every_uniform_window():
    c = _trained()
    for b, a in enumerate([0.9, 0.7, 0.4, 0.1]):
        _set_alpha(c, b, a)
    rooms = {b: 8 for b in range(4)}
    ks = c.choose(rooms)
    best_uniform = max(c.rate({b: k for b in rooms}) for k in range(9))
    assert c.rate(ks) >= best_uniform - 1e-9
    assert ks[0] >= ks[1] >= ks[2] >= ks[3]  # more acceptance, longer window


def test_rows_that_never_land_stop_drafting_and_probe_at_doubling_gaps():
    c = _trained()
    c.start(0)
    drafted_rounds = []
    for i in range(200):
        k = c.choose({0: 50})[0]
        c.update({0: (k, 0)}, 1 + k, 0.05 + 0.005 * k, 1 if k else 0, 0.005 if k else 0.0)
        if k:
            drafted_rounds.append(i)
    assert c.alpha(0) < 0.2 and len(drafted_rounds) <= 15  # it stops after a few misses (sooner with the margin)
    late = [r for r in drafted_rounds if r > 10]  # after the first few rounds: probes only
    gaps = [b - a for a, b in zip(late, late[1:])]
    assert len(late) >= 2 and all(g2 > g1 for g1, g2 in zip(gaps, gaps[1:]))


def test_a_new_row_starts_from_the_pooled_acceptance():
    c = _trained()
    for _ in range(30):
        c.update({0: (4, 4), 1: (4, 4)}, 10, 0.1, 4, 0.02)
    c.start(5)
    assert c.alpha(5) > 0.9
    assert expected_tokens(c.alpha(5), 4) > 4


def test_one_slow_forward_at_a_new_width_does_not_rule_drafting_out_for_good():
    """A 2-token verify's first run (buffers, kernel set-up) cost 7x the steady one on a
    tiny model: least squares through two widths kept that slope forever and no row
    drafted again. A lone spike is dropped; a cost that truly rose is followed."""
    c = BatchK(k_max=8)
    for _ in range(10):
        c.update({0: (0, 0)}, 1, 0.010, 0, 0.0)
    c.update({0: (1, 1)}, 2, 0.070, 1, 0.0001)  # the spike
    for _ in range(3):
        c.update({0: (1, 1)}, 2, 0.0105, 1, 0.0001)
    _set_alpha(c, 0, 0.9)
    assert c.choose({0: 20})[0] >= 3
    assert c.verify(9) < 0.020
    risen = BatchK(k_max=8)  # a machine that truly got 3x slower is followed
    for _ in range(5):
        risen.update({}, 1, 0.010, 0, 0.0)
    risen.update({}, 1, 0.030, 0, 0.0)
    assert risen.verify(1) == pytest.approx(0.010)  # one slow round: held back
    risen.update({}, 1, 0.030, 0, 0.0)
    assert risen.verify(1) > 0.015  # the second confirms it: both count
    for _ in range(20):
        risen.update({}, 1, 0.030, 0, 0.0)
    assert risen.verify(1) == pytest.approx(0.030, rel=0.1)


def test_rounds_one_token_apart_cannot_price_every_token_by_their_noise():
    """Rounds of 8 and 9 tokens whose times differ by noise (15 ms on 100 ms) said a
    token costs 15 ms; the same rounds 8 tokens apart measure the slope."""
    narrow, wide = BatchK(k_max=8), BatchK(k_max=8)
    for i in range(30):
        narrow.update({}, 8 + i % 2, 0.100 + 0.015 * (i % 2), 0, 0.0)
        wide.update({}, 8 + 8 * (i % 2), 0.100 + 0.056 * (i % 2), 0, 0.0)
    assert narrow.verify.coefficients()[1] < 0.0075  # drawn to the prior (0.1 x its intercept)
    assert wide.verify.coefficients()[1] == pytest.approx(0.007, rel=0.1)


def test_the_first_forward_of_all_cannot_set_the_slope():
    """A server's first round (8 prompts and their first tokens, 208 tokens) paid for
    touching the weights and the cache: 3.3 s, 3x its warm cost. It is dropped."""
    c = BatchK(k_max=8)
    c.update({}, 208, 3.3, 0, 0.0)
    assert c.verify.known  # it predicts alone until the second
    for _ in range(5):
        c.update({}, 8, 0.100, 0, 0.0)
    assert c.verify(208) < 2.0 and c.verify(8) == pytest.approx(0.100)
    kept = BatchK(k_max=8)  # a first forward in line with the second is kept
    kept.update({}, 40, 0.30, 0, 0.0)
    kept.update({}, 8, 0.100, 0, 0.0)
    assert kept.verify(40) == pytest.approx(0.30, rel=0.05)


def test_a_row_that_has_not_drafted_follows_the_pool():
    c = BatchK(k_max=8)
    c.start(3)
    before = c.alpha(3)
    for _ in range(20):
        c.update({0: (4, 4)}, 13, 0.1, 4, 0.02)  # row 0 drafts and always lands
    assert c.alpha(3) > before + 0.2 and c.alpha(3) == pytest.approx(c.alpha(7))


def test_a_new_row_probes_at_the_gap_the_rows_before_it_reached():
    """A draft that never lands: each new request probing from a gap of 16 again would
    pay two probes and their catch-ups per 64-token request."""
    c = _trained()
    for _ in range(30):  # eight rows found the draft never agrees
        c.update({b: (2, 0) for b in range(8)}, 24, 0.1, 2, 0.02)
    c.start(0)
    for _ in range(400):
        k = c.choose({0: 500})[0]
        c.update({0: (k, 0)}, 1 + k, 0.05 + 0.005 * k, 1 if k else 0, 0.005 if k else 0.0)
    c.start(1)
    probes = []
    for i in range(100):
        k = c.choose({1: 500})[1]
        c.update({1: (k, 0)}, 1 + k, 0.05 + 0.005 * k, 1 if k else 0, 0.005 if k else 0.0)
        probes += [i] if k else []
    assert c.probe_gap >= 128 and probes == []


def test_a_round_drafts_only_where_it_beats_a_plain_round_by_the_margin():
    """Rounds of 4 rows or more realized about 0.08 less than the gain the controller
    predicted (the round log at 4 and 8 clients): a predicted gain within that is a plain
    round. Without the margin the same controller drafts there."""
    rooms = {b: 50 for b in range(8)}
    plain = {b: 0 for b in rooms}
    only_without = 0
    for alpha in [0.3 + 0.025 * i for i in range(27)]:
        with_margin, without = _trained(per_token_s=0.012), _trained(per_token_s=0.012)
        without.margin = 0.0
        for c in (with_margin, without):
            for b in rooms:
                _set_alpha(c, b, alpha)
        ks, ks0 = with_margin.choose(rooms), without.choose(rooms)
        if any(ks.values()):
            assert with_margin.rate(ks) >= (1 + BatchK.MARGIN) * with_margin.rate(plain)
        only_without += any(ks0.values()) and not any(ks.values())
    assert only_without >= 1
