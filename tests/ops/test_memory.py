"""sybil.ops.memory: big CPU tensors live in mappings advised for 2 MiB pages, with the same bits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import sybil
from sybil.model.config import GPTConfig
from sybil.model.gpt import GPT
from sybil.model.kv_cache import KVCache
from sybil.ops import memory

needs_thp = pytest.mark.skipif(not memory.huge_pages_available(), reason="no transparent huge pages on this machine")


def _advised(t: torch.Tensor) -> bool:
    """Whether t's first byte lies in a mapping the kernel may back with huge pages
    (/proc/self/smaps: THPeligible), read from the kernel, not from sybil."""
    addr = t.data_ptr()
    text = Path("/proc/self/smaps").read_text()
    for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) .*?\n(.*?)(?=^[0-9a-f]+-|\Z)", text, re.M | re.S):
        lo, hi = int(m.group(1), 16), int(m.group(2), 16)
        if lo <= addr < hi:
            flag = re.search(r"THPeligible:\s+(\d)", m.group(3))
            return bool(flag and flag.group(1) == "1")
    raise AssertionError("address not mapped")


@needs_thp
def test_rehome_keeps_values_and_moves_into_huge_page_memory():
    t = torch.randn(1024, 1024)  # 4 MiB
    r = memory.rehome(t)
    assert r is not t and torch.equal(r, t) and r.dtype == t.dtype and r.is_contiguous()
    assert r.data_ptr() % memory.HUGE_PAGE == 0
    assert _advised(r)


def test_small_tensors_stay_where_they_are():
    t = torch.randn(16, 16)
    assert memory.rehome(t) is t


@needs_thp
def test_rehome_module_keeps_ties_and_outputs(monkeypatch):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, n_positions=64, n_embd=128, n_layer=2, n_head=4)
    model = GPT(config).eval()  # its weights are below one huge page, in torch's heap
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(idx)
        monkeypatch.setattr(memory, "MIN_BYTES", 4096)  # so that they move
        big = [p for p in model.parameters() if p.numel() * p.element_size() >= 4096]
        assert big and not any(_advised(p) for p in big)
        moved = memory.rehome_module(model)
        after = model(idx)
    assert moved == sum(p.numel() * p.element_size() for p in big)
    assert model.lm_head.weight is model.wte.weight  # still tied
    assert all(_advised(p) for p in big)
    assert torch.equal(before, after)


@needs_thp
@pytest.mark.parametrize("quantize, dtype", [(None, "float32"), (None, "bfloat16"), ("int8", "float32")])
def test_load_model_puts_large_weights_in_huge_page_memory(hf_checkpoint, monkeypatch, quantize, dtype):
    monkeypatch.setattr(memory, "MIN_BYTES", 4096)
    model = sybil.load_model(hf_checkpoint("small"), dtype, quantize=quantize)
    weights = [model.lm_head.packed if quantize else model.lm_head.weight, model.h[0].mlp.c_fc.weight
               if not quantize else model.h[0].mlp.c_fc.packed]
    assert all(_advised(w) for w in weights)


@needs_thp
def test_kv_cache_buffers_are_zeroed_huge_page_memory():
    cfg = GPTConfig.from_name("gpt2")
    cache = KVCache.for_model(cfg, batch=1, max_len=256)
    assert _advised(cache.k) and _advised(cache.v)
    assert not cache.k.any() and not cache.v.any()


@needs_thp
def test_rehome_module_moves_buffers_in_place():
    module = torch.nn.Module()
    module.register_buffer("packed", torch.randint(-127, 128, (2048, 1024), dtype=torch.int8))  # 2 MiB
    held, before = module.packed, module.packed.clone()  # e.g. Int8Embedding holds its head's buffer
    assert memory.rehome_module(module) == 2 << 20
    assert module.packed is held and torch.equal(held, before) and _advised(held)
