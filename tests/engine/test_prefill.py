"""The chunked-prefill budget: a fixed chunk, or one that keeps a round's stall fixed."""

import pytest

from sybil.engine.prefill import PrefillBudget
from sybil.errors import SybilError


def test_a_fixed_chunk_is_kept_whatever_the_costs():
    budget = PrefillBudget(48)
    budget.update(0, 8, 0.1)
    budget.update(48, 8, 2.0)
    assert budget.tokens(8) == budget.tokens(0) == 48


def test_auto_feeds_what_makes_a_round_cost_stall_rounds_from_measured_costs():
    budget = PrefillBudget("auto", decay=0.0)  # no smoothing: the last measurement
    assert budget.tokens(4) == PrefillBudget.FIRST  # nothing measured yet
    budget.update(16, 4, 0.5)  # a chunk before any plain round is measured: no token cost yet
    assert budget.tokens(4) == PrefillBudget.FIRST
    budget.update(0, 4, 0.080)  # a round of 4 rows: 80 ms
    budget.update(20, 4, 0.180)  # 20 prompt tokens beside them: 5 ms each
    stall = PrefillBudget.STALL
    assert budget.tokens(4) == int((stall - 1) * 0.080 / 0.005)  # a round with a chunk costs STALL without
    budget.update(0, 4, 0.020)  # the rounds got cheaper (fewer rows): a smaller chunk
    assert budget.tokens(4) == max(PrefillBudget.LEAST, int((stall - 1) * 0.020 / 0.005))


def test_draft_tokens_are_priced_as_tokens_not_as_a_plain_round_or_prompt_cost():
    """A speculating batch's verify feeds drafts: they make the round dearer by what they
    cost, so they neither raise the plain round's time nor the price of a prompt token."""
    budget = PrefillBudget("auto", decay=0.0)
    budget.update(0, 4, 0.080)
    budget.update(0, 4, 0.180, drafted=20)  # 20 drafts at 5 ms: still the 80 ms plain round
    assert budget.round_s == 0.080 and budget.token_s == pytest.approx(0.005)
    budget.update(10, 4, 0.180, drafted=10)  # 10 prompt tokens and 10 drafts: 5 ms a token
    assert budget.token_s == pytest.approx(0.005)
    assert budget.tokens(4) == int((PrefillBudget.STALL - 1) * 0.080 / 0.005)


def test_auto_is_bounded_and_gives_everything_when_no_row_decodes():
    budget = PrefillBudget("auto", decay=0.0)
    budget.update(0, 8, 1.0)
    budget.update(10, 8, 1.0 + 10 * 1e-5)  # nearly free tokens: capped
    assert budget.tokens(8) == PrefillBudget.IDLE
    budget.update(0, 0, 5.0)  # a round with no decoding row teaches nothing
    assert budget.round_s == 1.0
    assert budget.tokens(0) == PrefillBudget.IDLE
    budget.update(100, 8, 1.0 + 100 * 1.0)  # dear tokens: at least LEAST
    assert budget.tokens(8) == PrefillBudget.LEAST


@pytest.mark.parametrize("chunk", [0, -3, "big", 2.5])
def test_a_bad_chunk_is_an_error(chunk):
    with pytest.raises(SybilError, match="prefill chunk"):
        PrefillBudget(chunk)
