"""The modules that hold quantized weights, and the exact torch forms of their matmuls.

On the CPU with the kernels built, every format goes to `torch.ops.sybil.linear`
(sybil.ops.dispatch); without them, the forms below compute the same integer dot
products in torch, one row at a time (sybil.ops.dispatch.exact_rows), so a row's bits
never depend on how many rows share the call.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sybil.ops import memory
from sybil.ops import dispatch
from sybil.ops.dispatch import EXACT_ROWS, exact_rows
from sybil.quant.formats import (
    QK,
    dequantize_q4,
    pack_int8,
    pack_q8,
    quantize_activations,
    quantize_int8,
    quantize_q4,
    unpack_rows,
)


def linear_int8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (q * scale).T + bias for a packed int8 weight; the result has x's dtype."""
    if dispatch.use_kernels(x):
        return torch.ops.sybil.linear(x, packed, bias, scale)
    n = scale.shape[0]
    w = unpack_rows(packed, torch.arange(n, device=packed.device)).to(x.dtype) * scale[:, None].to(x.dtype)
    return exact_rows(lambda r: F.linear(r, w, bias), x) if x.device.type == "cpu" else F.linear(x, w, bias)


def linear_q8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (q * scale).T + bias for a q8 weight [N8, K/32, 8, 8, 4] (sybil.quant), in
    integer arithmetic on int8 activations; the result has x's dtype."""
    if dispatch.use_kernels(x):
        return torch.ops.sybil.linear(x, packed, bias, scale)
    n = scale.shape[0]
    q = unpack_rows(packed, torch.arange(n)).view(n, -1, QK)  # [N, G, 32]
    return _rows_int(x, q, scale[:, None], bias)


def linear_q4(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + bias for a q4 weight [N8, K/32, 144] (sybil.quant), in integer
    arithmetic on int8 activations; the result has x's dtype."""
    if dispatch.use_kernels(x):
        return torch.ops.sybil.linear(x, packed, bias, None)
    q, d = dequantize_q4(packed)
    return _rows_int(x, q, d, bias)


def _rows_int(x: torch.Tensor, q: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The integer linears in torch (no kernels): per block, an exact integer dot product
    (in float32: every partial sum is an integer below 2^24), then the blocks summed
    with their scales one row at a time (_rows), so a row's bits never depend on the
    others'. wscale is [N, 1] per channel (q8) or [N, G] per group (q4)."""
    qf = q.float()

    def one(r: torch.Tensor) -> torch.Tensor:
        rq, rs = quantize_activations(r.reshape(-1, r.shape[-1]))
        dots = torch.einsum("mgk,ngk->mng", rq.float(), qf)  # [M, N, G], exact
        y = (dots * wscale[None] * rs[:, None, :]).sum(-1)
        y = y + bias.float() if bias is not None else y
        return y.to(x.dtype).reshape(*r.shape[:-1], -1)

    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] <= EXACT_ROWS:
        return exact_rows(one, x)
    out = torch.cat([one(flat[i : i + EXACT_ROWS]) for i in range(0, flat.shape[0], EXACT_ROWS)])
    return out.reshape(*x.shape[:-1], -1)


class Int8WOLinear(nn.Module):
    """Weight-only int8 (`int8wo`): a packed int8 weight and a float32 scale per output
    channel; the matmul is float (sybil.ops.dispatch says why packed)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int8WOLinear":
        q, scale = quantize_int8(weight)
        packed = memory.rehome(pack_int8(q))  # in 2 MiB pages on the CPU: sybil.ops.memory says why
        return cls(packed, scale, None if bias is None else bias.detach())

    matmul = staticmethod(linear_int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.packed, self.scale, self.bias)

    def kernel_args(self) -> list[torch.Tensor | None]:
        """(weight, bias, scale) as torch.ops.sybil.linear takes them (see model.Linear's)."""
        b = self._buffers
        return [b["packed"], self._parameters.get("bias"), b["scale"]]

    def rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Outputs start..stop-1 only, from whole packed blocks of 8 rows (views, no copy)."""
        lo = start - start % 8
        bias = None if self.bias is None else self.bias[lo:stop]
        y = self.matmul(x, self.packed[lo // 8 : (stop + 7) // 8], self.scale[lo:stop], bias)
        return y[..., start - lo :]

    def int8_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return unpack_rows(self.packed, rows)


class Int8Linear(Int8WOLinear):
    """W8A8 int8 (`int8`): the same weights in the q8 layout, multiplied by int8
    activations in integer arithmetic."""

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int8Linear":
        q, scale = quantize_int8(weight)
        return cls(memory.rehome(pack_q8(q)), scale, None if bias is None else bias.detach())

    matmul = staticmethod(linear_q8)


class Int4Linear(nn.Module):
    """4-bit weights in groups of 32 columns (`int4`), int8 activations, integer arithmetic."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int4Linear":
        return cls(memory.rehome(quantize_q4(weight)), None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_q4(x, self.packed, self.bias)

    def kernel_args(self) -> list[torch.Tensor | None]:
        return [self._buffers["packed"], self._parameters.get("bias"), None]


class QuantEmbedding(nn.Module):
    """Token embeddings read from the int8 head they are tied to (row n is q[n] * scale[n]),
    so a quantized model holds no float copy of its largest matrix."""

    def __init__(self, head: Int8WOLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.head = [head]  # a list: not a submodule, so its buffers are counted once
        self.dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        flat = idx.reshape(-1)
        rows = head.int8_rows(flat).to(self.dtype) * head.scale[flat, None].to(self.dtype)
        return rows.view(*idx.shape, -1)
