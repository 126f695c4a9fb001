"""bench.peers: the tokenizer files made from Sybil's ranks, and CTranslate2 on the same weights."""

import pytest
import torch

import sybil
from bench.peers import ct2_peer, write_hf_tokenizer
from bench.workload import hf_mirror
from sybil.tokenizer import encode

TEXT = "Hello world! The quick brown fox, 1234 ünïcode  spaces\n\tand tabs.<|endoftext|> after"


def test_vocab_and_merges_tokenize_like_sybil(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_hf_tokenizer(tmp_path)
    tok = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert len(tok) == 50257
    assert tok.encode(TEXT) == encode(TEXT)
    assert len((tmp_path / "merges.txt").read_text().splitlines()) == 1 + 50000  # header + every merge


def test_ct2_greedy_equals_sybil_greedy_on_the_same_weights(hf_checkpoint):
    pytest.importorskip("ctranslate2", reason="CTranslate2 is an optional peer: pip install -e '.[peers]'")
    model = sybil.load_model(hf_checkpoint("small"))
    peer, why = ct2_peer(hf_mirror(model), torch.float32, None)
    assert peer is not None, why
    prompt = encode("The meaning of life is")
    want = sybil.generate(model, prompt, 12, stop_at_eos=False).tokens
    assert peer.generate(prompt, 12) == want
