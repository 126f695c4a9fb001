"""Generation: plain and speculative decoding share one loop of rounds.

The target's cache always holds every committed token but the last. A round
feeds [last token, d1..dk] in one forward at positions n-1..n-1+k (k = 0 is a
plain decode step), accepts a prefix of the drafts, appends the target's own
token, and rewinds both caches by moving their length pointers.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from sybil import native
from sybil.adaptive import AdaptiveK
from sybil.batch_k import BatchK
from sybil.drafters import Cascade, Drafter, ModelDrafter, NgramDrafter, Proposal, weight_bytes
from sybil.cuda_graphs import StepGraphs
from sybil.errors import SybilError
from sybil.kv_cache import KVCache
from sybil.logprobs import MAX_TOP, TokenLogprob, score
from sybil.model import GPT
from sybil.prefill import PrefillBudget
from sybil.prompt_cache import PromptCache
from sybil.round_log import Prediction, RoundRecord
from sybil.sampling import SamplingParams, adjust_logits
from sybil.steps import forward_rows, prefill_row
from sybil.suffix import SuffixDrafter
from sybil.tokenizer import EOT_ID
from sybil.verify import accept_greedy, accept_keyed


@dataclass
class Generation:
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)  # generated ids only (an ending <|endoftext|> included)
    finish_reason: str = ""  # "eos", "length" (max_new_tokens), "context" (context full) or "error"
    stats: dict = field(default_factory=dict)
    error: str | None = None  # why the prompt could not be run (batched calls only)
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None for the first)


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
    logprobs: list[TokenLogprob] | None = None  # of drafts[:n_accepted] and token, when the slot asks
    prefilled: int = 0  # prompt tokens this round fed before the row's own (its prompt's last chunk)


PROMPT_SCORE_CHUNK = 256  # prompt tokens per forward when their logits are kept (echo): 256 x V floats


class Decoder:
    """The decoding state of a fixed number of slots: each slot's committed tokens
    and sampling, the target's cache (every committed token but the last, per
    slot) and the drafter. A round is one target forward for all slots; each
    accepts its own number of drafts and rewinds its own pointers. A slot is
    restarted for a new sequence between rounds (add), which is how the server
    lets requests join a running batch."""

    def __init__(
        self, model: GPT, slots: int, max_len: int, drafter: Drafter | None = None, graphs: bool = False,
        prefill_chunk: int | None = None,
    ) -> None:
        self.model, self.drafter = model, drafter
        self.seqs: list[list[int]] = [[] for _ in range(slots)]
        self.params = [SamplingParams()] * slots
        self.seeds: list[int | None] = [None] * slots  # each sampled row's seed: its noise per position
        self.top: list[int | None] = [None] * slots  # log-probabilities wanted, with this many alternatives
        self.counts: list[torch.Tensor | None] = [None] * slots  # generated-token counts, for penalties
        self.cache = KVCache.for_model(model.config, slots, max_len, dtype=model.dtype, device=model.device)
        self.graphs = StepGraphs(model, self.cache) if graphs else None
        self.draft_s = self.verify_s = 0.0  # time of the last round
        self.prefilled = 0  # prompt tokens the last round fed (chunked prefill)
        # A slot's cache entries are bitwise what recomputing them gives only where every
        # kernel computes rows and queries independently whatever the split: the CPU kernels.
        self.reuse = self.cache.k.device.type == "cpu" and native.available() and \
            model.dtype in (torch.float32, torch.bfloat16)
        self.prompts = PromptCache(slots, self.reuse)
        self.cached = 0  # prompt tokens the last add took from its slot's earlier sequence
        # Chunked prefill: a new prompt's tokens wait here and are fed, prefill_chunk per
        # round in all, inside the rounds that decode the other rows, so no running row
        # waits for more than one chunk. Only where entries do not depend on the split.
        self.chunk = prefill_chunk if self.reuse else None
        self.pending: list[list[int]] = [[] for _ in range(slots)]
        self.joined: list[int] = []  # slots with pending tokens
        self.waited = [0] * slots  # rounds each pending prompt has waited

    def reusable(self, slot: int, prompt: list[int]) -> int:
        """How many of prompt's cache entries the slot already holds (sybil.prompt_cache)."""
        return self.prompts.reusable(self.seqs[slot], int(self.cache.lengths[slot]), prompt, slot)

    def add(
        self, slot: int, prompt: list[int], params: SamplingParams, seed: int | None,
        logprobs: int | None = None, prompt_logprobs: int | None = None,
    ) -> list[TokenLogprob | None] | None:
        """Start a sequence in a slot. It takes the longest prefix of prompt that any slot's
        entries hold (source: its own earlier sequence, or a copy from another slot; a
        prompt cache), and the rest of its prompt, all but the last token, is prefilled:
        in chunks inside later rounds (chunked prefill), or now, on that slot alone.
        logprobs=N: each round reports its tokens' log-probabilities with N
        alternatives. prompt_logprobs=N: the prefill computes logits too and this
        returns the prompt tokens' (the first has none: nothing predicts it); a shared
        prefix scored with N alternatives before is not scored again."""
        src, keep = self.prompts.source(self.seqs, self.cache.lengths.tolist(), slot, prompt, prompt_logprobs)
        self.cached = keep
        if src != slot and keep:
            self.cache.copy_prefix(src, slot, keep)
        for d in _models(self.drafter):  # the draft's entries of the shared prefix are as valid as the target's
            if src != slot and keep:
                d.copy_prefix(src, slot, keep)
            else:
                d.rewind([keep if b == slot else int(n) for b, n in enumerate(d.cache.lengths)])
        reused = self.prompts.scores(src, keep) if prompt_logprobs is not None and keep else None
        self.seqs[slot], self.params[slot], self.seeds[slot] = list(prompt), params, seed
        self.top[slot] = logprobs
        self.counts[slot] = torch.zeros(self.model.config.vocab_size) if params.penalised else None
        self.cache.set_lengths(slot, [keep])
        scored = None
        self.pending[slot] = []
        if slot in self.joined:
            self.joined.remove(slot)
        if prompt_logprobs is None and self.chunk:
            self.pending[slot] = prompt[keep:-1]
            if self.pending[slot]:
                self.joined.append(slot)
                self.waited[slot] = 0
        elif prompt_logprobs is None:
            prefill_row(self.model, self.cache, slot, prompt[keep:-1])
        else:
            scored = self._score(slot, prompt, keep, reused, prompt_logprobs)
        self.prompts.remember(slot, scored, prompt_logprobs)
        return scored

    def _score(self, slot: int, prompt: list[int], keep: int, reused: list | None, top: int
               ) -> list[TokenLogprob | None]:
        """The prompt's log-probabilities: the first `keep` from an earlier scoring of the
        same prefix, the rest from forwards that start one entry back (its logits score
        prompt[keep]; the entry it rewrites is the same bits)."""
        scored, start = [None], 0
        if keep:
            scored, start = list(reused), keep - 1
            self.cache.set_lengths(slot, [start])
        for lo in range(start, len(prompt) - 1, PROMPT_SCORE_CHUNK):
            part = prompt[lo : min(lo + PROMPT_SCORE_CHUNK, len(prompt) - 1)]
            rows = [part if b == slot else [] for b in range(self.cache.batch)]
            logits = forward_rows(self.model, self.cache, rows)[slot, : len(part)]  # [len(part), V]
            scored += score(logits, prompt[lo + 1 : lo + 1 + len(part)], top)
        return scored

    def release(self, slot: int) -> None:
        """The slot's sequence ended (finished, or cancelled: feed no more of its prompt).
        Its tokens stay for the prompt cache, and a lookup drafter keeps them too."""
        self.pending[slot] = []
        if slot in self.joined:
            self.joined.remove(slot)
        if hasattr(self.drafter, "retire"):
            self.drafter.retire(slot, self.seqs[slot])

    def prefilling(self, slot: int) -> bool:
        """Whether the slot's prompt is still being fed (no token of it committed yet)."""
        return bool(self.pending[slot])

    def chunk_tokens(self) -> int:
        """How many prompt tokens the next round feeds (its chunks, all slots together)."""
        return min(self.chunk or 0, sum(len(self.pending[b]) for b in self.joined))

    def _chunks(self) -> list[list[int]]:
        """This round's prompt tokens per slot, self.chunk in all. Shortest remaining first
        (the order that minimises the mean time to first token), each round a prompt
        waits counting as one chunk fewer, so that a long prompt is never starved."""
        budget, chunks = self.chunk or 0, [[] for _ in self.seqs]
        for b in self.joined:
            self.waited[b] += 1
        for b in sorted(self.joined, key=lambda b: (len(self.pending[b]) - budget * self.waited[b], b)):
            chunks[b], budget = self.pending[b][:budget], budget - min(budget, len(self.pending[b]))
        return chunks

    def round(self, ks: list[int | None]) -> list[Round | None]:
        """Draft up to ks[b] tokens per slot, verify all slots in one forward, commit,
        rewind. Slots with ks[b] None are idle: they feed nothing. A slot whose prompt is
        still pending feeds its share of the prefill budget instead, and joins the
        decoding rows (without drafts) in the round that feeds its prompt's end."""
        t0 = time.perf_counter()
        chunks = self._chunks()
        if self.chunk:  # the draft catches up as fast
            for d in _models(self.drafter):
                d.chunk = self.chunk
        # decoding: the slot runs and its prompt is all in the cache after this round's chunk
        decoding = [k is not None and len(c) == len(self.pending[b]) for b, (k, c) in enumerate(zip(ks, chunks))]
        want = [(k or 0) if d and not self.pending[b] else 0 for b, (k, d) in enumerate(zip(ks, decoding))]
        if self.drafter is not None and any(want):
            proposals = self.drafter.propose(self.seqs, want, self.seeds, self.params)
        else:
            proposals = [Proposal([]) for _ in ks]
        t1 = time.perf_counter()
        rows = [[*c, s[-1], *p.tokens] if d else c for s, p, c, d in zip(self.seqs, proposals, chunks, decoding)]
        tail = [1 + len(p.tokens) if d else 0 for p, d in zip(proposals, decoding)]
        logits = forward_rows(self.model, self.cache, rows, self.graphs, tail=tail)
        self.prefilled = sum(len(c) for c in chunks)
        for b, c in enumerate(chunks):
            if c:
                self.pending[b] = self.pending[b][len(c) :]
                if not self.pending[b]:
                    self.joined.remove(b)
        out: list[Round | None] = []
        n_valid = []
        for b, (row, prop) in enumerate(zip(rows, proposals)):
            if not decoding[b]:  # idle, or a prompt chunk: its pointers stay where the forward left them
                out.append(None)
                n_valid.append(int(self.cache.lengths[b]))
                continue
            lg = logits[b, : tail[b]]  # [k+1, V]
            # The acceptance rule compares against the adjusted target, position by position.
            adj = adjust_logits(lg, self.params[b], self.counts[b], prop.tokens)
            if self.params[b].greedy:
                n_acc, tok = accept_greedy(prop.tokens, adj)
            else:  # the token at position len(seq) + i is drawn with that position's noise
                n_acc, tok = accept_keyed(prop.tokens, adj, self.params[b], self.seeds[b], len(self.seqs[b]))
            n_valid.append(len(self.seqs[b]) + n_acc)  # valid cache prefix: committed + accepted
            new = [*prop.tokens[:n_acc], tok]
            self.seqs[b] += new
            if self.counts[b] is not None:
                for t in new:
                    self.counts[b][t] += 1
            scored = score(lg[: n_acc + 1], new, self.top[b]) if self.top[b] is not None else None
            out.append(Round(prop.tokens, n_acc, tok, scored, len(chunks[b])))
        self.cache.truncate(n_valid)
        if self.drafter is not None:
            self.drafter.rewind(n_valid)
        self.draft_s, self.verify_s = t1 - t0, time.perf_counter() - t1
        return out


