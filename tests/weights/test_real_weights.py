"""Parity on the real GPT-2 weights, when weights/<name>/ holds them (python -m sybil.download)."""

import pytest
import torch
from conftest import REPO, hf_model

import sybil
from sybil.weights.tokenizer import encode


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium"])
def test_real_weights_match_transformers(name):
    path = REPO / "weights" / name
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"no real weights in {path}/ (run: python -m sybil.download {name})")
    ref = hf_model(path)
    model = sybil.load_model(path)
    prompt = encode("The meaning of life is")
    with torch.no_grad():
        want = ref(torch.tensor([prompt])).logits
        assert (model(torch.tensor([prompt])) - want).abs().max().item() <= 1e-3
        greedy = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=32, do_sample=False, pad_token_id=50256)
    assert sybil.generate(model, prompt, 32, stop_at_eos=False).tokens == greedy[0, len(prompt) :].tolist()
