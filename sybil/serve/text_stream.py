"""From committed tokens to the text a client is sent, piece by piece.

The concatenated pieces equal decoding all the tokens at once (special tokens
omitted) and cutting the text before the first stop string: a multi-byte
character is never split, and text that could be the start of a stop string is
held back until the next tokens show that it is not.
"""

from __future__ import annotations

from sybil.weights.tokenizer import EOT_ID, StreamDecoder


class TextStream:
    def __init__(self, stops: list[str] | None = None) -> None:
        self.stops = [s for s in stops or [] if s]
        self.decoder = StreamDecoder()
        self.pending = ""  # decoded but not yet released: it may begin a stop string
        self.stopped = False  # a stop string was found; nothing more is released

    def push(self, token: int) -> str:
        """The text that token releases ("" when it is held back or after a stop)."""
        if self.stopped or token == EOT_ID:  # <|endoftext|> is a special token, not text
            return ""
        self.pending += self.decoder.push(token)
        return self._release(final=False)

    def flush(self) -> str:
        """The rest of the text once the row has ended."""
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        keep = 0 if final else self._stop_prefix_len()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def _stop_prefix_len(self) -> int:
        """Length of the longest end of pending that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best
