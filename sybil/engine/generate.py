"""generate(): one call that fills an engine's slots with prompts and steps until all end.

It checks its arguments (one-line SybilErrors), builds the drafter for the `draft`
argument (make_drafter), and runs the engine core (sybil.engine.core) over one slot per
prompt. A row's output is what it would be alone and without a draft.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from sybil.engine.core import EngineCore, make_controller
from sybil.engine.sequence import Generation
from sybil.errors import SybilError
from sybil.model.gpt import GPT, weight_bytes
from sybil.ops import native
from sybil.sample.logprobs import MAX_TOP
from sybil.sample.params import SamplingParams
from sybil.spec.cascade import Cascade
from sybil.spec.controller import Controller
from sybil.spec.drafter import Drafter
from sybil.spec.model_drafter import ModelDrafter
from sybil.spec.ngram import NgramDrafter
from sybil.spec.suffix import SuffixDrafter


def check_prompt(prompt_ids: list[int], model: GPT) -> list[int]:
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



def make_drafter(
    draft: GPT | str | Drafter | list | None,
    target: GPT,
    params: SamplingParams,
    max_len: int,
    batch: int,
    graphs: bool,
    draft_vocab: int | None = None,
) -> Drafter | None:
    """The drafter for a draft given as a model, "ngram", "suffix", a drafter object, or
    a list of them in order of preference (e.g. ["suffix", model]: the lookup first),
    checked against the target; a model's cache has `batch` rows of max_len positions."""
    if draft is None:
        return None
    if isinstance(draft, (list, tuple)):
        if len(draft) < 2:
            raise SybilError("a list of drafts needs two or more, e.g. ['suffix', a draft model]")
        if draft_vocab is not None and not any(isinstance(d, GPT) for d in draft):
            raise SybilError("draft_vocab restricts a draft model's head; the list has no draft model")
        return Cascade([make_drafter(d, target, params, max_len, batch, graphs,
                                     draft_vocab if isinstance(d, GPT) else None) for d in draft])
    if draft_vocab is not None and not isinstance(draft, GPT):
        raise SybilError("draft_vocab restricts a draft model's head; it needs a model draft, not 'ngram'")
    if isinstance(draft, str):
        if draft not in ("ngram", "suffix"):
            raise SybilError(f"draft {draft!r} is not a model, 'ngram' or 'suffix'")
        return NgramDrafter() if draft == "ngram" else SuffixDrafter()
    if isinstance(draft, GPT):
        if draft.config.vocab_size != target.config.vocab_size:
            raise SybilError(
                f"the draft's vocabulary ({draft.config.vocab_size}) differs from the target's "
                f"({target.config.vocab_size}); draft and target must share a tokenizer"
            )
        if draft_vocab is not None and not 1 <= draft_vocab <= draft.config.vocab_size:
            raise SybilError(f"draft_vocab must be between 1 and {draft.config.vocab_size}, got {draft_vocab}")
        # decoding is memory-bound: a draft step costs about its share of the bytes read
        return ModelDrafter(draft, params, min(max_len, draft.config.n_positions), batch, graphs=graphs,
                            vocab=draft_vocab, cost_prior=min(1.0, weight_bytes(draft) / weight_bytes(target)))
    if not isinstance(draft, Drafter):
        raise SybilError(f"draft must be a GPT, 'ngram', 'suffix', a Drafter or a list of them, got {type(draft).__name__}")
    return draft



