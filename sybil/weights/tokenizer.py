"""GPT-2's byte-pair encoding, built by tiktoken from the ranks file shipped in sybil/assets.

The ranks are parsed here rather than with tiktoken.load, which may write to a
cache folder or fetch URLs: tokenising must never touch the network or the disk
beyond reading this one file, whose hash is checked.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
from functools import lru_cache
from importlib import resources

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from sybil.errors import SybilError

RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_ID = 50256
EOT = "<|endoftext|>"


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def mergeable_ranks() -> dict[bytes, int]:
    """GPT-2's BPE ranks (token bytes -> id) from the shipped file, hash checked."""
    data = resources.files("sybil").joinpath("assets/gpt2.tiktoken").read_bytes()
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise SybilError("sybil/assets/gpt2.tiktoken is corrupt (sha256 mismatch); reinstall sybil")
    return _parse_ranks(data)


@lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (r50k_base); built once per process."""
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=mergeable_ranks(), special_tokens={EOT: EOT_ID}
    )


def encode(text: str) -> list[int]:
    """Token ids of text; '<|endoftext|>' in the text is the special token 50256."""
    return get_encoding().encode(text, allowed_special={EOT})


def decode(ids: list[int]) -> str:
    return get_encoding().decode(ids)


class StreamDecoder:
    """Turns ids into text piece by piece without splitting a multi-byte character.

    A GPT-2 token can end in the middle of a UTF-8 sequence; the incremental
    decoder holds those bytes back until the character is complete.
    """

    def __init__(self) -> None:
        self._enc = get_encoding()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._enc.decode_single_token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
