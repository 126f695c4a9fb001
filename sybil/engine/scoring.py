"""Scoring long texts by strided sliding windows (`python -m sybil.perplexity`, the method
of the Hugging Face perplexity guide): every token but the first is scored exactly once,
each predicted from up to `context` tokens of its window before it, by the same
log-softmax as every other log-probability Sybil reports (sybil.sample.logprobs)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from sybil.model.gpt import GPT
from sybil.model.kv_cache import KVCache
from sybil.sample.logprobs import log_softmax


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; those from `first` on are scored."""

    begin: int
    end: int
    first: int


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The strided sliding windows of the Hugging Face perplexity guide: windows of
    `context` tokens starting at 0, stride, 2*stride, ...; each scores only the
    tokens no earlier window scored, each predicted from the tokens of its window
    before it, so every token but the first is scored exactly once."""
    if not 0 < stride < context:
        raise ValueError(f"the stride ({stride}) must be at least 1 and below the context ({context})")
    out, scored_to = [], 1  # token 0 has nothing before it
    begin = 0
    while scored_to < n_tokens:
        end = min(begin + context, n_tokens)
        out.append(Window(begin, end, scored_to))
        scored_to = end
        begin += stride
    return out


def sliding_nll(
    model: GPT,
    ids: list[int],
    context: int,
    stride: int,
    batch: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) of ids over the strided windows.
    Windows of one length run `batch` at a time (rows are computed independently).
    progress(n) is told after each forward how many tokens it scored."""
    if context > model.config.n_positions:
        raise ValueError(f"the context ({context}) is longer than the model's ({model.config.n_positions})")
    plan = windows(len(ids), context, stride)
    nll, count = 0.0, 0
    i = 0
    while i < len(plan):
        group = [plan[i]]
        while len(group) < batch and i + len(group) < len(plan) and \
                plan[i + len(group)].end - plan[i + len(group)].begin == group[0].end - group[0].begin:
            group.append(plan[i + len(group)])
        i += len(group)
        length = group[0].end - group[0].begin
        idx = torch.tensor([ids[w.begin : w.end] for w in group], device=model.device)  # [B, L]
        cache = KVCache.for_model(model.config, len(group), length, dtype=model.dtype, device=model.device)
        hidden = model(idx, cache, vocab=0)  # [B, L, C]: the head runs per window below
        for b, w in enumerate(group):
            lo = w.first - w.begin  # the first scored token's index in the window
            logits = model.head(hidden[b, lo - 1 : length - 1])  # [n, V]: position j predicts token j + 1
            targets = torch.tensor(ids[w.first : w.end], device=logits.device)
            lp = log_softmax(logits).gather(-1, targets[:, None])[:, 0]
            nll -= float(lp.double().sum())
            count += len(targets)
            if progress:
                progress(len(targets))
    return nll, count


def perplexity(nll: float, count: int) -> float:
    return math.exp(nll / count) if count else float("nan")
