"""Which slot lends a new prompt its entries, and how many (engine tests check the bits)."""

from sybil.engine.prompt_cache import PromptCache, next_admission, shared_prefix


def test_shared_prefix_stops_at_the_first_difference_and_the_limit():
    assert shared_prefix([1, 2, 3, 4], [1, 2, 9, 4], 10) == 2
    assert shared_prefix([1, 2, 3], [1, 2, 3, 4], 2) == 2
    assert shared_prefix([5], [6], 1) == 0


def test_never_the_prompts_last_token_nor_past_the_entries_written():
    cache = PromptCache(2, enabled=True)
    assert cache.reusable([1, 2, 3, 4], 4, [1, 2, 3], 0) == 2  # the last token is always fed
    assert cache.reusable([1, 2, 3, 4], 1, [1, 2, 3, 4, 5], 0) == 1  # a prompt fed one token so far
    assert PromptCache(2, enabled=False).reusable([1, 2, 3, 4], 4, [1, 2, 3, 4, 5], 0) == 0


def test_the_longest_lender_wins_and_a_tie_keeps_the_slot_itself():
    cache = PromptCache(3, enabled=True)
    seqs, valid = [[1, 2, 9], [1, 2, 3, 4], [1, 2, 3, 4]], [3, 4, 4]
    assert cache.source(seqs, valid, 0, [1, 2, 3, 4, 5]) == (1, 4)
    assert cache.source(seqs, valid, 2, [1, 2, 3, 4, 5]) == (2, 4)  # as long as slot 1's: no copy


def test_a_scored_prompt_lends_only_to_a_scoring_with_the_same_alternatives():
    cache = PromptCache(2, enabled=True)
    cache.remember(1, [None, "a", "b", "c"], 2)
    seqs, valid = [[], [1, 2, 3, 4]], [0, 4]
    assert cache.source(seqs, valid, 0, [1, 2, 3, 7, 8], top=2) == (1, 3)
    assert cache.scores(1, 3) == [None, "a", "b"]
    assert cache.source(seqs, valid, 0, [1, 2, 3, 7, 8], top=1)[1] == 0
    cache.remember(1, None, None)  # a new, unscored prompt in slot 1
    assert cache.source(seqs, valid, 0, [1, 2, 3, 7, 8], top=2)[1] == 0


def _lend(held: list[list[int]]):
    """lend(p) for free slots holding `held`, every entry written."""
    cache = PromptCache(len(held), enabled=True)
    return lambda p: max(cache.reusable(s, len(s), p, b) for b, s in enumerate(held))


def test_the_waiting_prompt_the_free_slots_hold_most_of_goes_first():
    lend = _lend([[7, 8, 9, 10]])
    waiting = [[1, 2, 3], [7, 8, 4], [7, 8, 9, 10, 11]]  # the oldest first
    assert next_admission(waiting, [0, 0, 0], lend, patience=4) == 2
    assert next_admission(waiting[:2], [0, 0], lend, patience=4) == 1


def test_first_come_first_served_where_the_cache_does_not_care():
    lend = _lend([[7, 8, 9]])
    assert next_admission([[1, 2], [3, 4], [5]], [0, 0, 0], lend, patience=4) == 0  # nothing held
    assert next_admission([[1, 2], [7, 8, 1], [7, 8, 2]], [0, 0, 0], lend, patience=4) == 1  # a tie: the older


def test_a_prompt_passed_over_patience_times_goes_first_whatever_the_cache_holds():
    lend = _lend([[7, 8, 9]])
    waiting = [[1, 2], [3, 4], [7, 8, 9, 1]]
    assert next_admission(waiting, [3, 3, 0], lend, patience=4) == 2
    assert next_admission(waiting, [5, 4, 0], lend, patience=4) == 0  # the oldest overdue one
    assert next_admission(waiting, [3, 4, 0], lend, patience=4) == 1
