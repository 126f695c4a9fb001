"""Suffix drafting: the longest earlier match, across requests, and lossless."""

import pytest
import torch
from conftest import noisy_copy

import sybil
from sybil.engine.core import EngineCore
from sybil.engine.generate import make_drafter
from sybil.engine.sequence import Generation
from sybil.sample.params import SamplingParams
from sybil.spec.suffix import SuffixDrafter, SuffixIndex

torch.set_grad_enabled(False)
SPEC = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=2048, n_positions=256, initializer_range=0.1)


def test_the_longest_match_wins_and_the_draft_is_no_longer_than_it():
    index = SuffixIndex()
    a = index.open()
    index.extend(a, [1, 2, 3, 4, 5, 6, 7, 8])  # "2 3 4" followed by 5 6 7 8
    b = index.open()
    index.extend(b, [9, 3, 4, 50, 51])  # more recent, but "3 4" matches only two tokens
    assert index.lookup([0, 2, 3, 4], 3) == [5, 6, 7]  # three tokens matched: three drafted
    assert index.lookup([7, 3, 4], 5) == [50, 51]  # "7 3 4" matches b's "3 4" as well as a's: most recent
    assert index.lookup([1, 2, 3, 4], 8) == [5, 6, 7, 8]  # the match is 4 long, and a has only 4 more
    assert index.lookup([42, 43], 4) == [] and index.lookup([3], 4) == []


def test_a_sequence_never_matches_its_own_tail_and_ended_ones_are_forgotten_past_the_limit():
    index = SuffixIndex(max_docs=1)
    own = index.open()
    index.extend(own, [5, 6, 7, 5, 6])
    assert index.lookup([5, 6, 7, 5, 6], 3, own=own) == [7, 5]  # the earlier "5 6", not the tail
    index.close(own)
    other = index.open()
    index.extend(other, [1, 2, 3])
    index.close(other)  # the limit is one ended sequence: the first is forgotten
    assert index.lookup([9, 5, 6], 3) == []
    assert index.lookup([1, 2], 3) == [3]


@pytest.fixture(scope="module")
def target(hf_checkpoint):
    return sybil.load_model(hf_checkpoint("suffix", **SPEC))


def _run(batch, slot, prompt, n, params=SamplingParams(), seed=None):
    out = Generation(prompt_ids=prompt)
    batch.add(slot, out, n, params, seed, stop_at_eos=False)
    while slot not in batch.free_slots():
        batch.step()
    return out


def test_a_repeated_request_is_drafted_from_the_first_and_decodes_in_far_fewer_rounds(target):
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, SPEC["vocab_size"], (30,), generator=g).tolist()
    plain = sybil.generate(target, prompt, 60, stop_at_eos=False).tokens
    # a fixed window: with k="auto" the rounds would follow this machine's timings
    # (tests/spec/test_batch_k.py prices those apart, on given costs)
    batch = EngineCore(target, 2, 256, SuffixDrafter(), k=8)
    first = _run(batch, 0, prompt, 60)
    again = _run(batch, 1, prompt, 60)  # another slot: the text comes from the index, not the cache
    assert first.tokens == again.tokens == plain
    assert again.stats["acceptance_rate"] > 0.9
    assert again.stats["rounds"] <= 0.35 * first.stats["rounds"]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=40, seed=5)])
def test_suffix_and_suffix_in_front_of_a_model_are_lossless(target, sampling):
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 64, (int(n),), generator=g).tolist() for n in (12, 20, 6)]  # small ids: repeats
    draft = noisy_copy(target, 0.02, seed=0)
    for name, spec in (("suffix", "suffix"), ("cascade", ["suffix", draft])):
        for p in prompts:
            want = sybil.generate(target, p, 40, stop_at_eos=False, **sampling)
            got = sybil.generate(target, p, 40, stop_at_eos=False, draft=spec, **sampling)
            assert got.tokens == want.tokens, name
    got = sybil.generate(target, prompts[0] * 3, 40, stop_at_eos=False, draft=["suffix", draft], k=4, **sampling)
    assert got.stats["accepted"] > 0


def test_in_a_cascade_the_model_drafts_only_the_rows_the_lookup_cannot(target):
    drafter = make_drafter(["suffix", noisy_copy(target, 0.02, seed=0)], target, SamplingParams(), 256, 2, False)
    lookup, model = drafter.drafters
    seqs = [[1, 2, 3, 4, 1, 2], [7, 8, 9]]  # row 0 repeats itself; row 1 does not
    model.rewind([0, 0])
    props = drafter.propose(seqs, [2, 2], [None, None])
    assert props[0].tokens == [3, 4]
    assert len(props[1].tokens) >= 1  # from the model
    assert int(model.cache.lengths[0]) == 0  # the model never fed row 0


def test_suffix_by_name_and_bad_lists_are_checked(target):
    from sybil.errors import SybilError

    with pytest.raises(SybilError, match="two or more"):
        make_drafter(["suffix"], target, SamplingParams(), 64, 1, False)
    with pytest.raises(SybilError, match="'suffix'"):
        make_drafter("suffixes", target, SamplingParams(), 64, 1, False)
    assert isinstance(make_drafter("suffix", target, SamplingParams(), 64, 1, False), SuffixDrafter)
