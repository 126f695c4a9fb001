"""bench.peers: the tokenizer files made from Sybil's ranks, and CTranslate2 on the same weights."""

import pytest
import torch

import sybil
from bench.peers import ct2_peer, write_hf_tokenizer
from bench.workload import hf_mirror
from sybil.weights.tokenizer import encode

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


def test_llamacpp_row_says_why_when_it_is_not_built(tmp_path, monkeypatch):
    from bench import llamacpp

    monkeypatch.setenv("SYBIL_LLAMACPP", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    peer, why = llamacpp.llamacpp_peer(object(), "int8", 2)
    assert peer is None and "build_llamacpp.sh" in why


def test_llamacpp_gets_the_same_weights(hf_checkpoint):
    from bench import llamacpp

    if llamacpp.why_unavailable():
        pytest.skip(f"llama.cpp: {llamacpp.why_unavailable()}")
    import gguf

    model = sybil.load_model(hf_checkpoint("small"))
    peer, why = llamacpp.llamacpp_peer(hf_mirror(model), None, 2)
    assert peer is not None, why
    try:
        reader = gguf.GGUFReader(str(peer.files["F32"]))
        tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
        assert torch.equal(tensors["token_embd.weight"].view(model.wte.weight.shape), model.wte.weight)
        # GGUF stores the projections as [out, in] rows, as Sybil's nn.Linear does
        fc = model.h[1].mlp.c_fc.weight
        assert torch.equal(tensors["blk.1.ffn_up.weight"].view(fc.shape), fc)
        assert peer.decode_tokens_per_s(4, 4, 1)["F32"] > 0
    finally:
        peer.close()
