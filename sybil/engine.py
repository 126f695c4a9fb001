"""Generation: plain and speculative decoding share one loop of rounds.

The target's cache always holds every committed token but the last. A round
feeds [last token, d1..dk] in one forward at positions n-1..n-1+k (k = 0 is a
plain decode step), accepts a prefix of the drafts, appends the target's own
token, and rewinds both caches by moving their length pointers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from sybil.adaptive import AdaptiveK
from sybil.drafters import Drafter, ModelDrafter, NgramDrafter
from sybil.errors import SybilError
from sybil.kv_cache import KVCache
from sybil.model import GPT
from sybil.sampling import SamplingParams
from sybil.tokenizer import EOT_ID
from sybil.verify import accept_greedy, accept_sampled


@dataclass
class Generation:
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)  # generated ids only (an ending <|endoftext|> included)
    finish_reason: str = ""  # "eos", "length" (max_new_tokens) or "context" (model's context is full)
    stats: dict = field(default_factory=dict)


@dataclass
class _Telemetry:
    k_max: int
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    target_tokens: int = 0
    time_draft_s: float = 0.0
    time_verify_s: float = 0.0
    histogram: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.histogram = [0] * self.k_max

    def as_dict(self, total_s: float) -> dict:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "rejected": self.drafted - self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "mean_accepted": (self.accepted + self.target_tokens) / self.rounds if self.rounds else 0.0,
            "accept_histogram": self.histogram,
            "target_tokens": self.target_tokens,
            "time_draft_s": self.time_draft_s,
            "time_verify_s": self.time_verify_s,
            "time_other_s": max(total_s - self.time_draft_s - self.time_verify_s, 0.0),
        }


@dataclass
class Round:
    drafts: list[int]
    n_accepted: int
    token: int  # the target's own token after the accepted drafts
    draft_s: float
    verify_s: float


class Decoder:
    """One sequence's decoding state: the committed tokens, the target's cache
    (all committed tokens but the last) and the drafter. Each round is one
    target forward; rewinding is a pointer move on both caches."""

    def __init__(
        self,
        model: GPT,
        prompt_ids: list[int],
        max_len: int,
        params: SamplingParams,
        drafter: Drafter | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.model, self.params, self.drafter, self.generator = model, params, drafter, generator
        self.seq = list(prompt_ids)
        self.cache = KVCache.for_model(model.config, 1, max_len, dtype=model.dtype, device=model.device)
        if len(self.seq) > 1:
            model(torch.tensor([self.seq[:-1]], device=model.device), self.cache)

    def round(self, k: int) -> Round:
        """Draft up to k tokens, verify them with one forward, commit, rewind."""
        t0 = time.perf_counter()
        proposal = self.drafter.propose(self.seq, k, self.generator) if self.drafter and k > 0 else None
        drafts = proposal.tokens if proposal else []
        t1 = time.perf_counter()
        idx = torch.tensor([[self.seq[-1], *drafts]], device=self.model.device)
        logits = self.model(idx, self.cache)[0]  # [k+1, V]
        if self.params.greedy:
            n_acc, tok = accept_greedy(drafts, logits)
        else:
            q = proposal.probs if proposal else None
            n_acc, tok = accept_sampled(drafts, q, logits, self.params, self.generator)
        t2 = time.perf_counter()
        n = len(self.seq) + n_acc  # the cache's valid prefix: committed + accepted drafts
        self.cache.truncate(n)
        if self.drafter is not None:
            self.drafter.rewind(n)
        self.seq += [*drafts[:n_acc], tok]
        return Round(drafts, n_acc, tok, t1 - t0, t2 - t1)


def _check_prompt(prompt_ids: list[int], model: GPT) -> list[int]:
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise SybilError("the prompt is empty; give at least one token (e.g. <|endoftext|>, id 50256)")
    bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
    if bad:
        raise SybilError(f"prompt id {bad[0]} is outside the vocabulary 0..{model.config.vocab_size - 1}")
    if len(ids) >= model.config.n_positions:
        raise SybilError(
            f"the prompt has {len(ids)} tokens; the model's context is {model.config.n_positions}, "
            "so nothing can be generated: shorten the prompt"
        )
    return ids


def _make_drafter(
    draft: GPT | str | Drafter | None, target: GPT, params: SamplingParams, max_len: int
) -> Drafter | None:
    if draft is None:
        return None
    if isinstance(draft, str):
        if draft != "ngram":
            raise SybilError(f"draft {draft!r} is not a model or 'ngram'")
        return NgramDrafter()
    if isinstance(draft, GPT):
        if draft.config.vocab_size != target.config.vocab_size:
            raise SybilError(
                f"the draft's vocabulary ({draft.config.vocab_size}) differs from the target's "
                f"({target.config.vocab_size}); draft and target must share a tokenizer"
            )
        return ModelDrafter(draft, params, min(max_len, draft.config.n_positions))
    return draft  # any object with propose/rewind


def _parse_k(k: int | str, context: int) -> tuple[int, AdaptiveK | None]:
    if k == "auto":
        k_max = min(AdaptiveK.K_MAX, context - 1)
        return k_max, AdaptiveK(k_max=k_max)
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise SybilError(f"k must be a positive integer or 'auto', got {k!r}") from None
    if not 1 <= k < context:
        raise SybilError(f"k must be between 1 and {context - 1} (the model's context), got {k}")
    return k, None


@torch.inference_mode()
def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    draft: GPT | str | Drafter | None = None,
    k: int | str = 4,
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Generate up to max_new_tokens after prompt_ids.

    With draft (a GPT sharing the vocabulary, possibly model itself, or "ngram"),
    decoding is speculative with window k (or "auto") and the output is what
    model alone would produce: the same tokens when greedy, the same
    distribution when sampling. on_token is called with each token as it is
    committed, for streaming.
    """
    try:
        params = SamplingParams(temperature, top_k, top_p)
    except ValueError as e:
        raise SybilError(str(e)) from None
    if max_new_tokens < 1:
        raise SybilError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ids = _check_prompt(prompt_ids, model)
    context = model.config.n_positions
    max_len = min(context, len(ids) + max_new_tokens)
    k_max, controller = _parse_k(k, context) if draft is not None else (0, None)
    drafter = _make_drafter(draft, model, params, max_len)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = Generation(prompt_ids=ids)
    tel = _Telemetry(k_max)

    start = time.perf_counter()
    dec = Decoder(model, ids, max_len, params, drafter, gen)
    first_token_s, first_round_tokens = None, 0
    while not out.finish_reason:
        # Never draft past max_new_tokens or the context: a round commits drafts + 1.
        room = min(max_new_tokens - len(out.tokens), max_len - len(dec.seq)) - 1
        k_round = controller.choose(room) if controller else min(k_max, room)
        if controller and isinstance(drafter, ModelDrafter):
            drafter.min_confidence = controller.min_confidence()
        r = dec.round(k_round)
        if controller:
            controller.update(len(r.drafts), r.n_accepted, r.draft_s, r.verify_s, len(r.drafts) + 1)
        tel.rounds += 1
        tel.drafted += len(r.drafts)
        tel.time_draft_s += r.draft_s
        tel.time_verify_s += r.verify_s
        for i, t in enumerate([*r.drafts[: r.n_accepted], r.token]):
            out.tokens.append(t)
            if i < r.n_accepted:
                tel.accepted += 1
                tel.histogram[i] += 1
            else:
                tel.target_tokens += 1
            if on_token:
                on_token(t)
            if stop_at_eos and t == EOT_ID:
                out.finish_reason = "eos"
            elif len(out.tokens) >= max_new_tokens:
                out.finish_reason = "length"
            elif len(ids) + len(out.tokens) >= context:
                out.finish_reason = "context"
            if out.finish_reason:
                break
        if first_token_s is None:
            first_token_s, first_round_tokens = time.perf_counter() - start, len(out.tokens)

    total = time.perf_counter() - start
    decode_s, decode_tokens = total - first_token_s, len(out.tokens) - first_round_tokens
    out.stats = {
        "prefill_ms": 1000 * first_token_s,  # prompt forward and first round: time to first token
        "decode_tokens_per_s": decode_tokens / decode_s if decode_tokens else 0.0,
        "total_s": total,
        "new_tokens": len(out.tokens),
        **tel.as_dict(total),
    }
    return out
