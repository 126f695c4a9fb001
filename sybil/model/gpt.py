"""GPT-2, written out: token + position embeddings, pre-norm blocks, tied LM head.

Module names follow the Hugging Face checkpoint (wte, h.N.attn.c_attn, ...) so the
loader's key map is nearly the identity; the four Conv1D weights are stored as
plain nn.Linear weights, transposed once at load time.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sybil.model.config import GPTConfig
from sybil.model.kv_cache import KVCache
from sybil.ops import dispatch


class Linear(nn.Linear):
    """nn.Linear whose matmul is chosen by sybil.ops.dispatch (the C++ kernels on the CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.linear(x, self.weight, self.bias)

    def kernel_args(self) -> list[torch.Tensor | None]:
        """(weight, bias, scale) as torch.ops.sybil.linear takes them. Read from the
        module's dicts: nn.Module.__getattr__ for every tensor of every block, every
        forward, cost about 1 ms (of an 11 ms draft step); the dicts, 0.05 ms."""
        p = self._parameters
        return [p["weight"], p.get("bias"), None]

    def rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Outputs start..stop-1 only, from a slice of the weight (a view, no copy)."""
        bias = None if self.bias is None else self.bias[start:stop]
        return dispatch.linear(x, self.weight[start:stop], bias)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int, pos: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x)
        if cache is not None:
            y = dispatch.attend_cached(qkv, cache.k[layer], cache.v[layer], pos, self.n_head, rows)
            if y is not None:
                return self.c_proj(y)
        q, k, v = qkv.split(C, dim=2)
        # [B, T, C] -> [B, H, T, D]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            cache.write(layer, k, v, pos)
            k_all, v_all = cache.view(layer, mask.shape[-1])
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, H, T, D] -> [B, T, C]
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(dispatch.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int, pos: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, layer, pos, rows)
        return x + self.mlp(self.ln_2(x))

    def kernel_args(self) -> list[torch.Tensor | None]:
        """This block's 16 tensors in the order torch.ops.sybil.blocks reads them."""
        mods = self._modules  # the dicts, not nn.Module.__getattr__: see Linear.kernel_args
        a, m = mods["attn"]._modules, mods["mlp"]._modules
        ln_1, ln_2 = mods["ln_1"]._parameters, mods["ln_2"]._parameters
        return [ln_1["weight"], ln_1["bias"], *a["c_attn"].kernel_args(), *a["c_proj"].kernel_args(),
                ln_2["weight"], ln_2["bias"], *m["c_fc"].kernel_args(), *m["c_proj"].kernel_args()]


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num, dim), the same N(0, 1) draw, but none on the meta device (where
    the loader builds): there torch's normal_ imports torch._dynamo, 2.4 s of every
    process's start on the 2-core machine, for weights the checkpoint replaces."""
    weight = torch.empty(num, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(num, dim, _weight=weight)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = _embedding(config.vocab_size, config.n_embd)
        self.wpe = _embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in every GPT-2 checkpoint
        self.quant_mode: str | None = None  # set by sybil.quant.quantize_model

    @property
    def device(self) -> torch.device:
        return self.ln_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations and cache); quantized weights compute in it too."""
        return self.ln_f.weight.dtype

    @property
    def quantized(self) -> str | None:
        """None, or the sybil.quant mode its weights are in (int8, int4, int8wo): set by
        sybil.quant.quantize_model, which converts the linears in place."""
        return self.quant_mode


    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
        *,
        static: bool = False,
        vocab: int | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for every position of idx [B, T].

        With a cache and no input_pos, the tokens are appended at each row's
        length pointer, which then moves past them. With input_pos [B, T] they
        are written there and the pointers are the caller's to move. Each token
        attends to every cached key at or before its own position. Verification
        needs the logits of every position, so none are dropped.

        static=True (with a cache and input_pos on the model's device) keeps
        shapes fixed and never synchronises with the host: it attends over the
        whole cache, which is what CUDA graph capture needs.

        vocab=N computes the logits of ids below N and of the last id (GPT-2's
        <|endoftext|>) only, and gives the rest -inf: the reduced-vocabulary draft
        head of FR-Spec (Zhao et al., 2025). GPT-2's ids are BPE merge ranks, so
        low ids are the common tokens, and the head reads a prefix of the tied
        embedding, a view. vocab=0 skips the head and returns the last block's
        output [B, T, C]: a prefill only needs the cache it writes.

        rows [T] (CPU only, with input_pos [1, T]) packs several cache rows into one
        sequence without padding: token t is written to and attends within cache row
        rows[t], so a forward costs the real tokens only (sybil.model.runner).
        """
        B, T = idx.shape
        if cache is None:
            pos = torch.arange(T, device=idx.device)[None].expand(B, T) if input_pos is None else input_pos
            mask = None
        elif static:
            pos = input_pos
            key_pos = torch.arange(cache.max_len, device=idx.device)
            mask = (key_pos[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, max_len]
        else:
            pos = cache.next_positions(T) if input_pos is None else input_pos.cpu()
            last = int(pos.max())
            if last >= min(cache.max_len, self.config.n_positions):
                raise ValueError(
                    f"position {last} is past the cache length {cache.max_len} "
                    f"or the model's context {self.config.n_positions}"
                )
            # A key at position j is visible to a query at position p iff j <= p: [B, 1, T, span].
            # On the CPU, sybil.dispatch.attend_cached applies that rule itself, so no mask is built.
            mask = None
            if idx.device.type != "cpu":
                mask = (torch.arange(last + 1)[None, None, :] <= pos[:, :, None])[:, None].to(idx.device)
            if input_pos is None:
                cache.lengths = pos[:, -1] + 1
            pos = pos.to(idx.device)
        x = self.wte(idx) + self.wpe(pos)
        if rows is not None and (mask is not None or static or idx.device.type != "cpu"):
            raise ValueError("a packed forward (rows) runs on the CPU, with positions and a cache")
        fused = None if cache is None or mask is not None else dispatch.blocks(x, self.h, cache.k, cache.v, pos, rows)
        if fused is not None:
            x = fused
        else:
            for layer, block in enumerate(self.h):
                x = block(x, mask, cache, layer, pos, rows)
        return x if vocab == 0 else self.head(x, vocab)

    def head(self, x: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
        """Logits [..., V] from the last block's output (see forward for vocab)."""
        x = self.ln_f(x)
        V = self.config.vocab_size
        if vocab is None or vocab >= V - 1:
            return self.lm_head(x)
        logits = x.new_full((*x.shape[:-1], V), float("-inf"))
        logits[..., :vocab] = self.lm_head.rows(x, 0, vocab)
        logits[..., V - 1 :] = self.lm_head.rows(x, V - 1, V)
        return logits


def weight_bytes(model: GPT) -> int:
    """Bytes read per decoded token: every weight once (named_parameters counts the tied
    head once), int8 ones and their scales included; wpe is read one row, so not counted."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return sum(p.numel() * p.element_size() for n, p in tensors if n != "wpe.weight")
