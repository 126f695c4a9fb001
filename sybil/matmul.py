"""Which kernel serves each matmul of a forward, and why. The one place that decides.

| call                               | path                                   | why |
|------------------------------------|----------------------------------------|-----|
| CPU linear, float32/bfloat16/int8  | `torch.ops.sybil.linear` (C++, AVX2)   | on every core, the weights read from memory once per call (each 512-column chunk of 8 output channels is reused from L1 by every 3-row pass), float32 accumulation in a fixed order, so a row's result never depends on how many rows share the call |
| CPU attention over the cache       | `torch.ops.sybil.attend`               | each query reads keys 0..p of its row in a fixed order: the same bits in a one-token step and inside a verify forward |
| CPU forward with a cache, all blocks | `torch.ops.sybil.blocks` (one call)  | the same ops as `Block.forward` in the same order (same bits), without a dozen Python and dispatcher round trips per block |
| CUDA, and `static=True` steps      | torch (`F.linear`, SDPA)               | cuBLAS / flash kernels; CUDA-graph capture |
| CPU without the kernels (no AVX2, no compiler, `SYBIL_NATIVE=0`) | torch, one row (one query) per call up to 16 rows | still bit-for-bit between step and verify, because every row runs the same one-row kernel; slower |

Measured on the 2-core AVX2 machine (gpt2-medium layer shapes, 96 linears, one run):
float32 one row 86 ms against 169 ms for `F.linear` (which runs one core), nine rows 140 ms
against 532 ms; bfloat16 one row 56 ms (`F.linear` 49 ms, but 341 ms for nine rows); int8
one row 45 ms. BLAS picks a different kernel for 1 row than for 9, so `F.linear` gives
different bits for the same row (max 2.2e-5 in float32, 0.14 in bfloat16 at the logits).

int8 is weight-only: symmetric, one float32 scale per output channel, activations in
the compute dtype. Its weights are stored packed (`pack_int8`), 8 output rows
interleaved in groups of 8 columns, so that every block of rows is one sequential
stream: plain rows of 1 KB (K = 1024) read at 5.5 GB/s, too short for the hardware
prefetcher.
"""

from __future__ import annotations

import sys
from functools import lru_cache

import torch
import torch.nn.functional as F

from sybil import native

EXACT_ROWS = 16  # the torch fallback loops over rows up to here, so steps and verifies agree bit for bit


@lru_cache(maxsize=1)
def _say_fallback(reason: str) -> None:
    """Once per process: the user should know why decoding is slower than it could be."""
    print(f"sybil: CPU kernels unavailable ({reason}); using torch's, slower", file=sys.stderr)


def use_kernels(x: torch.Tensor) -> bool:
    """Whether the C++ kernels serve this activation (CPU, float32/bfloat16, built)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if native.available():
        return True
    _say_fallback(native.why_unavailable())
    return False


def _rows(fn, x: torch.Tensor) -> torch.Tensor:
    """fn over x [..., K] one row at a time (up to EXACT_ROWS), so each row's bits are
    those of a one-row call; longer inputs (prompts) go through in one call."""
    flat = x.reshape(-1, x.shape[-1])
    if not 1 < flat.shape[0] <= EXACT_ROWS:
        return fn(x)
    out = torch.cat([fn(flat[i : i + 1]) for i in range(flat.shape[0])])
    return out.reshape(*x.shape[:-1], -1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for a float weight [N, K]."""
    if use_kernels(x):
        return torch.ops.sybil.linear(x, weight, bias, None)
    if x.device.type == "cpu":
        return _rows(lambda r: F.linear(r, weight, bias), x)
    return F.linear(x, weight, bias)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [N, K] int8, scale [N] float32), weight ~ q * scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 -> [ceil(N / 8), K / 8, 64]: for each block of 8 rows, the first 8
    columns of each row, then the next 8, ... (rows past N are zero)."""
    n, k = q.shape
    if k % 8:
        raise ValueError(f"int8 packing needs K divisible by 8, got {k}")
    pad = (-n) % 8
    q = torch.cat([q, q.new_zeros(pad, k)]) if pad else q
    # [N8 * 8, K] -> [N8, 8 rows, K/8, 8 cols] -> [N8, K/8, 8 rows, 8 cols]
    return q.view(-1, 8, k // 8, 8).permute(0, 2, 1, 3).reshape(-1, k // 8, 64).contiguous()


def unpack_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The int8 rows [len(rows), K] of a packed weight (an embedding lookup)."""
    blocks = packed[rows // 8]  # [R, K/8, 64]
    r = blocks.shape[0]
    # [R, K/8, 8 rows, 8 cols] -> this row's 8 columns of each group -> [R, K]
    sel = blocks.view(r, -1, 8, 8)[torch.arange(r), :, rows % 8]
    return sel.reshape(r, -1)


def linear_int8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (q * scale).T + bias for a packed int8 weight; the result has x's dtype."""
    if use_kernels(x):
        return torch.ops.sybil.linear(x, packed, bias, scale)
    n = scale.shape[0]
    w = unpack_rows(packed, torch.arange(n, device=packed.device)).to(x.dtype) * scale[:, None].to(x.dtype)
    return _rows(lambda r: F.linear(r, w, bias), x) if x.device.type == "cpu" else F.linear(x, w, bias)


def blocks(x: torch.Tensor, layers, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor
           ) -> torch.Tensor | None:
    """Every block (sybil.model.Block) of a forward over the cache [layers, B, H, L, D]
    in one C++ call; None where the kernels do not serve x (the caller then runs the
    blocks one by one)."""
    if not use_kernels(x):
        return None
    first = layers[0]
    params = [t for block in layers for t in block.kernel_args()]
    return torch.ops.sybil.blocks(x, k_cache, v_cache, pos, first.attn.n_head, first.ln_1.eps, params)


def attend_cached(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, n_head: int
                  ) -> torch.Tensor | None:
    """Write this forward's keys and values into one layer's cache [B, H, L, D] at pos
    [B, T] and attend each query to keys 0..p of its row: [B, T, C]. None off the CPU
    (the caller then uses SDPA with a position mask)."""
    if qkv.device.type != "cpu":
        return None
    if use_kernels(qkv):
        return torch.ops.sybil.attend(qkv, k_cache, v_cache, pos, n_head)
    return _attend_per_query(qkv, k_cache, v_cache, pos, n_head)


def _attend_per_query(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                      n_head: int) -> torch.Tensor:
    """attend_cached in torch: one SDPA call per query over exactly its keys 0..p, so
    its bits do not depend on the other queries of the forward."""
    B, T, C3 = qkv.shape
    D = C3 // 3 // n_head
    q, k, v = qkv.view(B, T, 3, n_head, D).unbind(2)  # each [B, T, H, D]
    rows = torch.arange(B)[:, None]
    # Advanced indices around a slice put the indexed dims first: [B, T, H, D].
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v
    y = torch.empty(B, T, n_head, D, dtype=qkv.dtype)
    for b in range(B):
        for t in range(T):
            p = int(pos[b, t]) + 1
            # [H, 1, D] against [H, p, D]
            y[b, t] = F.scaled_dot_product_attention(q[b, t, :, None], k_cache[b, :, :p], v_cache[b, :, :p])[:, 0]
    return y.view(B, T, C3 // 3)
