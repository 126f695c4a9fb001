"""What the benchmark runs on: prompts, models (real or random in the real shapes),
the `transformers` mirror of the same weights, and the simulated-acceptance drafter."""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

import torch

import sybil
from sybil.errors import SybilError
from sybil.model.config import PRESETS, GPTConfig
from sybil.model.gpt import GPT
from sybil.ops import memory
from sybil.sample.params import SamplingParams
from sybil.spec.model_drafter import ModelDrafter
from sybil.weights.loader import key_action, resolve_checkpoint
from sybil.weights.tokenizer import encode


def load_prompts(n: int) -> list[list[int]]:
    texts = json.loads(resources.files("bench").joinpath("prompts.json").read_text())
    if not 1 <= n <= len(texts):
        raise SybilError(f"--prompts must be between 1 and {len(texts)}")
    return [encode(t) for t in texts[:n]]


def random_model(name_or_path: str, seed: int, dtype: torch.dtype, device: torch.device) -> GPT:
    """A GPT-2 in a preset's (or a checkpoint config's) shape with GPT-2's init, seeded."""
    if name_or_path in PRESETS:
        config = GPTConfig.from_name(name_or_path)
    elif (Path(name_or_path) / "config.json").is_file():
        config = GPTConfig.from_json(Path(name_or_path) / "config.json")
    else:
        raise SybilError(f"--weights random needs a preset name or a folder with config.json, got {name_or_path!r}")
    g = torch.Generator().manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "ln" in name:
                p.copy_(torch.ones_like(p) if "ln" in name and name.endswith("weight") else torch.zeros_like(p))
            else:
                p.normal_(0.0, 0.02, generator=g)
    model = model.to(device=device, dtype=dtype).eval()
    memory.rehome_module(model)  # as sybil.load_model does: the weights in 2 MiB pages
    return model


def real_model(name_or_path: str, dtype: torch.dtype, device: torch.device) -> GPT:
    try:
        path = resolve_checkpoint(name_or_path, download=False)
    except SybilError as e:
        raise SybilError(f"{e}; or benchmark random weights with --weights random") from None
    return sybil.load_model(path, dtype, device)


def hf_mirror(model: GPT):
    """The same weights in transformers' GPT2LMHeadModel, or None when not installed."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    c = model.config
    cfg = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head
    )
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(cfg)
    state = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        state["transformer." + key] = t.t().contiguous() if key_action(key) == "transpose" else t
    hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    return hf.to(device=model.device, dtype=model.dtype).eval()


class SimulatedDrafter(ModelDrafter):
    """Runs the draft model for real (its cost is real) but proposes the target's own
    next token with probability `acceptance`, another token otherwise.

    Each row's prompt + target greedy continuation (`oracles`) is known from the
    plain run, and greedy speculative output equals it bit for bit, so the right
    token at a row's position p is oracles[row][p].

    Acceptances are dealt from shuffled decks of DECK draws holding exactly
    round(DECK * acceptance) hits: over the few hundred draws of a benchmark,
    i.i.d. draws stray by +-0.05 from the asked rate (one sigma at 70 draws),
    while a deck keeps the rate within a partial deck's worth, and biases the
    expected run length at K=4 by under 1% (simulated: 3.336 against 3.362).
    """

    DECK = 50

    def __init__(
        self, model: GPT, max_len: int, oracles: list[list[int]], acceptance: float, seed: int, vocab: int | None = None
    ) -> None:
        super().__init__(model, SamplingParams(), max_len, batch=len(oracles), vocab=vocab)
        self.oracles = oracles
        self.acceptance = acceptance
        self.rng = random.Random(seed)
        self.deck: list[bool] = []

    def _hit(self) -> bool:
        if not self.deck:
            hits = round(self.acceptance * self.DECK)
            self.deck = [True] * hits + [False] * (self.DECK - hits)
            self.rng.shuffle(self.deck)
        return self.deck.pop()

    def confidence(self, logits: torch.Tensor, token: int) -> float:
        """The simulated draft is right with probability `acceptance`, and knows it; the
        random model's own probability of a token it did not choose would mean nothing."""
        return self.acceptance

    def pick_greedy(self, logits: torch.Tensor, row: int, position: int) -> int:
        if position >= len(self.oracles[row]):
            return int(logits.argmax())
        right = self.oracles[row][position]
        if self._hit():
            return right
        return (right + 1 + self.rng.randrange(self.model.config.vocab_size - 1)) % self.model.config.vocab_size


def noisy_copy(model: GPT, sigma: float, seed: int) -> GPT:
    """The same model with Gaussian noise on every weight: a draft that mostly agrees
    (the tests' drafts, and bench.rules')."""
    import copy

    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * sigma)
    return noisy


def plant_outliers(model: GPT, channels: int, factor: float, seed: int) -> GPT:
    """GPT-2's real activations have a few channels far larger than the rest (Sun et al.
    2024, "massive activations"; LLM.int8()); random weights have none. Plant them: scale
    `channels` channels (the same in every block) of each ln_1 / ln_2 by `factor` and
    divide the matching input columns of c_attn / c_fc by it. The float function is
    unchanged; only the distribution a quantizer sees changes. In place; returns model."""
    g = torch.Generator().manual_seed(seed)
    ch = torch.randperm(model.config.n_embd, generator=g)[:channels]
    with torch.no_grad():
        for block in model.h:
            for ln, lin in ((block.ln_1, block.attn.c_attn), (block.ln_2, block.mlp.c_fc)):
                ln.weight[ch] *= factor
                ln.bias[ch] *= factor
                lin.weight[:, ch] /= factor
    return model


def save_checkpoint(model: GPT, folder: Path) -> Path:
    """A float GPT as a Hugging Face checkpoint (needs transformers): what sybil.load_model,
    transformers and the peers' converters all read."""
    hf = hf_mirror(model)
    if hf is None:
        raise SybilError("saving a checkpoint needs transformers (pip install -e '.[bench]')")
    hf.save_pretrained(folder)
    return folder
