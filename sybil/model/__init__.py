"""GPT-2 written out (gpt), its preallocated KV cache (kv_cache), the runner that packs
rows of tokens into one forward (runner), and CUDA-graph capture of fixed-shape steps."""

from sybil.model.config import GPTConfig
from sybil.model.gpt import GPT
from sybil.model.kv_cache import KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
