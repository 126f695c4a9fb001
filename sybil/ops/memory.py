"""Weights and KV caches in 2 MiB pages (Linux transparent huge pages), on the CPU.

Why: a decode step streams every weight from memory once. With 4 KiB pages that
stream crosses a page, and misses the TLB, every 4 KiB, and the hardware
prefetcher stops at each page boundary (about a tenth of a decode step, measured:
bench/results/). torch's allocator asks for huge pages only
under THP_MEM_ALLOC_ENABLE=1, which a library cannot set once torch has
allocated, so the big tensors are copied into anonymous mappings advised with
MADV_HUGEPAGE. The bits are the same; only where they live changes.

Where the kernel offers no huge pages (THP "never", not Linux), tensors are
left as they are.
"""

from __future__ import annotations

import mmap
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

HUGE_PAGE = 2 << 20
MIN_BYTES = HUGE_PAGE  # smaller tensors would not fill one huge page


@lru_cache(maxsize=1)
def huge_pages_available() -> bool:
    """Whether anonymous memory advised MADV_HUGEPAGE can get huge pages here."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def _mapped(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor of nbytes starting on a 2 MiB boundary of its own private
    anonymous mapping, advised MADV_HUGEPAGE. The tensor keeps the mapping alive."""
    # Whole huge pages past the aligned start: a huge page is only used where all of it
    # lies inside the mapping, so a tail of nbytes + 2 MiB could miss the last one (or,
    # for a tensor under 2 MiB, the only one, as the tests saw with another mmap layout).
    pages = -(-nbytes // HUGE_PAGE)
    m = mmap.mmap(-1, (pages + 1) * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(m, dtype=torch.uint8)  # holds a reference to m
    start = (-raw.data_ptr()) % HUGE_PAGE
    return raw[start : start + nbytes]


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape, dtype) on the CPU, in huge pages when large enough and available.
    Pages are only allocated when first touched (a long cache costs what it holds)."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if nbytes < MIN_BYTES or not huge_pages_available():
        return torch.zeros(shape, dtype=dtype)
    return _mapped(nbytes).view(dtype).view(shape)


def rehome(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU tensor in huge pages, or t itself when it is small,
    not on the CPU, or huge pages are unavailable."""
    if t.device.type != "cpu" or t.numel() * t.element_size() < MIN_BYTES or not huge_pages_available():
        return t
    out = zeros(tuple(t.shape), t.dtype)
    out.copy_(t)
    return out


@torch.no_grad()
def rehome_module(module: nn.Module) -> int:
    """Move every large CPU parameter and buffer of module into huge pages, one at a time
    (so the peak is one tensor more, not a second model). Each tensor keeps its identity
    (its data is swapped in place), so tied parameters stay tied and every holder of a
    buffer sees the new data. Returns the bytes moved."""
    moved = 0
    seen: set[int] = set()
    for sub in module.modules():
        for t in [*sub._parameters.values(), *sub._buffers.values()]:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            data = t.data  # a new tensor object on every access: compare against one
            new = rehome(data)
            if new is not data:
                t.data = new
                moved += new.numel() * new.element_size()
    return moved
