"""Log-probabilities, computed in one place for the server, the engine and the CLI.

Every log-probability Sybil reports is the raw log-softmax of the target model's
logits at the position the token was predicted from: before temperature, top-k,
top-p, logit_bias or penalties (vLLM's default, and what a perplexity or an
lm-evaluation-harness loglikelihood means). A speculative round reads them from
the verify forward, whose logits are the same bits as a plain step's on the CPU
kernels, so they equal plain decoding's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP = 20  # the most alternatives a request may ask for (OpenAI's and vLLM's limit)


@dataclass
class TokenLogprob:
    """A token, its log-probability and the `top` most likely tokens at its position
    (id, logprob), most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities [..., V] of logits in any dtype."""
    return torch.log_softmax(logits.float(), dim=-1)


def score(logits: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
    """targets[i]'s log-probability under logits[i] [len(targets), V], with the `top`
    most likely tokens. Each row is reduced on its own, so a position's numbers do not
    depend on how many positions were scored with it (a step or inside a verify)."""
    out = []
    for row, tok in zip(logits, targets):
        lp = log_softmax(row)  # [V]
        best = torch.topk(lp, top) if top else None
        alts = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
        out.append(TokenLogprob(int(tok), float(lp[tok]), alts))
    return out
