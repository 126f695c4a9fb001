import hashlib

import pytest

from sybil.errors import SybilError
from sybil.weights import tokenizer
from sybil.weights.tokenizer import EOT_ID, StreamDecoder, decode, encode


def test_known_ids_of_a_fixed_sentence():
    # GPT-2's published encoding of this sentence (r50k_base).
    assert encode("The quick brown fox jumps over the lazy dog.") == [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    assert encode("Hello world") == [15496, 995]


def test_endoftext_is_50256():
    assert encode("<|endoftext|>") == [EOT_ID] == [50256]
    assert decode([50256]) == "<|endoftext|>"


@pytest.mark.parametrize(
    "text",
    ["", "plain ascii", "  leading and   odd\twhitespace\n\n\r\n", "naïve café — 東京 😀🎉", "a\u200bb", "x" * 300 + "\u00a0"],
)
def test_round_trip(text):
    assert decode(encode(text)) == text


def test_stream_decoder_never_splits_a_character():
    text = "emoji 😀 and 東京 and é"
    ids = encode(text)
    dec = StreamDecoder()
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # The emoji is split across tokens, so some push must have held bytes back.
    assert any(p == "" for p in pieces[:-1])


def test_ranks_hash_is_checked(monkeypatch):
    data = b"corrupt"
    assert hashlib.sha256(data).hexdigest() != tokenizer.RANKS_SHA256
    monkeypatch.setattr(tokenizer.resources, "files", lambda _: _FakeFiles(data))
    tokenizer.get_encoding.cache_clear()
    tokenizer.mergeable_ranks.cache_clear()
    try:
        with pytest.raises(SybilError, match="sha256"):
            tokenizer.get_encoding()
    finally:
        monkeypatch.undo()
        tokenizer.get_encoding.cache_clear()
        tokenizer.mergeable_ranks.cache_clear()


class _FakeFiles:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def joinpath(self, _):
        return self

    def read_bytes(self) -> bytes:
        return self.data
