import pytest

from sybil.spec.adaptive import AdaptiveK
from sybil.spec.controller import expected_tokens


def test_expected_tokens_formula():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def _trained(alpha_hits, draft_cost, verify_costs, rounds=60):
    """A controller after `rounds` K=4 rounds with these costs (seconds; verify_costs[1]
    is the one-token step) and alpha_hits of 4 drafts accepted each round."""
    c = AdaptiveK(k_max=8)
    c.rounds = len(AdaptiveK.WARMUP)
    c.step_s = verify_costs[1]
    c.draft_ratio = draft_cost / c.step_s
    for n, cost in verify_costs.items():
        c.update(n - 1, alpha_hits * (n > 1), (n - 1) * draft_cost, cost, n)
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


def test_the_probe_gap_starts_over_once_drafting_pays_again():
    """A controller that fell back to plain steps and found, by a probe, that drafting
    pays again must probe as early as before after its next fallback: a gap that only
    ever doubled left a long-running (server) controller on plain steps for hundreds
    of tokens after its second or third fallback."""
    c = _trained(0, 0.1, {1: 1.0, 5: 1.1})
    for cycle in range(3):
        for _ in range(AdaptiveK.PROBE_EVERY):
            c.update(0, 0, 0.0, 1.0, 1)
        assert c.choose(1000) == 1, f"cycle {cycle}: no probe after {AdaptiveK.PROBE_EVERY} plain steps"
        for _ in range(10):  # the probe and the rounds after it find the draft right again
            c.update(4, 4, 0.4, 1.1, 5)
        assert c.choose(1000) > 0
        for _ in range(40):  # then it goes wrong again: back to plain steps
            c.update(4, 0, 0.4, 1.1, 5)
        assert c.choose(1000) == 0


def test_a_probe_waits_for_enough_tokens_left_to_pay_for_it():
    c = _trained(0, 0.5, {1: 1.0, 5: 1.1})
    for _ in range(AdaptiveK.PROBE_EVERY):
        c.update(0, 0, 0.0, 1.0, 1)
    assert c.choose(AdaptiveK.PROBE_EVERY - 2) == 0  # fewer tokens left than the gap: no probe
    assert c.choose(AdaptiveK.PROBE_EVERY - 1) == 1  # as many left as the gap: probe


def test_warmup_measures_plain_and_drafted_rounds():
    c = AdaptiveK()
    assert [c.choose(100) for _ in range(1)] == [AdaptiveK.WARMUP[0]]


def test_an_unmeasured_draft_step_is_never_free_and_k_grows_gradually():
    c = AdaptiveK(k_max=8)
    c.rounds = len(AdaptiveK.WARMUP)
    c.step_s = 1.0
    c.update(0, 0, 0.0, 1.0, 1)
    c.update(1, 0, 0.0, 1.0, 2)  # a 2-token verify as cheap as a step: longer ones look free
    c.draft_ratio, c.hits, c.misses = None, 0.45, 1.45  # alpha 0.24, as after a failed warm-up
    assert c.choose(100) == 0  # the draft step priced as a target step: drafting does not pay
    c.draft_ratio = 0.01
    c.hits, c.misses = 9.0, 1.0  # alpha 0.9
    assert c.choose(100) == 2  # the widest verify tried was 2 tokens (k=1): at most twice that
    c.update(2, 2, 0.02, 1.0, 3)
    assert c.choose(100) == 4


def test_a_noisy_wide_forward_is_never_priced_below_a_step():
    """2-token forwards measured faster than the step (noise, or the machine slowed
    since) must not make a useless draft look profitable."""
    c = AdaptiveK(k_max=8)
    c.rounds = len(AdaptiveK.WARMUP)
    c.step_s = 1.0
    c.update(1, 0, 0.2, 0.9, 2)  # K=1: draft step 0.2 steps, verify "0.9 steps", rejected
    c.update(1, 0, 0.2, 0.9, 2)
    assert c.verify_cost(2) == 1.0
    # alpha 0.15: 1.15 tokens for 1.2 steps does not beat 1 for 1 (for "1.1 steps" it would)
    assert c.choose(100) == 0


def test_one_slow_verify_does_not_rule_its_width_out():
    """Verify forwards cost 1 + 0.05 (n - 1) steps, but the first 5-token one ran slow
    (1.6 steps): the fitted line, fed by the other widths' rounds, still brings K=4 back."""
    c = AdaptiveK(k_max=8)
    c.update(0, 0, 0.0, 1.0, 1)
    c.update(1, 1, 0.1, 1.05, 2)
    c.update(2, 2, 0.2, 1.10, 3)
    c.update(4, 4, 0.4, 1.6, 5)  # one slow sample
    c.hits, c.misses = 8.0, 2.0  # alpha 0.8
    chosen = []
    for _ in range(12):
        k = c.choose(100)
        chosen.append(k)
        c.update(k, k, 0.1 * k, 1.0 + 0.05 * k, k + 1)
        c.hits, c.misses = 8.0, 2.0
    assert 4 in chosen[-4:] or 5 in chosen[-4:], chosen


def test_costs_are_relative_to_the_current_step():
    """The machine slows by half between the K=2 rounds and the plain ones: the verify
    forward keeps its cost relative to the step it was measured against."""
    c = AdaptiveK(k_max=8)
    c.update(0, 0, 0.0, 1.0, 1)
    c.update(2, 2, 0.2, 1.2, 3)  # 3-token verify: 1.2 steps
    for _ in range(30):
        c.update(0, 0, 0.0, 1.5, 1)
    assert c.step_s == pytest.approx(1.5, rel=0.05)
    assert c.verify_cost(3) == pytest.approx(1.2)
    assert c.draft_ratio == pytest.approx(0.1)


def test_each_drafter_brings_its_own_prior_cost():
    """Before a draft step is measured it is priced at the drafter's prior: a lookup that
    runs no model (0) drafts after a warm-up whose K=1 round found nothing to propose;
    a draft priced as a target step does not."""
    free, dear = AdaptiveK(k_max=8, draft_prior=0.0), AdaptiveK(k_max=8)
    for c in (free, dear):
        c.update(0, 0, 0.0, 1.0, 1)  # the plain step
        c.update(0, 0, 0.0, 1.0, 1)  # the K=1 round: no n-gram matched, nothing drafted
    assert free.choose(100) >= 1
    assert dear.choose(100) == 0
