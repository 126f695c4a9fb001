"""Suffix drafting (`--draft suffix`): continuations looked up in what was already written.

SuffixDecoding (Oliaro et al., 2024) drafts from a suffix index over the request's own
prompt and output and over other requests' recent outputs. Agents, templated requests
and evaluation clients repeat themselves, so the longest earlier occurrence of a row's
last tokens is often followed by what the row is about to produce. It runs no model, so
its drafts are free, and like every drafter it only proposes: verification keeps the
output exactly what the target alone gives.

The index maps each pair of consecutive tokens to the places it occurred (the most
recent ones), in the live sequences of the slots and in the sequences that ended; a
lookup extends each candidate backwards to measure how long the match is and keeps the
longest (on a tie, the continuation most of them share, as SuffixDecoding scores a
tree's branches by frequency). The draft is at most as long as the match: a long
match is a repeat, a short one a guess.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict, deque

from sybil.sample.params import SamplingParams
from sybil.spec.drafter import Drafter, Proposal


class SuffixIndex:
    KEY = 2  # tokens that index a place
    PLACES = 64  # most recent places kept per key and sequence (one sequence never crowds out another's)
    DOCS = 32  # most recent sequences a lookup searches per key
    MAX_MATCH = 1024  # a match is measured up to this many tokens (GPT-2's context)

    def __init__(self, max_docs: int = 256) -> None:
        self.docs: dict[int, list[int]] = {}
        self.ended: deque[int] = deque()  # ids of the sequences that ended, oldest first
        self.max_docs = max_docs
        # key -> {sequence: where the tokens after the key start}, the most recent sequence last
        self.places: dict[tuple[int, ...], OrderedDict[int, deque[int]]] = defaultdict(OrderedDict)
        self.next_id = 0

    def open(self) -> int:
        """A new sequence to grow with extend."""
        self.next_id += 1
        self.docs[self.next_id] = []
        return self.next_id

    def extend(self, doc: int, tokens: list[int]) -> None:
        seq = self.docs[doc]
        start = len(seq)
        seq += tokens
        for i in range(max(start, self.KEY), len(seq) + 1):
            where = self.places[tuple(seq[i - self.KEY : i])]
            if doc not in where:
                where[doc] = deque(maxlen=self.PLACES)
            where.move_to_end(doc)
            where[doc].append(i)  # the tokens after the key start at i

    def close(self, doc: int) -> None:
        """The sequence ended: kept for later lookups, the oldest forgotten past max_docs."""
        self.ended.append(doc)
        while len(self.ended) > self.max_docs:
            self.docs.pop(self.ended.popleft(), None)  # its places are skipped, then crowded out

    def lookup(self, tail: list[int], k: int, own: int | None = None) -> list[int]:
        """Up to k tokens that followed the longest earlier match of tail's end, and no more
        than the match is long. Among the longest matches, the continuation most of them
        share (a run of one token matches at many places; most are followed by more of it)."""
        if k <= 0 or len(tail) < self.KEY:
            return []
        found: list[tuple[int, list[int], int]] = []  # (match length, sequence, where its continuation starts)
        where = self.places.get(tuple(tail[-self.KEY :]), {})
        for doc in list(reversed(where))[: self.DOCS]:
            seq = self.docs.get(doc)
            for at in reversed(where[doc]) if seq is not None else ():
                if at >= len(seq) or (doc == own and at >= len(tail)):
                    continue  # nothing after it, or the tail itself
                found.append((_match(seq, at, tail, min(self.MAX_MATCH, at, len(tail))), seq, at))
        if not found:
            return []
        longest = max(n for n, _, _ in found)
        best = [(seq, at) for n, seq, at in found if n == longest]
        votes: dict[int, int] = {}
        for seq, at in best:
            votes[seq[at]] = votes.get(seq[at], 0) + 1
        first = max(votes, key=votes.get)  # ties: the most recent place (dicts keep insertion order)
        seq, at = next((seq, at) for seq, at in best if seq[at] == first)
        return seq[at : at + min(k, longest)]


def _match(seq: list[int], at: int, tail: list[int], cap: int) -> int:
    """How many tokens before seq[at] equal tail's last ones (at least SuffixIndex.KEY, at
    most cap), by doubling then bisecting slice comparisons: C-speed, log steps."""
    ok = lambda n: seq[at - n : at] == tail[len(tail) - n :]  # noqa: E731
    lo, hi = SuffixIndex.KEY, cap
    while lo < hi:
        n = min(hi, 2 * lo)
        if not ok(n):
            hi = n - 1
            break
        lo = n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


class SuffixDrafter(Drafter):
    """Drafts each row from a SuffixIndex over every slot's sequence and the sequences
    that ended. Kept for the life of a batch (the server's): what one request wrote
    drafts for the next."""

    cost_prior = 0.0  # a lookup: next to a forward, free

    def __init__(self, index: SuffixIndex | None = None) -> None:
        self.index = index or SuffixIndex()
        self.live: dict[int, int] = {}  # slot -> its open sequence in the index

    def _sync(self, slot: int, seq: list[int]) -> int:
        doc = self.live.get(slot)
        have = self.index.docs.get(doc) if doc is not None else None
        if have is None or seq[: len(have)] != have:  # a new sequence in this slot
            if have is not None:
                self.index.close(doc)
            doc = self.live[slot] = self.index.open()
            have = self.index.docs[doc]
        if len(seq) > len(have):
            self.index.extend(doc, seq[len(have) :])
        return doc

    def propose(self, seqs: list[list[int]], ks: list[int], seeds: list[int | None] | None = None,
                params: list[SamplingParams] | None = None) -> list[Proposal]:
        out = []
        for b, (seq, k) in enumerate(zip(seqs, ks)):
            doc = self._sync(b, seq) if seq else None
            out.append(Proposal(self.index.lookup(seq, k, own=doc) if k else []))
        return out

    def retire(self, slot: int, seq: list[int]) -> None:
        """The slot's sequence ended: index what it committed since the last proposal and
        keep it for later requests."""
        if seq:
            self.index.close(self._sync(slot, seq))
        self.live.pop(slot, None)
