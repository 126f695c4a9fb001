"""Which kernel serves each matmul of a forward, and why. The one place that decides.

| call                               | path                                   | why |
|------------------------------------|----------------------------------------|-----|
| CPU linear, float32/bfloat16/`int8wo` weights | `torch.ops.sybil.linear` (C++, AVX2; `csrc/float_linear.h` on 32 registers where AVX512VL is: every pass takes all 8 rows of a block, the same bits) | on every core, the weights read from memory once per call (each 512-column chunk of 8 output channels is reused from L1 by every 3-row pass), float32 accumulation in a fixed order, so a row's result never depends on how many rows share the call |
| CPU linear, `int8` / `int4` weights (sybil.quant) | the same op, `csrc/int_linear.h` | int8 activations (a scale per 32 columns, each row on its own) against int8 or 4-bit weights in integer dot products: 32 products per multiply pair instead of 8 per FMA, where a float32 conversion of every weight made an int8 step compute-bound; exact int32 block sums, blocks summed in a fixed order |
| the same, by CPU flags (`native.int_dot`) | `vpdpbusd` on ymm (AVX512-VNNI with VL, else AVX-VNNI), else AVX2 `vpmaddubsw` + `vpmaddwd` | a multi-token forward is bound by instructions per block: each 32-byte weight load holds 8 output rows (4 columns each for q8, 8 for q4), so a row costs one `vpdpbusd` per load (q8: w xor 0x80 against x itself, from -128 * sum(x)) and one conversion and one FMA per block for all 8 rows; every form sums the same integers, so they give the same bits |
| GPT-2's tanh GELU, the softmax's exp | `torch.ops.sybil.gelu`, `csrc/elementwise.h` (`gelu`) | several times faster than torch's; an element's value depends on it alone, and the fused and block-by-block forwards call the same op, so the same bits; within 1e-6 of the float64 function, where torch's is off by up to 7e-4 of the value between -4 and -1 |
| CPU attention over the cache       | `torch.ops.sybil.attend`               | each query reads keys 0..p of its row in a fixed order: the same bits in a one-token step and inside a verify forward |
| CPU forward with a cache, all blocks | `torch.ops.sybil.blocks` (one call)  | the same ops as `Block.forward` in the same order (same bits), without a dozen Python and dispatcher round trips per block |
| CUDA, and `static=True` steps      | torch (`F.linear`, SDPA)               | cuBLAS / flash kernels; CUDA-graph capture |
| CPU without the kernels (no AVX2, no compiler, `SYBIL_NATIVE=0`) | torch, one row (one query) per call up to 16 rows | still bit-for-bit between step and verify, because every row runs the same one-row kernel; slower |

BLAS picks a different kernel for 1 row than for 9, so `F.linear` gives different bits
for the same row; the kernels here never do. Weight-only int8 (`int8wo`) weights are
stored packed, 8 output rows interleaved in groups of 8 columns, so that every block of
rows is one sequential stream (plain rows of 1 KB are too short for the hardware
prefetcher); the integer formats keep the same idea in groups of 32 columns
(sybil.quant.formats). Measured costs: bench/results/.
"""

from __future__ import annotations

import sys
from functools import lru_cache

import torch
import torch.nn.functional as F

from sybil.ops import native

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


def exact_rows(fn, x: torch.Tensor) -> torch.Tensor:
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
        return exact_rows(lambda r: F.linear(r, weight, bias), x)
    return F.linear(x, weight, bias)



def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU. On the kernels' path the C++ one (csrc/elementwise.h), which
    torch.ops.sybil.blocks also runs, so the block-by-block forward gives its bits."""
    if use_kernels(x):
        return torch.ops.sybil.gelu(x)
    return F.gelu(x, approximate="tanh")




def blocks(x: torch.Tensor, layers, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
           rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """Every block (sybil.model.Block) of a forward over the cache [layers, B, H, L, D]
    in one C++ call; None where the kernels do not serve x (the caller then runs the
    blocks one by one). rows: see attend_cached."""
    if not use_kernels(x):
        return None
    first = layers[0]
    params = [t for block in layers for t in block.kernel_args()]
    return torch.ops.sybil.blocks(x, k_cache, v_cache, pos, first.attn.n_head, first.ln_1.eps, params, rows)


def attend_cached(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, n_head: int,
                  rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """Write this forward's keys and values into one layer's cache [B, H, L, D] at pos
    [B, T] and attend each query to keys 0..p of its row: [B, T, C]. None off the CPU
    (the caller then uses SDPA with a position mask). A packed forward (qkv [1, N, 3C]:
    several rows' tokens one after another, no padding) gives rows [N], each token's
    cache row."""
    if qkv.device.type != "cpu":
        return None
    if use_kernels(qkv):
        return torch.ops.sybil.attend(qkv, k_cache, v_cache, pos, n_head, rows)
    return _attend_per_query(qkv, k_cache, v_cache, pos, n_head, rows)


def _attend_per_query(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                      n_head: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """attend_cached in torch: one SDPA call per query over exactly its keys 0..p, so
    its bits do not depend on the other queries of the forward."""
    B, T, C3 = qkv.shape
    D = C3 // 3 // n_head
    q, k, v = qkv.view(B, T, 3, n_head, D).unbind(2)  # each [B, T, H, D]
    cache_rows = torch.arange(B)[:, None].expand(B, T) if rows is None else rows.view(1, T)  # [B, T]
    # Advanced indices around a slice put the indexed dims first: [B, T, H, D].
    k_cache[cache_rows, :, pos] = k
    v_cache[cache_rows, :, pos] = v
    y = torch.empty(B, T, n_head, D, dtype=qkv.dtype)
    for b in range(B):
        for t in range(T):
            p, r = int(pos[b, t]) + 1, int(cache_rows[b, t])
            # [H, 1, D] against [H, p, D]
            y[b, t] = F.scaled_dot_product_attention(q[b, t, :, None], k_cache[r, :, :p], v_cache[r, :, :p])[:, 0]
    return y.view(B, T, C3 // 3)
