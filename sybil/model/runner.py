"""The one forward step every phase uses: prefill, decode one, verify k.

Each row of the batch feeds its own tokens at its own length pointer. Rows may
feed different numbers of tokens (ragged prompts, ragged drafts, a prompt chunk
beside one-token steps, finished rows feeding none). On the CPU the real tokens
are packed into one sequence, each with its cache row, and nothing is padded.
Elsewhere (CUDA, where shapes stay fixed for graphs) shorter rows are padded, and
their padding is written to the cache's last slot. That slot never holds a real
entry (the cache keeps every committed token but the last, so real positions stop
at max_len - 2), and a real query at position p only sees keys at j <= p, so
padding is never attended.
"""

from __future__ import annotations

import torch

from sybil.model.cuda_graphs import StepGraphs
from sybil.model.gpt import GPT
from sybil.model.kv_cache import KVCache

GRAPH_MAX_TOKENS = 16  # longer feeds (prompts) run eagerly: one shape each, not worth a graph


def forward_rows(
    model: GPT, cache: KVCache, rows: list[list[int]], graphs: StepGraphs | None = None, vocab: int | None = None,
    tail: list[int] | None = None,
) -> torch.Tensor | None:
    """Logits [B, T, V] for rows of token ids; row b's real logits are [b, :len(rows[b])]
    (T = the longest row). With tail, only row b's last tail[b] tokens get logits, at
    [b, :tail[b]] (T = the largest tail): a chunk of a prompt fed with other rows' steps
    needs none. Each row's pointer ends after its own tokens. None when no row has a
    token, or no logits are wanted (vocab=0: a prefill). With graphs, the forward is a replayed CUDA graph
    (its logits are valid until the next call). vocab: see GPT.forward.

    On the CPU the rows are packed (their real tokens one after another, each with its
    cache row), so a ragged forward costs its real tokens, not rows x the longest."""
    if max(len(r) for r in rows) == 0:
        return None
    tail = [len(r) for r in rows] if tail is None else [min(n, len(r)) for n, r in zip(tail, rows)]
    if graphs is None and cache.k.device.type == "cpu":
        return _packed(model, cache, rows, vocab, tail)
    logits = _padded(model, cache, rows, graphs, vocab)
    if all(n == len(r) for n, r in zip(tail, rows)):
        return logits
    if not any(tail):
        return None
    out = logits.new_empty((len(rows), max(tail), logits.shape[-1]))
    for b, (n, r) in enumerate(zip(tail, rows)):
        out[b, :n] = logits[b, len(r) - n : len(r)]
    return out


def _packed(model: GPT, cache: KVCache, rows: list[list[int]], vocab: int | None, tail: list[int]
            ) -> torch.Tensor | None:
    lengths = cache.lengths
    counts = torch.tensor([len(r) for r in rows])
    if int((lengths + counts).max()) > cache.max_len:
        raise ValueError(f"a row would write past the cache length {cache.max_len}")
    live = [b for b, r in enumerate(rows) if r]
    idx = torch.tensor([t for b in live for t in rows[b]])[None]  # [1, N]: every real token, row after row
    pos = torch.cat([int(lengths[b]) + torch.arange(len(rows[b])) for b in live])[None]  # [1, N]
    owner = torch.cat([torch.full((len(rows[b]),), b) for b in live])  # [N]: each token's cache row
    hidden = model(idx, cache, input_pos=pos, vocab=0, rows=owner)[0]  # [N, C]
    cache.advance(counts)
    if vocab == 0 or not any(tail):
        return None
    ends = torch.cumsum(counts[live], 0).tolist()
    keep = torch.cat([torch.arange(e - n, e) for b, e in zip(live, ends) if (n := tail[b])])  # [M]
    logits = model.head(hidden[keep], vocab)  # [M, V]
    out = logits.new_empty((len(rows), max(tail), logits.shape[-1]))  # [B, max tail, V]
    at = 0
    for b in live:
        out[b, : tail[b]] = logits[at : at + tail[b]]
        at += tail[b]
    return out


def _padded(model: GPT, cache: KVCache, rows: list[list[int]], graphs: StepGraphs | None, vocab: int | None
            ) -> torch.Tensor:
    """Shorter rows padded to the longest; their padding is written to the cache's last
    slot (see the module docstring). CUDA and graphs take this path: fixed shapes."""
    t = max(len(r) for r in rows)
    live = [b for b, r in enumerate(rows) if r]
    lo, hi = live[0], live[-1] + 1
    if graphs is None and hi - lo < len(rows):
        # Idle rows at either end (free server slots) stay out of the forward: a padded
        # query costs as much as a real one. Their logits rows are left unset.
        view = cache.rows(lo, hi)
        part = _padded(model, view, rows[lo:hi], None, vocab)
        cache.set_lengths(lo, view.lengths)
        logits = part.new_empty((len(rows), *part.shape[1:]))
        logits[lo:hi] = part
        return logits
    scratch = cache.max_len - 1
    lengths = cache.lengths
    counts = torch.tensor([len(r) for r in rows])
    if int((lengths + counts).max()) > cache.max_len:
        raise ValueError(f"a row would write past the cache length {cache.max_len}")
    pos = cache.next_positions(t)  # [B, T]
    idx = torch.zeros(len(rows), t, dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            if lengths[b] + len(row) > scratch and len(row) < t:
                raise ValueError(f"row {b} would reach the cache's scratch slot {scratch}")
            idx[b, : len(row)] = torch.tensor(row)
        pos[b, len(row) :] = scratch
    if graphs is not None and t <= GRAPH_MAX_TOKENS:
        logits = graphs(idx, pos)
    else:
        logits = model(idx.to(model.device), cache, input_pos=pos, vocab=vocab)
    cache.advance(counts)
    return logits


def prefill_row(model: GPT, cache: KVCache, row: int, tokens: list[int]) -> None:
    """Write tokens into one row's cache at its pointer, computing no logits. The
    forward runs on that row alone (forward_rows leaves idle rows out), so other
    rows neither pay for its length nor change. On the CPU, where every kernel
    computes rows and queries independently, its entries are bitwise those of
    any other split of the same tokens."""
    if not tokens:
        return
    forward_rows(model, cache, [tokens if b == row else [] for b in range(cache.batch)], vocab=0)


def last_logits(logits: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
    """Each row's logits after its last real token: [B, V] (rows without tokens get row 0)."""
    ends = torch.tensor([max(len(r) - 1, 0) for r in rows], device=logits.device)
    return logits[torch.arange(len(rows), device=logits.device), ends]
