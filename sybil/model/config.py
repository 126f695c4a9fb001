"""Model hyper-parameters: one dataclass, named presets, and Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_dict(cls, d: dict) -> "GPTConfig":
        """Read the fields we use from a Hugging Face GPT2Config dict.

        Only plain GPT-2 is supported: a config for another architecture, or one
        that changes the block's maths, is refused rather than silently misread.
        """
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config.json describes a {model_type!r} model; only 'gpt2' is supported")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function {act!r} is not GPT-2's tanh GELU")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if d.get(key):
                raise ValueError(f"config.json sets {key}, which this engine does not implement")
        if not d.get("scale_attn_weights", True) or not d.get("tie_word_embeddings", True):
            raise ValueError("config.json turns off scale_attn_weights or tie_word_embeddings; not GPT-2")
        if d.get("n_inner") not in (None, 4 * d.get("n_embd", 768)):
            raise ValueError("config.json sets n_inner other than 4 * n_embd; not supported")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "GPTConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f))


PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
}
