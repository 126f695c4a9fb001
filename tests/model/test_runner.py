"""forward_rows: ragged rows through one forward, each as if alone."""

import pytest
import torch

import sybil
from sybil.model.kv_cache import KVCache
from sybil.model.runner import forward_rows, last_logits

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return sybil.load_model(hf_checkpoint("small"))


def test_ragged_rows_match_solo_runs(model):
    rows = [[1, 2, 3, 4, 5, 6], [7], [], [8, 9, 10]]
    cache = KVCache.for_model(model.config, 4, 32)
    logits = forward_rows(model, cache, rows)
    assert cache.lengths.tolist() == [6, 1, 0, 3]
    for b, row in enumerate(rows):
        if row:
            assert torch.allclose(logits[b, : len(row)], model(torch.tensor([row]))[0], atol=1e-5)
    # A second ragged step continues each row from its own pointer.
    more = [[11], [12, 13], [14], []]
    logits = forward_rows(model, cache, more)
    for b, (a, m) in enumerate(zip(rows, more)):
        if m:
            assert torch.allclose(last_logits(logits, more)[b], model(torch.tensor([a + m]))[0, -1], atol=1e-5)
    assert cache.lengths.tolist() == [7, 3, 1, 3]


def test_no_tokens_at_all_is_none(model):
    assert forward_rows(model, KVCache.for_model(model.config, 2, 8), [[], []]) is None


def test_padding_never_lands_on_a_real_entry(model):
    from sybil.model.runner import _padded  # the CUDA path, run here on the CPU

    cache = KVCache.for_model(model.config, 2, 8)
    _padded(model, cache, [[1] * 7, [2]], None, None)
    with pytest.raises(ValueError, match="scratch"):
        _padded(model, cache, [[3], [4, 5]], None, None)  # row 0 would write slot 7 while padded


@pytest.mark.parametrize("kernels", [True, False])
def test_packed_rows_are_bitwise_the_padded_forward(model, kernels, monkeypatch):
    """The CPU packs ragged rows without padding: the same logits and cache entries, to
    the bit, as the padded forward, with or without the C++ kernels."""
    from sybil.model.runner import _padded
    from sybil.ops import dispatch

    if not kernels:
        monkeypatch.setattr(dispatch, "use_kernels", lambda x: False)
    prefix, rows = [[1, 2, 3], [], [4], [5, 6]], [[7, 8], [9, 10, 11], [], [12]]
    caches = [KVCache.for_model(model.config, 4, 16) for _ in range(2)]
    for c in caches:
        forward_rows(model, c, prefix)
    want = _padded(model, caches[0], rows, None, None)
    got = forward_rows(model, caches[1], rows)
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist() == [5, 3, 1, 3]
    for b, r in enumerate(rows):
        assert torch.equal(got[b, : len(r)], want[b, : len(r)])
        n = int(caches[0].lengths[b])
        assert torch.equal(caches[1].k[:, b, :, :n], caches[0].k[:, b, :, :n])


def test_tail_keeps_only_the_last_logits_and_a_chunk_costs_its_row_alone(model):
    """A prompt chunk beside a one-token step: the chunk gets no logits (tail 0), the step
    its own, bitwise a solo step; and the chunked prompt's entries equal a whole prefill."""
    prompt, other = list(range(100, 112)), [5, 6, 7]
    whole = KVCache.for_model(model.config, 2, 32)
    forward_rows(model, whole, [prompt, other])
    want = forward_rows(model, whole, [[], [8]])[1, 0]
    chunked = KVCache.for_model(model.config, 2, 32)
    forward_rows(model, chunked, [prompt[:5], other])
    got = forward_rows(model, chunked, [prompt[5:], [8]], tail=[0, 1])
    assert got.shape[1] == 1 and torch.equal(got[1, 0], want)
    assert chunked.lengths.tolist() == [12, 4]
    assert torch.equal(chunked.k[:, 0, :, :12], whole.k[:, 0, :, :12])
    last = forward_rows(model, chunked, [[1, 2], [9]], tail=[1, 0])  # the last of row 0 only
    ref = forward_rows(model, whole, [[1, 2], []])
    assert last.shape[1] == 1 and torch.equal(last[0, 0], ref[0, 1])
    assert forward_rows(model, chunked, [[3], []], tail=[0, 0]) is None


def test_prefill_row_touches_only_its_row_and_equals_a_batched_prefill(model):
    from sybil.model.runner import prefill_row

    rows = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    batched = KVCache.for_model(model.config, 3, 32)
    forward_rows(model, batched, rows)
    alone = KVCache.for_model(model.config, 3, 32)
    forward_rows(model, alone, [[], [8, 9], []])  # row 1 first, then the others one by one
    before = alone.k[:, 1].clone()
    prefill_row(model, alone, 0, rows[0])
    prefill_row(model, alone, 2, rows[2])
    assert torch.equal(alone.k[:, 1], before)  # row 1 untouched (not even its scratch slot)
    assert alone.lengths.tolist() == [7, 2, 3]
    for b, row in enumerate(rows):
        n = len(row)
        assert torch.equal(alone.k[:, b, :, :n], batched.k[:, b, :, :n])
        assert torch.equal(alone.v[:, b, :, :n], batched.v[:, b, :, :n])


def test_idle_rows_at_the_ends_are_left_out_and_the_rest_is_unchanged(model):
    """A free slot feeds nothing: its cache (scratch slot included) is not written, and
    the live rows' logits are bitwise those of a forward over every row."""
    rows = [[], [4, 5], [6], []]
    full = KVCache.for_model(model.config, 4, 32)
    part = KVCache.for_model(model.config, 4, 32)
    want = forward_rows(model, full, [[1], [4, 5], [6], [2]])
    got = forward_rows(model, part, rows)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2, :1], want[2, :1])
    assert part.lengths.tolist() == [0, 2, 1, 0]
    assert not part.k[:, [0, 3]].any()  # nothing written to the idle rows, not even padding
