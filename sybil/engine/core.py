"""The engine core: a fixed number of slots decoding together, one round per step.

The target's cache always holds every committed token of a slot but the last. A round
feeds each running row [last token, d1..dk] in one forward at positions n-1..n-1+k
(k = 0 is a plain decode step), accepts a prefix of the drafts, appends the target's
own token, and rewinds both caches by moving their length pointers. A step reads

    plan -> draft -> forward -> accept -> commit

and each phase is one method below. generate() fills every slot and steps until all
are done; the server's scheduler adds rows to free slots and removes cancelled ones
between steps. A row's tokens depend only on its own prompt, sampling parameters and
seed, never on the draft, K or which rows share its rounds: the CPU kernels compute rows
independently, and a sampled row draws each position's token with noise keyed by
(seed, position) (sybil.sample.accept).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Callable

import torch

from sybil.engine.prefill import PrefillBudget
from sybil.engine.prompt_cache import PromptCache
from sybil.engine.round_log import RoundRecord
from sybil.engine.sequence import Generation, Sequence, Telemetry
from sybil.errors import SybilError
from sybil.model.cuda_graphs import StepGraphs
from sybil.model.gpt import GPT
from sybil.model.kv_cache import KVCache
from sybil.model.runner import forward_rows, prefill_row
from sybil.ops import native
from sybil.sample.accept import accept_greedy, accept_keyed
from sybil.sample.logprobs import TokenLogprob, score
from sybil.sample.params import SamplingParams, adjust_logits
from sybil.spec.batch_k import BatchK
from sybil.spec.controller import Controller, FixedK, Prediction, RoundOutcome
from sybil.spec.drafter import Drafter, Proposal

PROMPT_SCORE_CHUNK = 256  # prompt tokens per forward when their logits are kept (echo): 256 x V floats


def make_controller(k: int | str | Controller, context: int) -> Controller:
    """The window controller for k: a number (FixedK), "auto" (BatchK: each row's own
    window, priced for the whole batch), or a controller carried over from earlier calls."""
    if isinstance(k, Controller):
        return k
    if k == "auto":
        return BatchK(k_max=min(BatchK.K_MAX, context - 1))
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise SybilError(f"k must be a positive integer or 'auto', got {k!r}") from None
    if not 1 <= k < context:
        raise SybilError(f"k must be between 1 and {context - 1} (the model's context), got {k}")
    return FixedK(k)


@dataclass
class Committed:
    """What one round committed for one row (the engine's output, as vLLM's EngineCoreOutput)."""

    slot: int
    tokens: list[int]  # cut where the row ended
    out: Generation  # finish_reason set when the row ended this round
    drafted: int
    accepted: int  # how many of tokens were drafts
    logprobs: list[TokenLogprob] | None = None  # one per token, when the row asked for them


@dataclass
class Plan:
    """What a round will do, decided before it runs."""

    windows: list[int | None]  # each slot's draft window; None for a slot with no running row
    chunks: list[list[int]]  # prompt tokens each slot feeds (chunked prefill)
    decoding: list[bool]  # the slot commits a token this round (its prompt is all in after its chunk)
    started: int  # rows that were decoding when the round was planned (the prefill budget's rows)
    predicted: Prediction | None  # what the controller expects (logged rounds only)


class EngineCore:
    """A fixed number of slots over one preallocated cache, the drafter and the window
    controller. Per-slot state is one Sequence each (sybil.engine.sequence)."""

    def __init__(
        self, model: GPT, slots: int, max_len: int, drafter: Drafter | None = None,
        k: int | str | Controller = "auto", graphs: bool = False, prefill_chunk: int | str | None = None,
        *, prompt_cache: bool = True, on_round: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        self.model, self.drafter = model, drafter
        self.controller = make_controller(k, model.config.n_positions) if drafter is not None else None
        self.k_max = min(self.controller.k_max, model.config.n_positions - 1) if self.controller else 0
        if self.controller is not None:
            self.controller.prime(drafter.cost_prior)
        self.slots: list[Sequence | None] = [None] * slots
        self.cache = KVCache.for_model(model.config, slots, max_len, dtype=model.dtype, device=model.device)
        self.graphs = StepGraphs(model, self.cache) if graphs else None
        # A slot's cache entries are bitwise what recomputing them gives only where every
        # kernel computes rows and queries independently whatever the split: the CPU kernels.
        reuse = self.cache.k.device.type == "cpu" and native.available() and \
            model.dtype in (torch.float32, torch.bfloat16)
        self.prompts = PromptCache(slots, reuse and prompt_cache)
        # Chunked prefill: a new prompt's tokens are fed, `chunk` per round in all, inside the
        # rounds that decode the other rows, so no running row waits for more than one chunk.
        # Only where entries do not depend on the split.
        self.prefill = PrefillBudget(prefill_chunk) if prefill_chunk is not None else None
        self.chunk = PrefillBudget.FIRST if self.prefill and reuse else None
        self.on_round = on_round  # gets each round's record (sybil.engine.round_log)
        self.cached_tokens = 0  # prompt tokens taken from the slots' earlier sequences, in all
        self.adds = self.rounds = 0
        self.prefilled = 0  # prompt tokens the last round fed
        self.start = time.perf_counter()

    # ---- slots
    @property
    def active(self) -> int:
        """Rows running."""
        return sum(s is not None and s.running for s in self.slots)

    def free_slots(self) -> list[int]:
        return [b for b, s in enumerate(self.slots) if s is None or not s.running]

    def prefilling(self, slot: int) -> bool:
        s = self.slots[slot]
        return s is not None and s.prefilling

    def _tokens(self) -> list[list[int]]:
        return [s.tokens if s is not None else [] for s in self.slots]

    def reusable(self, slot: int, prompt: list[int]) -> int:
        """How many of prompt's cache entries the slot already holds (sybil.engine.prompt_cache)."""
        s = self.slots[slot]
        return self.prompts.reusable(s.tokens if s else [], int(self.cache.lengths[slot]), prompt, slot)

    def best_slot(self, prompt: list[int], among: list[int]) -> int:
        """Of the free slots `among`, the one whose earlier sequence shares the longest
        prefix with prompt (its entries are reused, as llama.cpp's server picks slots);
        on a tie the least recently taken (an empty one first), so that a prompt sharing
        nothing overwrites the oldest sequence, not the one that just ended: one client
        alternating two prompts finds each still cached. Then the first."""
        order = [s.order if s is not None else 0 for s in self.slots]
        return max(among, key=lambda b: (self.reusable(b, prompt), -order[b], -b))

    def prefault(self) -> None:
        """Back every page of the target's and the draft's caches now (KVCache.prefault):
        for a server, which would otherwise pay it in the first round of each slot."""
        self.cache.prefault()
        if self.drafter is not None:
            self.drafter.prefault()

    def capture_s(self) -> float:
        """Seconds spent capturing CUDA graphs, target and draft."""
        return (self.graphs.capture_s if self.graphs else 0.0) + (self.drafter.capture_s() if self.drafter else 0.0)

    def add(
        self, slot: int, out: Generation, max_new: int, params: SamplingParams, seed: int | None,
        stop_at_eos: bool = True, *, logprobs: int | None = None, prompt_logprobs: int | None = None,
    ) -> int:
        """Start out (its prompt checked by the caller) in a free slot; it takes part from
        the next step on. Returns how many prompt tokens the slot took from the cache.

        The slot takes the longest prefix of the prompt that any slot's entries hold (its
        own earlier sequence, or a copy from another slot); the rest, all but the last
        token, is prefilled: in chunks inside later rounds (chunked prefill), or now, on
        that slot alone. logprobs=N fills out.logprobs as tokens are committed and
        prompt_logprobs=N out.prompt_logprobs now (N alternatives each; a shared prefix
        scored with N alternatives before is not scored again). With max_new 0 the prompt
        is only scored: out ends at once and the slot stays free."""
        if slot not in self.free_slots():
            raise ValueError(f"slot {slot} is busy")
        start = time.perf_counter()
        if seed is None and not params.greedy:
            seed = secrets.randbits(63)  # unseeded sampling: a fresh seed, the same rule
        prompt = out.prompt_ids
        src, keep = self.prompts.source(self._tokens(), self.cache.lengths.tolist(), slot, prompt, prompt_logprobs)
        reused = self.prompts.scores(src, keep) if prompt_logprobs is not None and keep else None
        if src != slot and keep:
            self.cache.copy_prefix(src, slot, keep)
        if self.drafter is not None:
            self.drafter.begin(slot, src, keep)
        self.adds += 1
        seq = Sequence(out, params, seed, max_new, stop_at_eos, Telemetry(self.k_max), start, top=logprobs,
                       counts=torch.zeros(self.model.config.vocab_size) if params.penalised else None,
                       tokens=list(prompt), cached=keep, order=self.adds)
        self.slots[slot] = seq
        self.cache.set_lengths(slot, [keep])
        scored = None
        if prompt_logprobs is None and self.chunk:
            seq.pending = prompt[keep:-1]
        elif prompt_logprobs is None:
            prefill_row(self.model, self.cache, slot, prompt[keep:-1])
        else:
            scored = self._score(slot, prompt, keep, reused, prompt_logprobs)
        self.prompts.remember(slot, scored, prompt_logprobs)
        out.prompt_logprobs = scored
        out.logprobs = [] if logprobs is not None else None
        self.cached_tokens += keep
        if self.controller is not None:
            self.controller.start(slot)
        if max_new == 0:
            seq.first_s = time.perf_counter() - start
            out.finish_reason, out.stats = "length", seq.stats(seq.first_s)
            seq.running = False
        return keep

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

    def remove(self, slot: int) -> None:
        """Drop a row (cancelled): its slot is free for the next add."""
        self._release(slot)

    def _release(self, slot: int) -> None:
        """The slot's sequence ended: feed no more of its prompt. Its tokens stay for the
        prompt cache, and a lookup drafter keeps them too."""
        seq = self.slots[slot]
        seq.running, seq.pending = False, []
        if self.drafter is not None:
            self.drafter.retire(slot, seq.tokens)

    # ---- one round
    def step(self) -> list[Committed]:
        """One round for every running row. The rows that ended have finish_reason and
        stats set, and their slots are free again."""
        plan = self._plan()
        t0 = time.perf_counter()
        proposals = self._draft(plan)
        t1 = time.perf_counter()
        logits = self._forward(plan, proposals)
        accepted = self._accept(plan, proposals, logits)
        draft_s, verify_s = t1 - t0, time.perf_counter() - t1
        outcome = self._outcome(proposals, accepted, draft_s, verify_s)
        if self.prefill:
            self.prefill.update(self.prefilled, plan.started, verify_s, sum(d for d, _ in outcome.rows.values()))
        if self.controller is not None and outcome.rows:
            self.controller.learn(outcome)
        now = time.perf_counter()
        done = [self._commit(b, proposals[b].tokens, n, tok, lp, draft_s, verify_s, now)
                for b, (n, tok, lp) in accepted.items()]
        self.rounds += 1
        if self.on_round is not None:
            self.on_round(self._record(plan, outcome, done, now))
        return done

    def _plan(self) -> Plan:
        """Each running row's window and each slot's prompt chunk for this round."""
        started = [s is not None and s.running and not s.prefilling for s in self.slots]
        if self.prefill and self.chunk:
            self.chunk = self.prefill.tokens(sum(started))
        max_len = self.cache.max_len
        rooms = {b: s.room(max_len) for b, s in enumerate(self.slots) if started[b]}
        chunks = self._chunks()
        ks, predicted = {}, None
        if self.controller is not None:
            extra = sum(len(c) for c in chunks)  # what the round feeds, not all that waits
            lag = self.drafter.lag(self._tokens())
            lags = {b: lag[b] for b in rooms} if lag else None
            ks = self.controller.windows(rooms, extra, lags)
            if self.on_round is not None:  # what the controller expects, logged
                predicted = self.controller.predict(ks, rooms, extra, lags)
            confidence = self.controller.min_confidence()
            if confidence is not None:
                self.drafter.set_min_confidence(confidence)
        running = [s is not None and s.running for s in self.slots]
        windows = [ks.get(b, 0) if running[b] else None for b in range(len(self.slots))]
        decoding = [running[b] and len(chunks[b]) == len(s.pending) for b, s in enumerate(self.slots)]
        return Plan(windows, chunks, decoding, sum(started), predicted)

    def _chunks(self) -> list[list[int]]:
        """This round's prompt tokens per slot, self.chunk in all. Shortest remaining first
        (the order that minimises the mean time to first token), each round a prompt
        waits counting as one chunk fewer, so that a long prompt is never starved."""
        budget, chunks = self.chunk or 0, [[] for _ in self.slots]
        joined = [b for b, s in enumerate(self.slots) if s is not None and s.pending]
        for b in joined:
            self.slots[b].waited += 1
        for b in sorted(joined, key=lambda b: (len(self.slots[b].pending) - budget * self.slots[b].waited, b)):
            pending = self.slots[b].pending
            chunks[b], budget = pending[:budget], budget - min(budget, len(pending))
        return chunks

    def _draft(self, plan: Plan) -> list[Proposal]:
        """Up to each decoding row's window of draft tokens (a row finishing its prompt
        this round decodes without drafts)."""
        want = [(k or 0) if d and not s.pending else 0
                for k, d, s in zip(plan.windows, plan.decoding, self.slots)]
        if self.drafter is None or not any(want):
            return [Proposal([]) for _ in self.slots]
        if self.chunk:  # the draft catches up as fast as the target's prompts are fed
            self.drafter.set_chunk(self.chunk)
        seeds = [s.seed if s is not None else None for s in self.slots]
        params = [s.params if s is not None else SamplingParams() for s in self.slots]
        return self.drafter.propose(self._tokens(), want, seeds, params)

    def _forward(self, plan: Plan, proposals: list[Proposal]) -> torch.Tensor | None:
        """One target forward: each slot's prompt chunk, then a decoding row's last token
        and drafts. Logits only for the decoding rows' last 1 + k tokens."""
        rows = [[*c, s.tokens[-1], *p.tokens] if d else c
                for s, p, c, d in zip(self.slots, proposals, plan.chunks, plan.decoding)]
        tail = [1 + len(p.tokens) if d else 0 for p, d in zip(proposals, plan.decoding)]
        logits = forward_rows(self.model, self.cache, rows, self.graphs, tail=tail)
        self.prefilled = sum(len(c) for c in plan.chunks)
        for s, c in zip(self.slots, plan.chunks):
            if c:
                s.pending = s.pending[len(c) :]
        return logits

    def _accept(self, plan: Plan, proposals: list[Proposal], logits: torch.Tensor | None
                ) -> dict[int, tuple[int, int, list[TokenLogprob] | None]]:
        """Per decoding row: (drafts accepted, the target's own next token, their
        log-probabilities if asked). Appends them to the row's tokens and rewinds both
        caches to the valid prefix: a pointer move."""
        out, n_valid = {}, []
        for b, (s, prop) in enumerate(zip(self.slots, proposals)):
            if not plan.decoding[b]:  # idle, or a prompt chunk: its pointer stays where the forward left it
                n_valid.append(int(self.cache.lengths[b]))
                continue
            lg = logits[b, : 1 + len(prop.tokens)]  # [k+1, V]
            # The acceptance rule compares against the adjusted target, position by position.
            adj = adjust_logits(lg, s.params, s.counts, prop.tokens)
            if s.params.greedy:
                n_acc, tok = accept_greedy(prop.tokens, adj)
            else:  # the token at position len(tokens) + i is drawn with that position's noise
                n_acc, tok = accept_keyed(prop.tokens, adj, s.params, s.seed, len(s.tokens))
            n_valid.append(len(s.tokens) + n_acc)  # valid cache prefix: committed + accepted
            new = [*prop.tokens[:n_acc], tok]
            s.tokens += new
            if s.counts is not None:
                for t in new:
                    s.counts[t] += 1
            out[b] = (n_acc, tok, score(lg[: n_acc + 1], new, s.top) if s.top is not None else None)
        self.cache.truncate(n_valid)
        if self.drafter is not None:
            self.drafter.rewind(n_valid)
        return out

    def _outcome(self, proposals: list[Proposal], accepted: dict, draft_s: float, verify_s: float) -> RoundOutcome:
        """What the round drafted, accepted and cost. A catch-up forward (a new prompt, or
        tokens the draft missed during plain steps) is paid once, not per draft token:
        it stays out of the draft step's time, and counts only in a round that drafts."""
        rows = {b: (len(proposals[b].tokens), n) for b, (n, _, _) in accepted.items()}
        steps = max((d for d, _ in rows.values()), default=0)
        catchup_tokens, catchup_s = self.drafter.catchup() if steps and self.drafter else (0, 0.0)
        tokens = sum(1 + d for d, _ in rows.values()) + self.prefilled
        return RoundOutcome(rows, tokens, self.prefilled, verify_s, steps, draft_s - catchup_s,
                            catchup_tokens, catchup_s)

    def _commit(self, b: int, drafts: list[int], n_acc: int, token: int, scored: list[TokenLogprob] | None,
                draft_s: float, verify_s: float, now: float) -> Committed:
        """Row b's tokens from the round, cut where a stop rule ends it; its telemetry."""
        s = self.slots[b]
        out, tel = s.out, s.tel
        tel.rounds += 1
        tel.drafted += len(drafts)
        tel.time_draft_s += draft_s
        tel.time_verify_s += verify_s
        new = []
        for i, t in enumerate([*drafts[:n_acc], token]):
            new.append(t)
            if i < n_acc:
                tel.accepted += 1
                tel.histogram[i] += 1
            else:
                tel.target_tokens += 1
            out.finish_reason = s.stop_reason(t, len(new), self.model.config.n_positions)
            if out.finish_reason:
                break
        out.tokens += new
        scored = scored[: len(new)] if scored is not None else None
        if scored is not None:
            out.logprobs += scored
        if s.first_s is None:
            s.first_s, s.first_n = now - s.start, len(out.tokens)
        if out.finish_reason:
            out.stats = s.stats(now - s.start)
            self._release(b)
        return Committed(b, new, out, len(drafts), min(n_acc, len(new)), scored)

    def _record(self, plan: Plan, outcome: RoundOutcome, done: list[Committed], now: float) -> RoundRecord:
        """What the round fed, chose and cost (sybil.engine.round_log)."""
        rows = outcome.rows
        return RoundRecord(
            round=self.rounds, t_s=now - self.start, windows=[plan.windows[b] or 0 for b in rows],
            prefill_tokens=self.prefilled, drafted=sum(d for d, _ in rows.values()),
            accepted=sum(a for _, a in rows.values()), committed=sum(len(c.tokens) for c in done),
            verify_s=outcome.verify_s, draft_s=outcome.draft_s + outcome.catchup_s,
            catchup_tokens=outcome.catchup_tokens, catchup_s=outcome.catchup_s, predicted=plan.predicted)
