"""From logits to the distribution we sample from: logit_bias and penalties, then
temperature, top-k, top-p.

Speculative decoding applies exactly this transform to both the target's and the
draft's logits, so the acceptance ratio compares the distributions actually sampled.
The adjustments (OpenAI's logit_bias, presence and frequency penalties) depend on
the tokens generated before each position, so the target applies them position by
position over a verify (adjust_logits): position i counts the drafts before it, as
plain decoding would have counted them once committed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, value added to its logit)
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated at least once
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for token, value in self.logit_bias:
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias for token {token} must be in [-100, 100], got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Whether a row's logits depend on its own generated tokens."""
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def adjusted(self) -> bool:
        return bool(self.logit_bias) or self.penalised


def adjust_logits(
    logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None, drafts: list[int] = ()
) -> torch.Tensor:
    """logits [n, V] after logit_bias and penalties (OpenAI's rule: logit[j] -=
    presence * (c[j] > 0) + frequency * c[j]), as float32. counts [V] holds how often
    each token was generated before row 0; row i also counts drafts[:i]. Unadjusted
    params return logits as they are."""
    if not params.adjusted:
        return logits
    out = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], device=out.device)
        out[:, ids] += torch.tensor([v for _, v in params.logit_bias], device=out.device)
    if params.penalised:
        c = counts.clone()
        for i in range(out.shape[0]):
            out[i] -= params.presence_penalty * (c > 0).float() + params.frequency_penalty * c
            if i < len(drafts):
                c[drafts[i]] += 1
    return out


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [..., V] in float32 after temperature, top-k then top-p.

    Greedy (temperature 0) is the one-hot of the argmax, so greedy and sampled
    decoding share one acceptance rule downstream.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p is not None and params.top_p < 1:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop_sorted[..., 0] = False  # a top_p below float32's smallest value would otherwise drop all
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
