"""Quantized weights: their formats and the modules that hold them.

| mode     | linears                                    | head / embedding (tied)      | matmul arithmetic |
|----------|--------------------------------------------|------------------------------|-------------------|
| `int8`   | int8, a float32 scale per output channel   | the same                     | int8 x int8 dot products, exact int32 sums (W8A8) |
| `int4`   | 4-bit, a float16 scale per 32 columns      | int8 as in `int8`            | int8 x int4 dot products, exact int32 sums |
| `int8wo` | int8 as in `int8`, packed for float math   | the same                     | weights converted to float32 (weight-only; the most accurate) |

Activations of `int8` and `int4` are quantized row by row at the input of every linear,
a float32 scale per block of 32 columns (csrc/int_linear.h): per-row scales lose a
few points of top-1 agreement once GPT-2's outlier channels are there (the README's
accuracy table), blocks keep them apart. The head stays int8 under `int4`: it is 14%
of gpt2-medium's weights but sets every logit (the README measures both).

sybil.matmul says which kernel serves each format and why.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sybil import matmul, memory

MODES = ("int8", "int4", "int8wo")
QK = 32  # columns per quantization block (activations, and int4 weight groups)
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength (the paper's default for OPT/BLOOM)


ROW_CHUNK = 256  # output rows quantized at a time (a multiple of 8, the packed blocks' height)


def _by_rows(fn, weight: torch.Tensor):
    """fn over ROW_CHUNK output rows at a time, the results concatenated along rows.
    Every format here treats a row (a block of 8 rows) on its own, so the bits are those
    of one call; but a chunk's float temporaries stay in cache, where a whole matrix's
    (gpt2-medium's c_fc: 16 MB a pass, five passes) go through memory and fault in fresh
    pages. gpt2-medium's weights, 2-core Zen 3, three alternating processes each: int8
    0.78-1.20 s whole, 0.35-0.61 s in chunks; int4 1.89-2.38 s and 1.06-1.22 s."""
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


def _check_k(k: int, what: str) -> None:
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
    _check_k(k, "int8")
    # [N8 * 8, K] -> [N8, 8 rows, K/32, 8 quads, 4] -> [N8, K/32, 8 quads, 8 rows, 4]
    return _pad_rows(q).view(-1, 8, k // QK, 8, 4).permute(0, 2, 3, 1, 4).contiguous()


def quantize_q4(weight: torch.Tensor) -> torch.Tensor:
    """4-bit groups of 32 columns, llama.cpp Q4_0's rounding: per group the value of
    largest magnitude maps to -8, d = it / -8 (stored in float16), q = round(w / d) in
    [-8, 7], stored as q + 8. Returns uint8 [N / 8, K / 32, 144]: per group of 8 rows,
    4 quads x 8 rows x 4 bytes of nibbles (quad j, byte c: column 4j + c low, 16 + 4j + c
    high; one kernel load holds the 8 rows' quad), then 8 float16 d's."""
    n, k = weight.shape
    _check_k(k, "int4")
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


class Int8WOLinear(nn.Module):
    """Weight-only int8 (`int8wo`): a packed int8 weight and a float32 scale per output
    channel; the matmul is float (sybil.matmul says why packed)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int8WOLinear":
        q, scale = quantize_int8(weight)
        packed = memory.rehome(pack_int8(q))  # in 2 MiB pages on the CPU: sybil.memory says why
        return cls(packed, scale, None if bias is None else bias.detach())

    matmul = staticmethod(matmul.linear_int8)

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

    matmul = staticmethod(matmul.linear_q8)


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
        return matmul.linear_q4(x, self.packed, self.bias)

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


def calibration_tokens() -> torch.Tensor:
    """The built-in calibration text (assets/calibration.txt), tokenized: [1, T]."""
    from importlib import resources

    from sybil.tokenizer import encode

    text = resources.files("sybil").joinpath("assets/calibration.txt").read_text()
    return torch.tensor([encode(text)])


@torch.no_grad()
def smooth(model, tokens: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> None:
    """SmoothQuant (Xiao et al. 2023), folded into the layer norms: for each input channel
    j of c_attn and c_fc, s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) from the activations
    of `tokens`; ln weight and bias are divided by s, the weight's column j multiplied by
    it. The float function is unchanged; an outlier channel's size moves into the weights,
    where a per-output-channel scale absorbs it, so the activation blocks keep their
    resolution."""
    pairs = [(b.ln_1, b.attn.c_attn) for b in model.h] + [(b.ln_2, b.mlp.c_fc) for b in model.h]
    amax: dict[int, torch.Tensor] = {}
    hooks = [ln.register_forward_hook(lambda m, i, o, j=j: amax.__setitem__(j, o.detach().abs().flatten(0, -2).amax(0)))
             for j, (ln, _) in enumerate(pairs)]
    c = model.config
    tokens = tokens[:, : c.n_positions] % c.vocab_size  # a test model's smaller vocabulary or context
    try:
        model(tokens.to(model.device), vocab=0)  # the layer norms are all it needs: no head
    finally:
        for h in hooks:
            h.remove()
    for j, (ln, lin) in enumerate(pairs):
        ax = amax[j].float().clamp(min=1e-5)
        aw = lin.weight.detach().float().abs().amax(0).clamp(min=1e-5)  # per input channel
        s = (ax.pow(alpha) / aw.pow(1 - alpha)).clamp(min=1e-5).to(lin.weight.dtype)
        ln.weight.div_(s)
        ln.bias.div_(s)
        lin.weight.mul_(s)


LINEARS = {"int8": Int8Linear, "int4": Int4Linear, "int8wo": Int8WOLinear}
HEADS = {"int8": Int8Linear, "int4": Int8Linear, "int8wo": Int8WOLinear}


@torch.no_grad()
def quantize_model(model, mode: str, smooth_first: bool = True):
    """Make every linear of a sybil.model.GPT and its tied head `mode`, in place,
    dropping each float weight as soon as its quantized copy exists (gpt2-xl in
    float32 is 6 GB). int8 and int4 fold SmoothQuant in first unless smooth_first is
    False (bench.accuracy's comparison)."""
    if mode not in MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; use one of {', '.join(MODES)}")
    if model.quantized:
        if model.quantized != mode:
            raise ValueError(f"the model is already {model.quantized}")
        return model
    if mode != "int8wo":
        _check_k(model.config.n_embd, mode)
        if smooth_first:  # int8 activations: outlier channels into the weights first
            smooth(model, calibration_tokens())
    lin = LINEARS[mode]
    for block in model.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj")):
            old = getattr(parent, name)
            setattr(parent, name, lin.from_weight(old.weight, old.bias))
    dtype = model.dtype
    model.lm_head = HEADS[mode].from_weight(model.wte.weight, None)
    model.wte = QuantEmbedding(model.lm_head, dtype)
    model.quant_mode = mode
    return model
