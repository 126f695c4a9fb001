"""Drafting with a (smaller) GPT-2 and its own KV cache, all rows in lockstep."""

from __future__ import annotations

import time

import torch

from sybil.model.cuda_graphs import StepGraphs
from sybil.model.gpt import GPT
from sybil.model.kv_cache import KVCache
from sybil.model.runner import forward_rows, last_logits, prefill_row
from sybil.sample.keyed import keyed_token
from sybil.sample.params import SamplingParams, probs_from_logits
from sybil.spec.drafter import Drafter, Proposal


class ModelDrafter(Drafter):
    """Drafts with a (smaller) GPT-2 and its own KV cache, all rows in lockstep.

    Its cache holds a prefix of each row's committed + proposed tokens; each
    proposal first feeds whatever committed tokens the cache lacks (the prompt
    on the first round, then the one or two tokens that verification added) in
    one forward; with chunk set (a server's chunked prefill) a row far behind
    catches up chunk tokens per round and drafts once it is level. min_confidence > 0 ends a row's proposal once the product of the
    draft's probabilities for its own tokens (its estimate that all are
    accepted) drops below it.

    vocab=N drafts from ids below N and <|endoftext|> only (GPT.forward's reduced
    head). The draft never decides what is kept: it proposes from its own distribution
    renormalised on that subset, and the position-keyed acceptance rule keeps only the
    tokens the target itself chooses (sybil.sample.accept), so the output is unchanged.
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
        cost_prior: float = 1.0,
    ) -> None:
        self.model = model
        self.params = params
        self.min_confidence = min_confidence
        # a draft step in target steps until one is measured: the caller's estimate (the
        # engine passes the ratio of weight bytes, since a decode step reads every weight once)
        self.cost_prior = cost_prior
        self.vocab = vocab
        self.catchup_s = 0.0  # seconds of the last proposal's catch-up forwards (0 if none ran)
        self.catchup_tokens = 0  # and the tokens they fed
        self.chunk: int | None = None  # catch up at most this many tokens per proposal (set_chunk)
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
                    tok = self.pick_greedy(logits[b], b, position)
                else:  # the target's rule on the draft's distribution, with the same noise
                    tok = keyed_token(probs_from_logits(logits[b], params[b]), seeds[b], position)
                p.tokens.append(tok)
                if self.min_confidence > 0:
                    confidence[b] *= self.confidence(logits[b], tok)
                active[b] = len(p.tokens) < ks[b] and confidence[b] >= self.min_confidence
                if active[b]:
                    rows[b] = [tok]  # the last draft is never fed: verification covers it
        return out

    def pick_greedy(self, logits: torch.Tensor, row: int, position: int) -> int:
        """The greedy draft token for a row's `position`. A hook for subclasses: the
        benchmark's simulated-acceptance drafter keeps the model's cost but picks the token."""
        return int(logits.argmax())

    def confidence(self, logits: torch.Tensor, token: int) -> float:
        """The draft's own probability of its token: its estimate that the token is accepted
        (a hook too: the simulated drafter knows its acceptance instead)."""
        return float(torch.softmax(logits.float(), -1)[token])

    def rewind(self, n_valid: list[int]) -> None:
        self.cache.truncate(torch.minimum(torch.tensor(n_valid), self.cache.lengths))

    def lag(self, seqs: list[list[int]]) -> list[int]:
        """Tokens each row's cache lacks of its committed sequence: what drafting it next
        must first feed (a verification adds one or two; plain steps add more)."""
        return [max(len(s) - int(n), 0) for s, n in zip(seqs, self.cache.lengths)]

    def begin(self, slot: int, source: int, keep: int) -> None:
        """The draft's entries of the shared prefix are as valid as the target's: copied
        from the source row (as many as it holds), or its own kept; it catches up on the
        rest when it next drafts."""
        if source != slot and keep:
            self.cache.copy_prefix(source, slot, min(keep, int(self.cache.lengths[source])))
        else:
            self.cache.set_lengths(slot, [min(keep, int(self.cache.lengths[slot]))])

    def catchup(self) -> tuple[int, float]:
        return self.catchup_tokens, self.catchup_s

    def set_chunk(self, chunk: int | None) -> None:
        self.chunk = chunk

    def set_min_confidence(self, confidence: float) -> None:
        self.min_confidence = confidence

    def prefault(self) -> None:
        self.cache.prefault()

    def capture_s(self) -> float:
        return self.graphs.capture_s if self.graphs is not None else 0.0
