"""python -m bench.rules: what the position-keyed (Gumbel) acceptance rule costs next to
the rejection rule, measured on the noisy-copy drafts the tests use.

For each draft (the target with Gaussian noise of sigma on every weight), temperature
and top-k/top-p, at contexts the target itself sampled: the rejection rule's
acceptance of one draft token is sum_x min(p(x), q(x)) = 1 - TV(p, q) (exact), the
keyed rule's is P[argmax(log p + g) == argmax(log q + g)] over Gumbel noise g
(Monte Carlo, --draws per context). Daliri, Musco and Suresh prove the second at
least (1 - TV) / (1 + TV). Random weights: the distributions are what a sharpened
random model gives, not what GPT-2 gives on text.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.workload import noisy_copy
from sybil.cli.common import OneLineParser, run_cli
from sybil.model.config import GPTConfig
from sybil.model.gpt import GPT
from sybil.sample.params import SamplingParams, probs_from_logits

SHAPE = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=2048, n_positions=128)  # the engine tests' shape


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m bench.rules", description=__doc__.splitlines()[0])
    p.add_argument("--sigmas", default="0.005,0.02,0.05", help="draft noise levels (0.005,0.02,0.05)")
    p.add_argument("--temperatures", default="0.7,1.0", help="(0.7,1.0)")
    p.add_argument("--contexts", type=int, default=64, help="contexts per cell (64)")
    p.add_argument("--draws", type=int, default=400, help="Gumbel draws per context (400)")
    return p


def random_target(seed: int = 0, init: float = 0.1) -> GPT:
    """The engine tests' sharpened random model (initializer range 0.1)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**SHAPE)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, init)
    return model


def acceptance(target: GPT, draft: GPT, params: SamplingParams, contexts: int, draws: int) -> tuple[float, float]:
    """(rejection rule, keyed rule) mean acceptance of one draft token."""
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, SHAPE["vocab_size"], (contexts, 24), generator=g)
    with torch.no_grad():
        p = probs_from_logits(target(seqs)[:, -1], params).double()  # [C, V]
        q = probs_from_logits(draft(seqs)[:, -1], params).double()
    rejection = float(torch.minimum(p, q).sum(-1).mean())
    noise = -torch.log(-torch.log(torch.rand(draws, contexts, p.shape[-1], generator=g, dtype=torch.float64)
                                  .clamp_(min=1e-300)))
    same = (p.log() + noise).argmax(-1) == (q.log() + noise).argmax(-1)  # [draws, C]
    return rejection, float(same.double().mean())


def run(args: argparse.Namespace) -> int:
    torch.set_grad_enabled(False)
    target = random_target()
    rows = ["| draft sigma | temperature | top-k / top-p | rejection rule | keyed rule | keyed / rejection | "
            "(1 - TV) / (1 + TV) |", "|---|---|---|---|---|---|---|"]
    for sigma in map(float, args.sigmas.split(",")):
        draft = noisy_copy(target, sigma, seed=2)
        for t in map(float, args.temperatures.split(",")):
            for top_k, top_p in ((None, None), (50, 0.95)):
                rej, keyed = acceptance(target, draft, SamplingParams(t, top_k, top_p), args.contexts, args.draws)
                bound = rej / (2 - rej)
                rows.append(f"| {sigma} | {t} | {top_k or '-'} / {top_p or '-'} | {rej:.3f} | {keyed:.3f} | "
                            f"{keyed / rej:.3f} | {bound:.3f} |")
                print(rows[-1], file=sys.stderr, flush=True)
    print("random weights (sharpened), per-token acceptance of one draft token\n" + "\n".join(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
