"""Sybil: a from-scratch GPT-2 inference engine with lossless speculative decoding."""

from sybil.engine.generate import generate
from sybil.engine.sequence import Generation
from sybil.errors import SybilError
from sybil.model.config import GPTConfig
from sybil.model.gpt import GPT
from sybil.model.kv_cache import KVCache
from sybil.spec.adaptive import AdaptiveK
from sybil.spec.batch_k import BatchK
from sybil.weights.loader import load_model
from sybil.weights.tokenizer import decode, encode

__all__ = ["AdaptiveK", "BatchK", "GPT", "GPTConfig", "Generation", "KVCache", "SybilError", "decode", "encode",
           "generate", "load_model"]
