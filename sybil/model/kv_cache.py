"""The key/value cache: preallocated once, written at explicit positions, rewound in O(1).

Every row of the batch has its own length pointer. Entries at positions below a
row's length are valid; anything beyond it is stale and is never attended to,
because the attention mask admits key position j for a query at position p only
when j <= p, and a query at position p is only ever run after positions 0..p of
its row have been (re)written. So rewinding a row never touches the buffers: it
only moves that row's pointer, and the next write overwrites the stale slots.
"""

from __future__ import annotations

import torch

from sybil.model.config import GPTConfig
from sybil.ops import memory


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layer, batch, n_head, max_len, head_dim)
        if torch.device(device).type == "cpu":  # in 2 MiB pages where the kernel offers them
            self.k, self.v = memory.zeros(shape, dtype), memory.zeros(shape, dtype)
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Kept on the CPU: the engine reads it every step to decide spans and
        # positions, and a device tensor would force a host sync each time.
        self.lengths = torch.zeros(batch, dtype=torch.long)

    @classmethod
    def for_model(
        cls,
        config: GPTConfig,
        batch: int = 1,
        max_len: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "KVCache":
        max_len = config.n_positions if max_len is None else max_len
        if not 0 < max_len <= config.n_positions:
            raise ValueError(f"cache length {max_len} must be in 1..{config.n_positions}")
        return cls(config.n_layer, batch, config.n_head, max_len, config.head_dim, dtype=dtype, device=device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def next_positions(self, t: int) -> torch.Tensor:
        """Positions [B, T] at which T new tokens per row would be written."""
        return self.lengths[:, None] + torch.arange(t)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Store k, v [B, H, T, D] at positions pos [B, T] (on the cache's device).

        No checks and no host synchronisation here, so a CUDA graph can capture
        it; GPT.forward validates positions before any write.
        """
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]  # [B, 1]
        # Advanced indices around a slice put the indexed dims first: [B, T, H, D].
        self.k[layer, rows, :, pos] = k.transpose(1, 2)
        self.v[layer, rows, :, pos] = v.transpose(1, 2)

    def view(self, layer: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, span, D] of one layer: a view, never a copy."""
        return self.k[layer, :, :, :span], self.v[layer, :, :, :span]

    def rows(self, lo: int, hi: int) -> "KVCache":
        """Rows lo..hi-1 as a cache of their own that shares this cache's buffers (a
        view, no copy) with its own copy of the pointers: a forward over some rows
        then costs those rows only. Copy the pointers back with set_lengths."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, lo:hi], self.v[:, lo:hi]  # [L, hi - lo, H, S, D]
        view.lengths = self.lengths[lo:hi].clone()
        return view

    def set_lengths(self, lo: int, lengths: torch.Tensor | list[int]) -> None:
        """Point rows lo, lo+1, ... at lengths (a row restarted for a new sequence gets 0)."""
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        if (lengths < 0).any() or (lengths > self.max_len).any():
            raise ValueError(f"row lengths {lengths.tolist()} must be in 0..{self.max_len}")
        new = self.lengths.clone()
        new[lo : lo + len(lengths)] = lengths
        self.lengths = new

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Give row dst row src's first n entries (a copy of n positions, far cheaper than
        recomputing them) and point it just past them."""
        if not 0 <= n <= int(self.lengths[src]):
            raise ValueError(f"row {src} holds {int(self.lengths[src])} entries, not {n}")
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.set_lengths(dst, [n])

    def advance(self, counts: torch.Tensor | list[int]) -> None:
        """Move each row's pointer past the counts[b] tokens just written for it."""
        new = self.lengths + torch.as_tensor(counts, dtype=torch.long)
        if (new > self.max_len).any():
            raise ValueError(f"cannot advance lengths {self.lengths.tolist()} past {self.max_len}")
        self.lengths = new

    def prefault(self) -> None:
        """Make the kernel back every page of the buffers now, keeping their contents.

        A row's first token writes one position of every head of every layer, and a
        head's positions are contiguous, so that one token faults in the row's whole
        region (gpt2-medium at 1024 positions: 192 MiB; its first round took 300-700 ms
        against 110 warm on the 2-core machine). A server pays that once at start
        rather than in the first round of each slot; a one-off generate() does not."""
        for t in (self.k, self.v):
            if t.device.type == "cpu" and t.is_contiguous():
                t.view(-1).view(torch.uint8)[::4096].add_(0)  # one write per 4 KiB page: a write fault, same bits

    def truncate(self, lengths: torch.Tensor | list[int] | int) -> None:
        """Rewind rows to the given lengths. O(1): only the pointers move."""
        new = torch.as_tensor(lengths, dtype=torch.long).expand(self.batch).clone()
        if (new < 0).any() or (new > self.lengths).any():
            raise ValueError(f"cannot truncate lengths {self.lengths.tolist()} to {new.tolist()}")
        self.lengths = new
