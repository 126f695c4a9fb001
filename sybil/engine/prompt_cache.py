"""The prompt cache: which slot's cache entries a new prompt can take, and how many.

A slot keeps its sequence's entries after the request ends, and entries of a running
row's committed tokens stay valid while it runs. A new prompt takes the longest prefix
any slot holds: its own slot's (nothing to copy: llama.cpp's servers pick slots so) or
another's (KVCache.copy_prefix: copying n positions costs far less than recomputing
them). A prompt whose log-probabilities are asked (echo with logprobs: an evaluation
client scoring one context once per answer) also takes those of a scored prefix.

Only where entries are bitwise those of a fresh prefill, whatever the split: the CPU
kernels compute every row and query on its own (the engine core decides, `enabled`).

When more requests wait than slots are free, the order they are admitted in decides
what the cache keeps (next_admission): a free slot is overwritten by whoever takes it.
"""

from __future__ import annotations

from typing import Callable


def shared_prefix(old: list[int], prompt: list[int], limit: int) -> int:
    """How many leading tokens old and prompt share, at most limit."""
    n = 0
    while n < limit and old[n] == prompt[n]:
        n += 1
    return n


def next_admission(prompts: list[list[int]], passed: list[int], lend: Callable[[list[int]], int],
                   patience: int) -> int:
    """Which of the waiting prompts (oldest first) takes a free slot next: the one that
    the free slots lend most entries to, the oldest on a tie (so first come, first
    served wherever the cache does not care), unless one has been passed over
    `patience` times: then the oldest of those, so that none waits for ever.

    First come, first served destroys what the cache holds once slots free up one at a
    time: the oldest waiting prompt, which a running slot could lend by copy, took the
    one free slot and overwrote the prompt the next in line needed (with a draft rows end
    in different rounds, so slots free up one at a time more often). lend(p):
    the most entries any free slot holds of p (PromptCache.reusable)."""
    overdue = [i for i, n in enumerate(passed) if n >= patience]
    if overdue:
        return overdue[0]
    gains = [lend(p) for p in prompts]
    return max(range(len(prompts)), key=lambda i: (gains[i], -i))


class PromptCache:
    def __init__(self, slots: int, enabled: bool) -> None:
        self.enabled = enabled
        # each slot's scored prompt: (its log-probabilities, the alternatives asked), or None
        self.scored: list[tuple[list, int] | None] = [None] * slots

    def reusable(self, seq: list[int], valid: int, prompt: list[int], slot: int, top: int | None = None) -> int:
        """How many of prompt's entries (all but its last token's) a slot holding seq, of
        which `valid` entries are written, can lend; with top (the prompt is to be
        scored), only as far as that slot's own prompt was scored with top alternatives."""
        if not self.enabled:
            return 0
        limit = min(valid, len(prompt) - 1)
        if top is not None:
            scored = self.scored[slot]
            limit = min(limit, len(scored[0]) if scored is not None and scored[1] == top else 0)
        return shared_prefix(seq, prompt, limit)

    def source(self, seqs: list[list[int]], valid: list[int], slot: int, prompt: list[int], top: int | None = None
               ) -> tuple[int, int]:
        """The slot lending most of prompt, and how many entries: (source, n); slot itself
        on a tie, where nothing needs copying."""
        return max(((b, self.reusable(s, v, prompt, b, top)) for b, (s, v) in enumerate(zip(seqs, valid))),
                   key=lambda bn: (bn[1], bn[0] == slot))

    def scores(self, slot: int, n: int) -> list:
        """The first n log-probabilities of the slot's scored prompt."""
        return list(self.scored[slot][0][:n])

    def remember(self, slot: int, scored: list | None, top: int | None) -> None:
        """The slot's new prompt and its log-probabilities (None: not scored)."""
        self.scored[slot] = (scored, top) if scored is not None else None
