"""Drafters propose tokens; they never decide what is kept (that is sybil.verify).

A drafter sees the committed sequence, proposes up to k tokens with the
distributions they were drawn from, and is told after verification how many
committed tokens its state may keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from sybil.kv_cache import KVCache
from sybil.model import GPT
from sybil.sampling import SamplingParams, probs_from_logits, sample


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None  # [len(tokens), V] sampling distributions; None: deterministic


class Drafter(Protocol):
    def propose(self, committed: list[int], k: int, generator: torch.Generator | None) -> Proposal: ...

    def rewind(self, n_valid: int) -> None:
        """Only the first n_valid tokens of what was last seen and proposed still stand."""


class ModelDrafter:
    """Drafts with a (smaller) GPT-2 and its own KV cache.

    Its cache holds a prefix of committed + proposed tokens; each proposal first
    feeds whatever committed tokens the cache lacks (the prompt on the first
    round, then the one or two tokens that verification added) in one forward.
    min_confidence > 0 stops a proposal once the product of the draft's
    probabilities for its own tokens (its estimate that all are accepted) drops
    below it.
    """

    def __init__(self, model: GPT, params: SamplingParams, max_len: int, min_confidence: float = 0.0) -> None:
        self.model = model
        self.params = params
        self.min_confidence = min_confidence
        self.cache = KVCache.for_model(model.config, 1, max_len, dtype=model.dtype, device=model.device)

    @property
    def context(self) -> int:
        return self.cache.max_len

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        idx = torch.tensor([tokens], device=self.model.device)
        return self.model(idx, self.cache)[0, -1]

    @torch.inference_mode()
    def propose(self, committed: list[int], k: int, generator: torch.Generator | None) -> Proposal:
        k = min(k, self.context - len(committed) + 1)
        if k <= 0:
            return Proposal([], None)
        logits = self._feed(committed[int(self.cache.lengths[0]) :])
        tokens: list[int] = []
        dists = []
        confidence = 1.0
        for i in range(k):
            if self.params.greedy:
                tok = self._pick_greedy(logits, len(committed) + i)
                dists.append(None)
            else:
                q = probs_from_logits(logits, self.params)
                tok = int(sample(q, generator))
                dists.append(q)
            tokens.append(tok)
            if self.min_confidence > 0:
                confidence *= float(torch.softmax(logits.float(), -1)[tok])
                if confidence < self.min_confidence:
                    break
            if i + 1 < k:
                logits = self._feed([tok])
        probs = None if self.params.greedy else torch.stack(dists)
        return Proposal(tokens, probs)

    def _pick_greedy(self, logits: torch.Tensor, position: int) -> int:
        """The greedy draft token for `position`; the benchmark's simulated-acceptance
        drafter overrides this to keep the model's cost but choose the token itself."""
        return int(logits.argmax())

    def rewind(self, n_valid: int) -> None:
        self.cache.truncate(min(n_valid, int(self.cache.lengths[0])))


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens and
    propose what followed it. No model; proposals are deterministic."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, committed: list[int], k: int, generator: torch.Generator | None = None) -> Proposal:
        if k <= 0:
            return Proposal([], None)
        n_tok = len(committed)
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            tail = committed[n_tok - n :]
            for start in range(n_tok - n - 1, -1, -1):
                if committed[start : start + n] == tail:
                    follow = committed[start + n : start + n + k]
                    return Proposal(follow, None)
        return Proposal([], None)

    def rewind(self, n_valid: int) -> None:
        pass
