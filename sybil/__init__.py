"""Sybil: a from-scratch GPT-2 inference engine with lossless speculative decoding."""

from sybil.adaptive import AdaptiveK
from sybil.batch_k import BatchK
from sybil.config import GPTConfig
from sybil.engine import Generation, generate
from sybil.errors import SybilError
from sybil.kv_cache import KVCache
from sybil.loader import load_model
from sybil.model import GPT

__all__ = ["AdaptiveK", "BatchK", "GPT", "GPTConfig", "Generation", "KVCache", "SybilError", "generate", "load_model"]