def _per_row(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise SybilError(f"{name} has {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n



@torch.inference_mode()
def generate(
    model: GPT,
    prompt_ids: list[int] | list[list[int]],
    max_new_tokens: int | list[int],
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | list[int | None] | None = None,
    stop_at_eos: bool = True,
    draft: GPT | str | Drafter | None = None,
    k: int | str | Controller = "auto",
    on_token: Callable[[int, int], None] | None = None,
    graphs: bool | None = None,
    draft_vocab: int | None = None,
    logit_bias: dict[int, float] | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> Generation | list[Generation]:
    """Generate up to max_new_tokens after prompt_ids.

    prompt_ids may be one prompt (a list of ids) or a list of prompts of any
    lengths, decoded together as one batch; then the result is a list in the
    same order, max_new_tokens and seed may be per prompt, and a prompt that
    cannot be run (empty, too long) gets finish_reason "error" while the others
    complete. Each row's output is what it would be alone.

    With draft (a GPT sharing the vocabulary, possibly model itself; "ngram",
    "suffix", a Drafter, or a list of them in order of preference), decoding is
    speculative with window k and the output is what model alone would produce: the
    same tokens when greedy, the same tokens for the same seed when sampling.
    on_token(row, token) is called as each token is committed, for streaming.
    k="auto" chooses each row's window each round from measured costs and acceptance,
    starting afresh (a BatchK); a Controller instance (BatchK, AdaptiveK) does the same
    and keeps what it learnt for the next call that is given it (as the server keeps
    one across requests), so later calls skip the warm-up.

    draft_vocab=N restricts a draft model's head to ids below N and
    <|endoftext|> (FR-Spec): cheaper draft steps, the output unchanged.

    logit_bias ({id: value}), presence_penalty and frequency_penalty adjust the
    target's logits as OpenAI's API does, before greedy choice or sampling;
    speculation compares against the adjusted target, so the output is still
    what plain decoding with the same adjustments gives. logprobs=N fills each
    result's `logprobs` (TokenLogprob per generated token, N alternatives) and
    prompt_logprobs=N its `prompt_logprobs`; both are the raw log-softmax of the
    target's logits (sybil.sample.logprobs). With prompt_logprobs, max_new_tokens may be
    0: the prompt is scored and nothing generated.

    graphs replays the fixed-shape steps (decode, draft, verify) as CUDA graphs;
    None turns them on when the model is on a CUDA device. On a CPU, True runs
    the same fixed-shape steps eagerly.
    """
    bias = tuple(sorted((int(t), float(v)) for t, v in (logit_bias or {}).items()))
    bad = [t for t, _ in bias if not 0 <= t < model.config.vocab_size]
    if bad:
        raise SybilError(f"logit_bias names token {bad[0]}, outside the vocabulary 0..{model.config.vocab_size - 1}")
    for name, top in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if top is not None and not 0 <= top <= MAX_TOP:
            raise SybilError(f"{name} must be between 0 and {MAX_TOP}, got {top}")
    try:
        params = SamplingParams(temperature, top_k, top_p, bias, presence_penalty, frequency_penalty)
    except ValueError as e:
        raise SybilError(str(e)) from None
    batched = bool(prompt_ids) and isinstance(prompt_ids[0], (list, tuple))
    prompts = list(prompt_ids) if batched else [prompt_ids]
    max_new = _per_row(max_new_tokens, len(prompts), "max_new_tokens")
    seeds = _per_row(seed, len(prompts), "seed")
    least = 0 if prompt_logprobs is not None else 1
    if any(not isinstance(m, int) or m < least for m in max_new):
        raise SybilError(f"max_new_tokens must be at least {least}, got {max_new_tokens}")
    if draft is not None:
        make_controller(k, model.config.n_positions)  # a bad k is an error before any work

    outs, live = [], []  # live: indices of the rows that run
    for i, p in enumerate(prompts):
        try:
            outs.append(Generation(prompt_ids=check_prompt(p, model)))
            live.append(i)
        except SybilError as e:
            if not batched:
                raise
            outs.append(Generation(prompt_ids=list(p), finish_reason="error", error=str(e)))
    if graphs is None:
        graphs = model.device.type == "cuda"
    if not live:
        return outs if batched else outs[0]
    if model.device.type == "cpu":
        native.available()  # a first run compiles the kernels here, not inside the timings below

    start = time.perf_counter()
    # cache positions the longest row can need (prompt and output), within the context
    max_len = min(model.config.n_positions, max(len(outs[i].prompt_ids) + max_new[i] for i in live))
    drafter = make_drafter(draft, model, params, max_len, len(live), graphs, draft_vocab)
    engine = EngineCore(model, len(live), max_len, drafter, k, graphs)
    for slot, i in enumerate(live):
        engine.add(slot, outs[i], max_new[i], params, seeds[i], stop_at_eos, logprobs=logprobs,
                   prompt_logprobs=prompt_logprobs)
    while engine.active:
        for c in engine.step():
            for t in c.tokens if on_token else ():
                on_token(live[c.slot], t)
    total = time.perf_counter() - start
    all_tokens = sum(len(outs[i].tokens) for i in live)
    capture_s = engine.capture_s()
    for i in live:
        outs[i].stats.update(batch_size=len(live), capture_s=capture_s, batch_tokens_per_s=all_tokens / total)
    return outs if batched else outs[0]