def _models(drafter: Drafter | None) -> list[ModelDrafter]:
    """The draft models inside a drafter (a Cascade holds a lookup and a model)."""
    if isinstance(drafter, ModelDrafter):
        return [drafter]
    return drafter.models if isinstance(drafter, Cascade) else []


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
        drafter = ModelDrafter(draft, params, min(max_len, draft.config.n_positions), batch, graphs=graphs,
                               vocab=draft_vocab)
        # decoding is memory-bound: a draft step costs about its share of the bytes read
        drafter.cost_prior = min(1.0, weight_bytes(draft) / weight_bytes(target))
        return drafter
    return draft  # any object with propose/rewind


def _parse_k(k: int | str | Controller, context: int) -> tuple[int, Controller | None]:
    if isinstance(k, (AdaptiveK, BatchK)):  # a controller carried over from earlier calls
        return min(k.k_max, context - 1), k
    if k == "auto":  # each row's own window, priced for the whole batch
        k_max = min(BatchK.K_MAX, context - 1)
        return k_max, BatchK(k_max=k_max)
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise SybilError(f"k must be a positive integer or 'auto', got {k!r}") from None
    if not 1 <= k < context:
        raise SybilError(f"k must be between 1 and {context - 1} (the model's context), got {k}")
    return k, None



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

    With draft (a GPT sharing the vocabulary, possibly model itself, or "ngram"),
    decoding is speculative with window k (or "auto") and the output is what
    model alone would produce: the same tokens when greedy, the same
    distribution when sampling. on_token(row, token) is called as each token
    is committed, for streaming. k="auto" chooses the window each round from
    measured costs and acceptance, starting afresh; an AdaptiveK instance does the
    same and keeps what it learnt for the next call that is given it (as the
    server keeps one across requests), so later calls skip the warm-up.

    draft_vocab=N restricts a draft model's head to ids below N and
    <|endoftext|> (FR-Spec): cheaper draft steps, the output unchanged.

    logit_bias ({id: value}), presence_penalty and frequency_penalty adjust the
    target's logits as OpenAI's API does, before greedy choice or sampling;
    speculation compares against the adjusted target, so the output is still
    what plain decoding with the same adjustments gives. logprobs=N fills each
    result's `logprobs` (TokenLogprob per generated token, N alternatives) and
    prompt_logprobs=N its `prompt_logprobs`; both are the raw log-softmax of the
    target's logits (sybil.logprobs). With prompt_logprobs, max_new_tokens may be
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
        _parse_k(k, model.config.n_positions)  # a bad k is an error before any work

    outs, live = [], []  # live: indices of the rows that run
    for i, p in enumerate(prompts):
        try:
            outs.append(Generation(prompt_ids=_check_prompt(p, model)))
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
    batch = Batch(model, len(live), max_len, drafter, k, graphs)
    for slot, i in enumerate(live):
        batch.add(slot, outs[i], max_new[i], params, seeds[i], stop_at_eos, logprobs=logprobs,
                  prompt_logprobs=prompt_logprobs)
    while batch.active:
        for c in batch.step():
            for t in c.tokens if on_token else ():
                on_token(live[c.slot], t)
    total = time.perf_counter() - start
    all_tokens = sum(len(outs[i].tokens) for i in live)
    capture_s = sum(g.capture_s for g in (batch.dec.graphs, getattr(drafter, "graphs", None)) if g)
    for i in live:
        outs[i].stats.update(batch_size=len(live), capture_s=capture_s, batch_tokens_per_s=all_tokens / total)
    return outs if batched else outs[0]


