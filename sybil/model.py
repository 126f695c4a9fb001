"""GPT-2, written out: token + position embeddings, pre-norm blocks, tied LM head.

Module names follow the Hugging Face checkpoint (wte, h.N.attn.c_attn, ...) so the
loader's key map is nearly the identity; the four Conv1D weights are stored as
plain nn.Linear weights, transposed once at load time.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sybil.config import GPTConfig
from sybil.kv_cache import KVCache


class Linear(nn.Linear):
    """nn.Linear, computed as W @ x.T for a few float32 rows on the CPU.

    Measured on the 2-core AVX2 machine (gpt2-medium, 256 cached tokens): MKL's
    float32 x @ W.T with 5 rows costs about 3x one row, while W @ x.T costs about
    1.6x, which is what makes verifying K drafts in one forward pay off.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not (x.dtype == torch.float32 and x.device.type == "cpu" and 1 < rows <= 16):
            return F.linear(x, self.weight, self.bias)
        xt = x.reshape(rows, x.shape[-1]).t()  # [K, rows], a view
        y = torch.mm(self.weight, xt) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, xt)
        return y.t().reshape(*x.shape[:-1], -1)  # [N, rows] -> [..., N]


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int, pos: torch.Tensor
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
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
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int, pos: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, layer, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in every GPT-2 checkpoint

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
        *,
        static: bool = False,
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
            span = last + 1
            # A key at position j is visible to a query at position p iff j <= p: [B, 1, T, span].
            mask = (torch.arange(span)[None, None, :] <= pos[:, :, None])[:, None].to(idx.device)
            if input_pos is None:
                cache.lengths = pos[:, -1] + 1
            pos = pos.to(idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for layer, block in enumerate(self.h):
            x = block(x, mask, cache, layer, pos)
        return self.lm_head(self.ln_f(x))
