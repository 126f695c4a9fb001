"""The cache: cached equals uncached, rewinding is a pointer move, stale entries stay invisible."""

import pytest
import torch

import sybil
from sybil.model.kv_cache import KVCache

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return sybil.load_model(hf_checkpoint("small"))


def _seq(n, seed=0, vocab=50257):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_cached_equals_uncached(model):
    seq = _seq(48)
    full = model(seq)[0]
    cache = KVCache.for_model(model.config, 1, 64)
    parts = [model(seq[:, :20], cache)[0]]
    for t in range(20, 48, 7):  # multi-token chunks, as verification feeds them
        parts.append(model(seq[:, t : t + 7], cache)[0])
    assert torch.allclose(torch.cat(parts), full, atol=1e-5)
    assert cache.lengths.tolist() == [48]


def test_truncate_then_redecode_equals_fresh_run(model):
    a, b = _seq(40, 1), _seq(10, 2)
    cache = KVCache.for_model(model.config, 1, 64)
    model(a, cache)
    cache.truncate(25)
    got = model(b, cache)[0]
    fresh = model(torch.cat([a[:, :25], b], 1))[0, 25:]
    assert torch.allclose(got, fresh, atol=1e-5)


def test_truncate_is_a_pointer_move_and_stale_entries_are_never_attended(model):
    cache = KVCache.for_model(model.config, 1, 64)
    k_ptr, v_ptr = cache.k.data_ptr(), cache.v.data_ptr()
    model(_seq(50, 3), cache)
    before = cache.k.clone()
    cache.truncate(20)
    assert cache.k.data_ptr() == k_ptr and cache.v.data_ptr() == v_ptr
    assert torch.equal(cache.k, before)  # nothing copied, cleared or moved
    # Poison everything past the pointer: a read of any stale slot would show.
    cache.k[:, :, :, 20:] = float("nan")
    cache.v[:, :, :, 20:] = 1e6
    nxt = _seq(5, 4)
    got = model(nxt, cache)[0]
    fresh = model(torch.cat([_seq(50, 3)[:, :20], nxt], 1))[0, 20:]
    assert torch.isfinite(got).all()
    assert torch.allclose(got, fresh, atol=1e-5)


def test_rows_have_their_own_pointers(model):
    cache = KVCache.for_model(model.config, 2, 64)
    seqs = torch.cat([_seq(30, 5), _seq(30, 6)])
    model(seqs, cache)
    cache.truncate([12, 30])
    assert cache.lengths.tolist() == [12, 30]
    # Row 0 continues at 12, row 1 at 30: positions come from each row's pointer.
    step = _seq(2, 7).reshape(2, 1)
    got = model(step, cache)[:, 0]
    want0 = model(torch.cat([seqs[:1, :12], step[:1]], 1))[0, -1]
    want1 = model(torch.cat([seqs[1:], step[1:]], 1))[0, -1]
    assert torch.allclose(got[0], want0, atol=1e-5) and torch.allclose(got[1], want1, atol=1e-5)
    assert cache.lengths.tolist() == [13, 31]


def test_truncate_refuses_to_move_forward_or_below_zero(model):
    cache = KVCache.for_model(model.config, 1, 16)
    model(_seq(5), cache)
    with pytest.raises(ValueError):
        cache.truncate(6)
    with pytest.raises(ValueError):
        cache.truncate(-1)


def test_writing_past_the_cache_is_an_error(model):
    cache = KVCache.for_model(model.config, 1, 8)
    with pytest.raises(ValueError, match="past the cache"):
        model(_seq(9), cache)


def test_a_row_view_shares_the_buffers_and_has_its_own_pointers(model):
    cache = KVCache.for_model(model.config, 3, 16)
    cache.advance([4, 5, 6])
    rows = cache.rows(1, 3)
    assert rows.batch == 2 and rows.lengths.tolist() == [5, 6]
    assert rows.k.data_ptr() == cache.k[:, 1].data_ptr()  # a view, not a copy
    rows.k[:, 0, :, 5] = 7.0
    assert (cache.k[:, 1, :, 5] == 7.0).all() and (cache.k[:, [0, 2], :, 5] == 0).all()
    rows.advance([2, 1])
    assert cache.lengths.tolist() == [4, 5, 6]  # the parent's pointers move only by set_lengths
    cache.set_lengths(1, rows.lengths)
    assert cache.lengths.tolist() == [4, 7, 7]
    cache.set_lengths(0, [0])
    assert cache.lengths.tolist() == [0, 7, 7]
    with pytest.raises(ValueError):
        cache.set_lengths(0, [17])


def _resident_bytes() -> int:
    import os
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="reads Linux's /proc/self/statm")
def test_prefault_backs_every_page_and_keeps_the_entries():
    cache = KVCache(2, 1, 4, 2048, 1024)  # 2 x 64 MiB, backed only where written
    k, v = torch.randn(1, 4, 8, 1024), torch.randn(1, 4, 8, 1024)
    cache.write(0, k, v, torch.arange(8)[None])  # layer 0: one page per head (at most 1/8 of it)
    held_k, held_v = cache.k[:, :, :, :8].clone(), cache.v[:, :, :, :8].clone()
    before = _resident_bytes()
    cache.prefault()
    grown = _resident_bytes() - before
    total = 2 * cache.k.numel() * cache.k.element_size()
    assert grown > 0.75 * total  # most of the 128 MiB was not backed before
    assert torch.equal(cache.k[:, :, :, :8], held_k) and torch.equal(cache.v[:, :, :, :8], held_v)
    assert int(cache.k[:, :, :, 8:].abs().sum()) == 0
