"""Quantized weight formats: how int8 and int4 weights, and int8 activations, are laid out.

| mode     | linears                                    | head / embedding (tied)      | matmul arithmetic |
|----------|--------------------------------------------|------------------------------|-------------------|
| `int8`   | int8, a float32 scale per output channel   | the same                     | int8 x int8 dot products, exact int32 sums (W8A8) |
| `int4`   | 4-bit, a float16 scale per 32 columns      | int8 as in `int8`            | int8 x int4 dot products, exact int32 sums |
| `int8wo` | int8 as in `int8`, packed for float math   | the same                     | weights converted to float32 (weight-only; the most accurate) |

Activations of `int8` and `int4` are quantized row by row at the input of every linear,
a float32 scale per block of 32 columns (csrc/int_linear.h): per-row scales lose top-1
agreement once GPT-2's outlier channels are there, blocks keep them apart. The head stays
int8 under `int4`: it sets every logit (docs/quantization.md).

These are plain tensor transforms: they import nothing of Sybil, so the kernels' layout
contract (sybil/ops/csrc/int_linear.h reads these tensors) is in one readable place.
"""

from __future__ import annotations

import torch

MODES = ("int8", "int4", "int8wo")
QK = 32  # columns per quantization block (activations, and int4 weight groups)
ROW_CHUNK = 256  # output rows quantized at a time (a multiple of 8, the packed blocks' height)