@dataclass
class Committed:
    """What one round committed for one row."""

    slot: int
    tokens: list[int]  # cut where the row ended
    out: Generation  # finish_reason set when the row ended this round
    drafted: int
    accepted: int  # how many of tokens were drafts
    logprobs: list[TokenLogprob] | None = None  # one per token, when the row asked for them


@dataclass
class _Row:
    out: Generation
    max_new: int
    stop_at_eos: bool
    tel: _Telemetry
    start: float
    cached: int = 0  # prompt tokens whose cache entries its slot already held
    first_s: float | None = None
    first_n: int = 0


class Batch:
    """Sequences decoding together: a Decoder's slots, each row with its own
    limits, sampling, seed and telemetry, and one choice of draft window per round.

    This is the round loop of Sybil: generate() fills every slot and steps until
    all are done; the server's scheduler adds rows to free slots and removes
    cancelled ones between steps. A row's tokens depend only on its own prompt,
    sampling parameters and seed, never on the draft, K or which rows share its
    rounds: the CPU kernels compute rows independently, and a sampled row draws
    each position's token with noise keyed by (seed, position) (sybil.verify).
    """

    def __init__(
        self, model: GPT, slots: int, max_len: int, drafter: Drafter | None = None, k: int | str | Controller = "auto",
        graphs: bool = False, prefill_chunk: int | str | None = None,
    ) -> None:
        self.model = model
        # chunked prefill (sybil.prefill): None prefills a joining prompt whole, at add
        self.prefill = PrefillBudget(prefill_chunk) if prefill_chunk is not None else None
        self.k_max, self.controller = _parse_k(k, model.config.n_positions) if drafter is not None else (0, None)
        self.drafter = drafter
        if self.controller is not None and self.controller.rounds == 0:
            self.controller.draft_prior = getattr(drafter, "cost_prior", 1.0)
        self.dec = Decoder(model, slots, max_len, drafter, graphs, PrefillBudget.FIRST if self.prefill else None)
        self.rows: list[_Row | None] = [None] * slots
        self.cached_tokens = 0  # prompt tokens taken from the slots' earlier sequences, in all
        self.adds = 0
        self.last_add = [0] * slots  # when each slot last took a row (self.adds then; 0: never)
        self.on_round: Callable[[RoundRecord], None] | None = None  # gets each round's record (sybil.round_log)
        self.rounds = 0
        self.start = time.perf_counter()
        self._predicted: Prediction | None = None  # what the controller expected of this round

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def prefault(self) -> None:
        """Back every page of the target's and the draft's caches now (KVCache.prefault):
        for a server, which would otherwise pay it in the first round of each slot."""
        self.dec.cache.prefault()
        for d in _models(self.drafter):
            d.cache.prefault()

    def free_slots(self) -> list[int]:
        return [b for b, r in enumerate(self.rows) if r is None]

    def best_slot(self, prompt: list[int], among: list[int]) -> int:
        """Of the free slots `among`, the one whose earlier sequence shares the longest
        prefix with prompt (its entries are reused, as llama.cpp's server picks slots);
        on a tie the least recently taken (an empty one first), so that a prompt sharing
        nothing overwrites the oldest sequence, not the one that just ended: one client
        alternating two prompts finds each still cached. Then the first."""
        return max(among, key=lambda b: (self.dec.reusable(b, prompt), -self.last_add[b], -b))

    def add(
        self, slot: int, out: Generation, max_new: int, params: SamplingParams, seed: int | None,
        stop_at_eos: bool = True, *, logprobs: int | None = None, prompt_logprobs: int | None = None,
    ) -> None:
        """Start out (its prompt checked by the caller) in a free slot: it takes part
        from the next step on. logprobs=N fills out.logprobs as tokens are committed
        and prompt_logprobs=N out.prompt_logprobs now (N alternatives each). With
        max_new 0 the prompt is only scored: out ends at once and the slot stays free."""
        if self.rows[slot] is not None:
            raise ValueError(f"slot {slot} is busy")
        start = time.perf_counter()
        if seed is None and not params.greedy:
            seed = secrets.randbits(63)  # unseeded sampling: a fresh seed, the same rule
        out.prompt_logprobs = self.dec.add(slot, out.prompt_ids, params, seed, logprobs, prompt_logprobs)
        self.adds += 1
        self.last_add[slot] = self.adds
        out.logprobs = [] if logprobs is not None else None
        self.cached_tokens += self.dec.cached
        row = _Row(out, max_new, stop_at_eos, _Telemetry(self.k_max), start, self.dec.cached)
        if isinstance(self.controller, BatchK):
            self.controller.start(slot)
        if max_new == 0:
            row.first_s = time.perf_counter() - start
            out.finish_reason, out.stats = "length", self._stats(row, row.first_s)
            return
        self.rows[slot] = row

    def remove(self, slot: int) -> None:
        """Drop a row (cancelled): its slot is free for the next add."""
        self.rows[slot] = None
        self.dec.release(slot)

    def step(self) -> list[Committed]:
        """One round for every active row. The rows that ended have finish_reason and
        stats set, and their slots are free again."""
        dec = self.dec
        decoding = [r is not None and not dec.prefilling(b) for b, r in enumerate(self.rows)]
        if self.prefill and dec.chunk:
            dec.chunk = self.prefill.tokens(sum(decoding))
        windows = self._windows(decoding)
        rounds = dec.round(windows)
        if self.prefill:
            drafted = sum(len(r.drafts) for r in rounds if r is not None)
            self.prefill.update(dec.prefilled, sum(decoding), dec.verify_s, drafted)
        self._learn(rounds)
        now = time.perf_counter()
        done = [self._commit(b, rnd, now) for b, rnd in enumerate(rounds) if rnd is not None and self.rows[b]]
        self.rounds += 1
        if self.on_round is not None:
            self.on_round(self._record(windows, rounds, done, now))
            self._predicted = None
        return done

    def _record(self, windows: list[int | None], rounds: list[Round | None], done: list[Committed],
                now: float) -> RoundRecord:
        """What the round fed, chose and cost (sybil.round_log)."""
        dec = self.dec
        live = [b for b, r in enumerate(rounds) if r is not None]
        drafted = sum(len(rounds[b].drafts) for b in live)
        catchup_tokens, catchup_s = self._catchup(drafted > 0)
        return RoundRecord(
            round=self.rounds, t_s=now - self.start, windows=[windows[b] or 0 for b in live],
            prefill_tokens=dec.prefilled, drafted=drafted, accepted=sum(rounds[b].n_accepted for b in live),
            committed=sum(len(c.tokens) for c in done), verify_s=dec.verify_s, draft_s=dec.draft_s,
            catchup_tokens=catchup_tokens, catchup_s=catchup_s,
            predicted=self._predicted)

    def _catchup(self, drafted: bool) -> tuple[int, float]:
        """(tokens, seconds) of the drafter's catch-up forwards this round; they count
        only in a round that drafts (a plain round's draft state is left as it was)."""
        if not drafted:
            return 0, 0.0
        return getattr(self.drafter, "catchup_tokens", 0), getattr(self.drafter, "catchup_s", 0.0)

    def _windows(self, decoding: list[bool]) -> list[int | None]:
        """Each slot's draft window this round; None for a free slot. Never past a row's
        max_new_tokens or the cache: a round commits its accepted drafts + 1."""
        max_len = self.dec.cache.max_len
        rooms = {b: min(r.max_new - len(r.out.tokens), max_len - len(self.dec.seqs[b])) - 1
                 for b, r in enumerate(self.rows) if r is not None}
        ks: dict[int, int]
        if isinstance(self.controller, BatchK):
            live = {b: room for b, room in rooms.items() if decoding[b]}
            models = _models(self.drafter)
            lag = [max(col) for col in zip(*(d.lag(self.dec.seqs) for d in models))] if models else None
            extra = self.dec.chunk_tokens()  # what the round feeds, not all that waits
            lags = {b: lag[b] for b in live} if lag else None
            ks = self.controller.choose(live, extra, lags)
            if self.on_round is not None and self.controller.verify.known:  # what the controller expects, logged
                chosen = {b: ks.get(b, 0) for b in live}
                self._predicted = Prediction(
                    self.controller.cost_s(chosen, extra), self.controller.cost_s({b: 0 for b in live}, extra),
                    self.controller.expected(chosen), self.controller.catchups_s(chosen, lags, live))
        elif self.controller is not None:
            k = self.controller.choose(max(rooms.values()))
            ks = {b: min(k, room) for b, room in rooms.items()}
        else:
            ks = {b: min(self.k_max, room) for b, room in rooms.items()}
        if self.controller is not None:
            for d in _models(self.drafter):
                d.min_confidence = self.controller.min_confidence()
        return [ks.get(b, 0) if b in rooms else None for b in range(len(self.rows))]

    def _learn(self, rounds: list[Round | None]) -> None:
        """Tell the controller what the round drafted, accepted and cost."""
        done = {b: r for b, r in enumerate(rounds) if r is not None}
        if not self.controller or not done:
            return
        dec = self.dec
        # A catch-up forward (a new prompt, or tokens the draft missed during plain
        # steps) is paid once, not per draft token: it stays out of the step estimate.
        steps = max(len(r.drafts) for r in done.values())
        catchup_tokens, catchup = self._catchup(steps > 0)
        if isinstance(self.controller, BatchK):
            tokens = sum(1 + len(r.drafts) for r in done.values()) + dec.prefilled
            self.controller.update({b: (len(r.drafts), r.n_accepted) for b, r in done.items()}, tokens,
                                   dec.verify_s, steps, dec.draft_s - catchup, catchup_tokens, catchup)
        elif not dec.prefilled:  # a prompt chunk's time is not a verify's
            self.controller.update(
                sum(len(r.drafts) for r in done.values()), sum(r.n_accepted for r in done.values()),
                dec.draft_s - catchup, dec.verify_s, 1 + steps,
                misses=sum(r.n_accepted < len(r.drafts) for r in done.values()), steps=steps,
            )

    def _commit(self, b: int, rnd: Round, now: float) -> Committed:
        """Row b's tokens from the round, cut where a stop rule ends it; its telemetry."""
        row = self.rows[b]
        out, tel = row.out, row.tel
        tel.rounds += 1
        tel.drafted += len(rnd.drafts)
        tel.time_draft_s += self.dec.draft_s
        tel.time_verify_s += self.dec.verify_s
        new = []
        for i, t in enumerate([*rnd.drafts[: rnd.n_accepted], rnd.token]):
            new.append(t)
            if i < rnd.n_accepted:
                tel.accepted += 1
                tel.histogram[i] += 1
            else:
                tel.target_tokens += 1
            out.finish_reason = self._stop(row, t, len(new))
            if out.finish_reason:
                break
        out.tokens += new
        scored = rnd.logprobs[: len(new)] if rnd.logprobs is not None else None
        if scored is not None:
            out.logprobs += scored
        if row.first_s is None:
            row.first_s, row.first_n = now - row.start, len(out.tokens)
        if out.finish_reason:
            out.stats = self._stats(row, now - row.start)
            self.rows[b] = None
            self.dec.release(b)
        return Committed(b, new, out, len(rnd.drafts), min(rnd.n_accepted, len(new)), scored)

    def _stop(self, row: _Row, token: int, n_new: int) -> str:
        """Why the row ends at this token ('' if it goes on), n_new tokens into the round."""
        out = row.out
        if row.stop_at_eos and token == EOT_ID:
            return "eos"
        if len(out.tokens) + n_new >= row.max_new:
            return "length"
        if len(out.prompt_ids) + len(out.tokens) + n_new >= self.model.config.n_positions:
            return "context"
        return ""

    @staticmethod
    def _stats(row: _Row, end_s: float) -> dict:
        decode_s, decode_tokens = end_s - row.first_s, len(row.out.tokens) - row.first_n
        return {
            "prefill_ms": 1000 * row.first_s,  # prompt forward and first round: time to first token
            "decode_tokens_per_s": decode_tokens / decode_s if decode_tokens and decode_s > 0 else 0.0,
            "total_s": end_s,
            "new_tokens": len(row.out.tokens),
            "cached_prompt_tokens": row.cached,
            **row.tel.as_dict(end_s),
        }
