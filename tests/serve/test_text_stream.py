import random

import pytest

from sybil.serve.text_stream import TextStream
from sybil.weights.tokenizer import EOT_ID, decode, encode


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _stream(tokens: list[int], stops: list[str]) -> tuple[list[str], bool]:
    ts = TextStream(stops)
    pieces = [ts.push(t) for t in tokens] + [ts.flush()]
    return pieces, ts.stopped


TEXT = "The café served crème brûlée 🍮 at noon; the end. Then: more text, and the END 🍮🍮."


@pytest.mark.parametrize("stops", [[], ["the end"], [" at", "noon"], ["🍮"], ["END 🍮🍮."], ["é"], ["zz", "e e"]])
def test_pieces_join_to_the_whole_text_cut_before_the_first_stop(stops):
    tokens = encode(TEXT)
    pieces, stopped = _stream(tokens, stops)
    want, hit = _cut(decode(tokens), stops)
    assert "".join(pieces) == want
    assert stopped == hit


def test_text_that_may_start_a_stop_is_held_back_then_released():
    ts = TextStream(["the end"])
    released = "".join(ts.push(t) for t in encode("so the en"))
    assert released == "so "  # "the en" could still become "the end"
    assert "".join(ts.push(t) for t in encode("ormous")) + ts.flush() == "the enormous"


def test_a_split_multibyte_character_is_never_sent_half():
    ids = encode("🍮")
    assert len(ids) > 1  # the emoji spans several byte-level tokens
    ts = TextStream()
    pieces = [ts.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == "🍮"


def test_end_of_text_is_not_text_and_random_streams_match_decode():
    rng = random.Random(0)
    for _ in range(50):
        tokens = [rng.randrange(50257) for _ in range(rng.randrange(1, 30))]
        stop = decode(tokens[rng.randrange(len(tokens)):][:2]) if rng.random() < 0.5 else ""
        pieces, _ = _stream(tokens + [EOT_ID], [stop])
        want, _ = _cut(decode(tokens), [stop])
        assert "".join(pieces) == want
