"""Drafters propose tokens; they never decide what is kept (that is sybil.verify).

A drafter sees the committed sequence, proposes up to k tokens, and is told after
verification how many committed tokens its state may keep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from sybil.cuda_graphs import StepGraphs
from sybil.kv_cache import KVCache
from sybil.model import GPT
from sybil.sampling import SamplingParams, keyed_token, probs_from_logits
from sybil.steps import forward_rows, last_logits, prefill_row


@dataclass
class Proposal:
    """Drafted tokens. Every proposal is deterministic given the row's seed: a sampled
    row drafts by its position-keyed noise, as the target chooses (sybil.verify)."""

    tokens: list[int]


class Drafter(Protocol):
    def propose(
        self,
        seqs: list[list[int]],
        ks: list[int],
        seeds: list[int | None],
        params: list[SamplingParams] | None = None,
    ) -> list[Proposal]:
        """Up to ks[b] draft tokens after each row's committed tokens seqs[b], chosen
        with row b's sampling parameters params[b] (sampled rows: by the Gumbel noise
        of each position from seeds[b], as the target chooses)."""

    def rewind(self, n_valid: list[int]) -> None:
        """Only the first n_valid[b] tokens of what row b last saw and proposed still
        stand (0 when the row starts a new sequence)."""

    # Optional: cost_prior, a draft step in target steps before any is measured (k="auto");
    # retire(slot, tokens), told that the sequence a slot held ended (a lookup drafter keeps it).


class ModelDrafter:
    """Drafts with a (smaller) GPT-2 and its own KV cache, all rows in lockstep.

    Its cache holds a prefix of each row's committed + proposed tokens; each
    proposal first feeds whatever committed tokens the cache lacks (the prompt
    on the first round, then the one or two tokens that verification added) in
    one forward; with chunk set (a server's chunked prefill) a row far behind
    catches up chunk tokens per round and drafts once it is level. min_confidence > 0 ends a row's proposal once the product of the
    draft's probabilities for its own tokens (its estimate that all are
    accepted) drops below it.

    vocab=N drafts from ids below N and <|endoftext|> only (GPT.forward's reduced
    head). The draft never decides what is kept: its q is its own distribution
    renormalised on that subset, and the rejection rule still yields the target's
    distribution exactly.
    """

    def __init__(
        self,
        model: GPT,
        params: SamplingParams,
        max_len: int,
        batch: int = 1,
        min_confidence: float = 0.0,
        graphs: bool = False,
        vocab: int | None = None,
    ) -> None:
        self.model = model
        self.params = params
        self.min_confidence = min_confidence
        self.cost_prior = 1.0  # a target step, until make_drafter sets the weight ratio
        self.vocab = vocab
        self.catchup_s = 0.0  # seconds of the last proposal's catch-up forwards (0 if none ran)
        self.catchup_tokens = 0  # and the tokens they fed
        self.chunk: int | None = None  # catch up at most this many tokens per proposal (Decoder sets it)
        self.cache = KVCache.for_model(model.config, batch, max_len, dtype=model.dtype, device=model.device)
        # the captured steps compute the whole head; a reduced head runs eagerly
        self.graphs = StepGraphs(model, self.cache) if graphs and vocab is None else None
        # One throwaway step now: the first forward of a model pays for touching its
        # weights (page faults, first-use allocations), up to 20x a step, and a k="auto"
        # controller would otherwise take that for the draft's cost.
        if self.graphs is None:
            forward_rows(self.model, self.cache, [[0]] + [[] for _ in range(batch - 1)], vocab=vocab)
            self.cache.truncate(0)

    @torch.inference_mode()
    def propose(
        self,
        seqs: list[list[int]],
        ks: list[int],
        seeds: list[int | None],
        params: list[SamplingParams] | None = None,
    ) -> list[Proposal]:
        params = params or [self.params] * len(seqs)
        # The draft writes positions up to len(seq) + k - 2; its last cache slot is scratch.
        ks = [max(0, min(k, self.cache.max_len - len(s))) for k, s in zip(ks, seqs)]
        # A row that lacks more than the one or two tokens a verification adds (a new
        # prompt, or the tokens of plain steps) catches up alone, up to its last token,
        # so that the batch is not padded to its length. That catch-up is timed apart
        # so that k="auto" can tell it from a draft step.
        t = time.perf_counter()
        behind = [b for b, (s, k) in enumerate(zip(seqs, ks)) if k and len(s) - int(self.cache.lengths[b]) > 2]
        before = int(self.cache.lengths.sum())
        if self.chunk and behind:  # chunked, as the target's prompts: chunk tokens in all this round
            budget, feed = self.chunk, [[] for _ in seqs]
            for b in behind:
                feed[b] = seqs[b][int(self.cache.lengths[b]) : -1][:budget]
                budget -= len(feed[b])
            forward_rows(self.model, self.cache, feed, vocab=0)
            # a row still behind drafts from a later round
            ks = [0 if len(s) - int(n) > 2 else k for s, k, n in zip(seqs, ks, self.cache.lengths)]
        else:
            for b in behind:
                prefill_row(self.model, self.cache, b, seqs[b][int(self.cache.lengths[b]) : -1])
        self.catchup_s = time.perf_counter() - t if behind else 0.0
        self.catchup_tokens = int(self.cache.lengths.sum()) - before
        rows = [s[int(n) :] if k else [] for s, k, n in zip(seqs, ks, self.cache.lengths)]
        out = [Proposal([]) for _ in params]
        confidence = [1.0] * len(seqs)
        active = [k > 0 for k in ks]
        while any(active):
            logits = last_logits(forward_rows(self.model, self.cache, rows, self.graphs, self.vocab), rows)
            rows = [[] for _ in seqs]
            for b, p in enumerate(out):
                if not active[b]:
                    continue
                position = len(seqs[b]) + len(p.tokens)
                if params[b].greedy:
                    tok = self._pick_greedy(logits[b], b, position)
                else:  # the target's rule on the draft's distribution, with the same noise
                    tok = keyed_token(probs_from_logits(logits[b], params[b]), seeds[b], position)
                p.tokens.append(tok)
                if self.min_confidence > 0:
                    confidence[b] *= self._confidence(logits[b], tok)
                active[b] = len(p.tokens) < ks[b] and confidence[b] >= self.min_confidence
                if active[b]:
                    rows[b] = [tok]  # the last draft is never fed: verification covers it
        return out

    def _pick_greedy(self, logits: torch.Tensor, row: int, position: int) -> int:
        """The greedy draft token for a row's `position`; the benchmark's simulated-acceptance
        drafter overrides this to keep the model's cost but choose the token itself."""
        return int(logits.argmax())

    def _confidence(self, logits: torch.Tensor, token: int) -> float:
        """The draft's own probability of its token: its estimate that the token is accepted."""
        return float(torch.softmax(logits.float(), -1)[token])

    def rewind(self, n_valid: list[int]) -> None:
        self.cache.truncate(torch.minimum(torch.tensor(n_valid), self.cache.lengths))

    def lag(self, seqs: list[list[int]]) -> list[int]:
        """Tokens each row's cache lacks of its committed sequence: what drafting it next
        must first feed (a verification adds one or two; plain steps add more)."""
        return [max(len(s) - int(n), 0) for s, n in zip(seqs, self.cache.lengths)]

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Row dst starts with the first n tokens of row src's sequence: copy the entries
        the draft holds of them (it catches up on the rest when it next drafts)."""
        self.cache.copy_prefix(src, dst, min(n, int(self.cache.lengths[src])))


def weight_bytes(model: GPT) -> int:
    """Bytes read per decoded token: every weight once (named_parameters counts the tied
    head once), int8 ones and their scales included; wpe is read one row, so not counted."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return sum(p.numel() * p.element_size() for n, p in tensors if n != "wpe.weight")


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens and
    propose what followed it. No model; proposals are deterministic."""

    cost_prior = 0.0  # a lookup in the committed tokens: next to a forward, free

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, seqs: list[list[int]], ks: list[int], seeds=None, params=None) -> list[Proposal]:
        return [self.lookup(s, k) for s, k in zip(seqs, ks)]

    def lookup(self, committed: list[int], k: int) -> Proposal:
        if k <= 0:
            return Proposal([])
        n_tok = len(committed)
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            tail = committed[n_tok - n :]
            for start in range(n_tok - n - 1, -1, -1):
                if committed[start : start + n] == tail:
                    follow = committed[start + n : start + n + k]
                    return Proposal(follow)
        return Proposal([])

    def rewind(self, n_valid: list[int]) -> None:
        pass


class Cascade:
    """Drafters in order of preference, each row taking the first proposal that is not
    empty: a free lookup (suffix, n-gram) in front of a model, which then drafts only
    the rows the lookup could not (it catches up on the others when it next drafts them)."""

    def __init__(self, drafters: list) -> None:
        self.drafters = drafters
        self.cost_prior = max(getattr(d, "cost_prior", 1.0) for d in drafters)

    def propose(self, seqs, ks, seeds, params=None) -> list[Proposal]:
        out = [Proposal([]) for _ in seqs]
        left = list(ks)
        for d in self.drafters:
            if not any(left):
                break
            for b, p in enumerate(d.propose(seqs, left, seeds, params)):
                if p.tokens and left[b]:
                    out[b], left[b] = p, 0
        return out

    def rewind(self, n_valid: list[int]) -> None:
        for d in self.drafters:
            d.rewind(n_valid)

    def retire(self, slot: int, tokens: list[int]) -> None:
        for d in self.drafters:
            if hasattr(d, "retire"):
                d.retire(slot, tokens)

    @property
    def catchup_s(self) -> float:
        return sum(getattr(d, "catchup_s", 0.0) for d in self.drafters)

    @property
    def catchup_tokens(self) -> int:
        return sum(getattr(d, "catchup_tokens", 0) for d in self.drafters)

    @property
    def models(self) -> list[ModelDrafter]:
        return [d for d in self.drafters if isinstance(d, ModelDrafter)]