def _by_rows(fn, weight: torch.Tensor):
    """fn over ROW_CHUNK output rows at a time, the results concatenated along rows.
    Every format here treats a row (a block of 8 rows) on its own, so the bits are those
    of one call; but a chunk's float temporaries stay in cache, where a whole matrix's
    (gpt2-medium's c_fc: 16 MB a pass, five passes) go through memory and fault in fresh
    pages (about half a load's quantizing time)."""
    parts = [fn(weight[i : i + ROW_CHUNK]) for i in range(0, max(weight.shape[0], 1), ROW_CHUNK)]  # >= 1 part
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [N, K] int8, scale [N] float32), weight ~ q * scale."""
    return _by_rows(_quantize_int8_rows, weight.detach())


def _quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def check_width(k: int, what: str) -> None:
    """The integer formats take whole blocks of QK columns."""
    if k % QK:
        raise ValueError(f"{what} needs a width divisible by {QK}, got {k}; use --quantize int8wo")


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """Weight-only layout: [N, K] int8 -> [ceil(N / 8), K / 8, 64]: for each block of 8
    rows, the first 8 columns of each row, then the next 8, ... (rows past N are zero)."""
    n, k = q.shape
    if k % 8:
        raise ValueError(f"int8 packing needs K divisible by 8, got {k}")
    q = _pad_rows(q)
    # [N8 * 8, K] -> [N8, 8 rows, K/8, 8 cols] -> [N8, K/8, 8 rows, 8 cols]
    return q.view(-1, 8, k // 8, 8).permute(0, 2, 1, 3).reshape(-1, k // 8, 64).contiguous()


def unpack_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The int8 rows [len(rows), K] of a packed weight (an embedding lookup): the
    weight-only layout [N8, K/8, 64] or the q8 one [N8, K/32, 8, 8, 4]."""
    blocks = packed[rows // 8]  # [R, K/8, 64] or [R, K/32, 8 quads, 8 rows, 4]
    r, at = blocks.shape[0], torch.arange(blocks.shape[0])
    if blocks.dim() == 5:  # this row's 4 columns of each quad: [R, K/32, 8, 4]
        return blocks[at, :, :, rows % 8].reshape(r, -1)
    # [R, groups, 8 rows, cols] -> this row's columns of each group -> [R, K]
    return blocks.view(r, blocks.shape[1], 8, -1)[at, :, rows % 8].reshape(r, -1)


def pack_q8(q: torch.Tensor) -> torch.Tensor:
    """Integer-kernel layout: [N, K] int8 -> [ceil(N / 8), K / 32, 8, 8, 4]: for each block
    of 8 rows (one stream) and group of 32 columns, 8 quads of columns, each holding
    the 8 rows' 4 columns (the operand of one vpmaddubsw for all 8 rows)."""
    n, k = q.shape
    check_width(k, "int8")
    # [N8 * 8, K] -> [N8, 8 rows, K/32, 8 quads, 4] -> [N8, K/32, 8 quads, 8 rows, 4]
    return _pad_rows(q).view(-1, 8, k // QK, 8, 4).permute(0, 2, 3, 1, 4).contiguous()


def quantize_q4(weight: torch.Tensor) -> torch.Tensor:
    """4-bit groups of 32 columns, llama.cpp Q4_0's rounding: per group the value of
    largest magnitude maps to -8, d = it / -8 (stored in float16), q = round(w / d) in
    [-8, 7], stored as q + 8. Returns uint8 [N / 8, K / 32, 144]: per group of 8 rows,
    4 quads x 8 rows x 4 bytes of nibbles (quad j, byte c: column 4j + c low, 16 + 4j + c
    high; one kernel load holds the 8 rows' quad), then 8 float16 d's."""
    n, k = weight.shape
    check_width(k, "int4")
    if n % 8:
        raise ValueError(f"int4 needs a multiple of 8 output channels, got {n}")
    return _by_rows(_quantize_q4_rows, weight.detach())


def _quantize_q4_rows(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    w = weight.float().reshape(n, k // QK, QK)  # [N, G, 32]
    idx = w.abs().argmax(-1, keepdim=True)
    d = (w.gather(-1, idx) / -8.0).half()  # [N, G, 1]
    df = d.float()
    inv = torch.where(df != 0, 1.0 / df, torch.zeros_like(df))
    q = (torch.round(w * inv).clamp_(-8, 7) + 8).to(torch.uint8)  # [N, G, 32]
    nib = q[..., :16] | (q[..., 16:] << 4)  # [N, G, 16]
    # [N8 * 8, G, 16] -> [N8, 8 rows, G, 4 quads, 4] -> [N8, G, 4 quads, 8 rows, 4] -> [N8, G, 128];
    # scales [N8, G, 8] as bytes [N8, G, 16]
    nib = nib.view(n // 8, 8, k // QK, 4, 4).permute(0, 2, 3, 1, 4).reshape(n // 8, k // QK, 128)
    scales = d.view(n // 8, 8, k // QK).permute(0, 2, 1).contiguous().view(torch.uint8)
    return torch.cat([nib, scales], dim=-1).contiguous()


def dequantize_q4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, G, 32] int8 in [-8, 7], d [N, G] float32) of a q4 weight: w = q * d."""
    n8, g, _ = packed.shape
    # [N8, G, 4 quads, 8 rows, 4] -> [N8, 8 rows, G, 4 quads, 4] -> [N, G, 16]
    nib = packed[..., :128].reshape(n8, g, 4, 8, 4).permute(0, 3, 1, 2, 4).reshape(n8 * 8, g, 16)
    q = torch.cat([nib & 0x0F, nib >> 4], dim=-1).to(torch.int8) - 8  # [N, G, 32]
    d = packed[..., 128:].contiguous().view(torch.float16).view(n8, g, 8).permute(0, 2, 1).reshape(n8 * 8, g)
    return q, d.float()


def _pad_rows(q: torch.Tensor) -> torch.Tensor:
    pad = (-q.shape[0]) % 8
    return torch.cat([q, q.new_zeros(pad, q.shape[1])]) if pad else q

def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [M, K] -> (q [M, K/32, 32] int8, s [M, K/32] float32), x ~ q * s: each block of
    32 columns scaled by its max |x| / 127 (the kernels' rounding: round half to even)."""
    xb = x.float().reshape(x.shape[0], -1, QK)
    amax = xb.abs().amax(-1)
    c = torch.full_like(amax, 127.0)  # tensor / tensor: torch turns a division by a scalar into a multiply
    inv = torch.where(amax > 0, c / amax, torch.zeros_like(amax))
    return torch.round(xb * inv[..., None]).to(torch.int8), amax / c
