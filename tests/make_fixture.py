"""Regenerate tests/fixtures/tiny: a tiny GPT-2 and its reference outputs, made by `transformers`.

    python tests/make_fixture.py

The committed copy lets parity tests run where `transformers` is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent / "fixtures" / "tiny"
CONFIG = dict(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=4)
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7]
NEW_TOKENS = 16


def main() -> None:
    import transformers

    torch.manual_seed(1234)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG)).eval()
    HERE.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(HERE)
    (HERE / "generation_config.json").unlink(missing_ok=True)
    idx = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(idx).logits[0]
        greedy = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, len(PROMPT) :]
    ref = {
        "transformers_version": transformers.__version__,
        "prompt": PROMPT,
        "logits": [[round(x, 7) for x in row] for row in logits.tolist()],
        "greedy": greedy.tolist(),
    }
    (HERE / "reference.json").write_text(json.dumps(ref) + "\n")
    print(f"wrote {HERE}")


if __name__ == "__main__":
    main()
