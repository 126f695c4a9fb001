"""CUDA graphs for the decode, draft and verify steps: launch-bound steps replayed as one.

At batch 1 a GPT-2 step is hundreds of small kernel launches; a graph replays
them with one. Each (batch, tokens) shape is captured once, on first use, over
the cache's own buffers (preallocated, never reallocated, so the captured
addresses stay valid), and replayed afterwards with fresh inputs copied into
static buffers. The captured forward is GPT.forward(static=True): fixed shapes,
the whole cache attended under the position mask, no host synchronisation.

Without CUDA the same object runs the static forward eagerly, so its logic is
tested on the CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sybil.model.gpt import GPT
from sybil.model.kv_cache import KVCache


@dataclass
class _Captured:
    idx: torch.Tensor
    pos: torch.Tensor
    out: torch.Tensor
    graph: "torch.cuda.CUDAGraph"


class StepGraphs:
    """Replays model.forward(static=True) over one cache, one graph per shape.

    The logits it returns live in a static buffer: read them before the next call.
    """

    def __init__(self, model: GPT, cache: KVCache, capture: bool | None = None) -> None:
        self.model, self.cache = model, cache
        self.capture = model.device.type == "cuda" if capture is None else capture
        if self.capture and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.capture_s = 0.0  # time spent capturing, reported apart from decoding
        self._pool = None

    def __call__(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for idx [B, T] written at positions pos [B, T] (host tensors)."""
        dev = self.model.device
        if not self.capture:
            return self.model(idx.to(dev), self.cache, pos.to(dev), static=True)
        key = (idx.shape[0], idx.shape[1])
        if key not in self.graphs:
            self.graphs[key] = self._capture_shape(key)
        g = self.graphs[key]
        g.idx.copy_(idx, non_blocking=True)
        g.pos.copy_(pos, non_blocking=True)
        g.graph.replay()
        return g.out

    def _capture_shape(self, shape: tuple[int, int]) -> _Captured:
        start = time.perf_counter()
        dev = self.model.device
        idx = torch.zeros(shape, dtype=torch.long, device=dev)
        # Warm-up and capture write only the scratch slot, which nothing attends to.
        pos = torch.full(shape, self.cache.max_len - 1, dtype=torch.long, device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model(idx, self.cache, pos, static=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model(idx, self.cache, pos, static=True)
        self._pool = graph.pool()
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - start
        return _Captured(idx, pos, out, graph)
