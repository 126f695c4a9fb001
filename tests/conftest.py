"""Shared fixtures: checkpoints written by `transformers` with seeded random weights.

Acceptance rates between random models mean nothing; these checkpoints exist to
check that sybil computes exactly what the reference computes on the same weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bench.workload import noisy_copy  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "small": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256),
}


def write_hf_checkpoint(path: Path, seed: int, **config) -> Path:
    """Save GPT2LMHeadModel(GPT2Config(**config)) with weights from the given seed."""
    transformers = pytest.importorskip("transformers", reason="transformers (the reference) is not installed")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: hf_checkpoint(name, seed=0, **overrides) -> checkpoint dir (cached per session)."""
    made: dict[tuple, Path] = {}

    def make(name: str, seed: int = 0, **overrides) -> Path:
        key = (name, seed, tuple(sorted(overrides.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"{name}-{seed}")
            made[key] = write_hf_checkpoint(path, seed, **{**SHAPES.get(name, {}), **overrides})
        return made[key]

    return make


def hf_model(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel.from_pretrained(path).eval()


@pytest.fixture(scope="session")
def eos_checkpoint(tmp_path_factory, hf_checkpoint):
    """The 'small' model with <|endoftext|>'s embedding aimed at token X = 1000: it
    then predicts end-of-text mostly right after X, so an EOS can land mid-sequence."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = hf_checkpoint("small")
    t = load_file(src / "model.safetensors")
    t["transformer.wte.weight"][50256] = 8.0 * t["transformer.wte.weight"][1000]
    out = tmp_path_factory.mktemp("eos")
    save_file(t, out / "model.safetensors")
    shutil.copy(src / "config.json", out / "config.json")
    return out


def run_main(main, argv: list[str], capsys) -> tuple[int, list[str]]:
    """A command line's main(argv) in this process: (exit status, its stderr lines).
    The same parser and run() as `python -m ...`, without a fresh interpreter and torch
    import per case; each command keeps one bad-input test in a real process too."""
    capsys.readouterr()  # only this command's lines (not a fixture's written on first use)
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


class Server:
    """A real `python -m sybil.serve` on 127.0.0.1, a free port (--port 0, read
    back from its first line on stderr), for tests that drive it over HTTP."""

    def __init__(self, tmp: Path, *args: str, timeout_s: float = 300.0) -> None:
        import subprocess
        import sys
        import time

        self.log = tmp / "server.log"
        self._err = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sybil.serve", "--port", "0", *args],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=self._err,
        )
        deadline = time.monotonic() + timeout_s
        self.url = None
        while self.url is None:
            text = self.log.read_text()
            found = re.search(r"serving .* on (http://[^/\s]+)/v1", text)
            self.url = found.group(1) if found else None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {text}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {text}")
            time.sleep(0.1)
        import httpx

        while True:  # listening is not ready: wait for /health
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the server never became healthy: {self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def noisy_checkpoint(tmp_path_factory, hf_checkpoint):
    """The 'small' checkpoint with a little noise on every weight: a draft that mostly agrees."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = hf_checkpoint("small")
    t = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    t = {k: (v + 0.02 * torch.randn(v.shape, generator=g)).contiguous() if v.is_floating_point() else v
         for k, v in t.items()}
    out = tmp_path_factory.mktemp("noisy")
    save_file(t, out / "model.safetensors")
    shutil.copy(src / "config.json", out / "config.json")
    return out


def reference_greedy(hf, prompt: list[int], n: int, logit_bias: dict[int, float] | None = None,
                     presence: float = 0.0, frequency: float = 0.0) -> list[int]:
    """Greedy decoding with OpenAI's logit adjustments, written out: the reference model
    scores the whole sequence each step, logit_bias is added, and each token's penalty
    is presence * (count > 0) + frequency * count over the tokens generated so far."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = hf(torch.tensor([seq])).logits[0, -1].double()
            for t, v in (logit_bias or {}).items():
                logits[t] += v
            for t in set(out):
                logits[t] -= presence + frequency * out.count(t)
            tok = int(logits.argmax())
            out.append(tok)
            seq.append(tok)
    return out


def hf_sliding(hf, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's strided loop, written out with the reference
    model: (summed negative log-likelihood, tokens scored); each window scores the
    tokens no earlier window scored."""
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + context, len(ids))
            lp = torch.log_softmax(hf(torch.tensor([ids[begin:end]])).logits[0].double(), -1)
            for j in range(max(prev_end, begin + 1), end):
                nll -= float(lp[j - begin - 1, ids[j]])
                count += 1
            prev_end = end
            if end == len(ids):
                break
    return nll, count
