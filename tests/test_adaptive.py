import pytest

from sybil.adaptive import AdaptiveK, expected_tokens


def test_expected_tokens_formula():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def _trained(alpha_hits, draft_cost, verify_costs, rounds=60):
    c = AdaptiveK(k_max=8)
    c.rounds = len(AdaptiveK.WARMUP)
    for n, cost in verify_costs.items():
        c.verify[n] = cost
    c.draft_step = draft_cost
    for _ in range(rounds):
        c.update(4, alpha_hits, 4 * draft_cost, verify_costs.get(5, 1.0), 5)
    return c


def test_high_acceptance_and_cheap_draft_picks_a_long_window():
    c = _trained(4, 0.05, {1: 1.0, 5: 1.1, 9: 1.2})
    assert c.choose(100) >= 4


def test_low_acceptance_or_costly_draft_falls_back_to_plain_decoding():
    c = _trained(0, 0.5, {1: 1.0, 5: 1.1})
    assert c.alpha < 0.1
    assert c.choose(100) == 0


def test_choice_respects_the_room_left():
    c = _trained(4, 0.01, {1: 1.0, 5: 1.0, 9: 1.0})
    assert c.choose(2) <= 2


def test_plain_streak_triggers_a_probe():
    c = _trained(0, 0.5, {1: 1.0, 5: 1.1})
    for _ in range(AdaptiveK.PROBE_EVERY):
        c.update(0, 0, 0.0, 1.0, 1)
    assert c.choose(100) == 1
    c.update(1, 0, 0.5, 1.1, 2)  # the probe fails: the next one waits twice as long
    for _ in range(AdaptiveK.PROBE_EVERY):
        c.update(0, 0, 0.0, 1.0, 1)
    assert c.choose(100) == 0
    for _ in range(AdaptiveK.PROBE_EVERY):
        c.update(0, 0, 0.0, 1.0, 1)
    assert c.choose(100) == 1


def test_warmup_measures_plain_and_drafted_rounds():
    c = AdaptiveK()
    assert [c.choose(100) for _ in range(1)] == [AdaptiveK.WARMUP[0]]


def test_an_unmeasured_draft_step_is_never_free_and_k_grows_gradually():
    c = AdaptiveK(k_max=8)
    c.rounds = len(AdaptiveK.WARMUP)
    c.verify = {1: 1.0, 2: 0.9}  # a noisy pair: extrapolated, longer verifies look free
    c.hits, c.misses = 0.45, 1.45  # alpha 0.24, as after a failed warm-up
    assert c.draft_step is None
    assert c.choose(100) == 0  # priced as a target step, drafting does not pay here
    c.draft_step = 0.01
    c.hits, c.misses = 9.0, 1.0  # alpha 0.9
    assert c.choose(100) == 2  # the widest verify tried was 2 tokens (k=1): at most twice that
    c.verify[3] = 0.95
    assert c.choose(100) == 4
