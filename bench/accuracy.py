"""What each precision costs and buys: bytes per token, step times, and the error against
float32 on the same weights (top-1 agreement and mean KL over teacher-forced positions,
the largest logit difference, and the perplexity of a text).

    python -m bench.accuracy                      # gpt2-medium shape, random weights
    python -m bench.accuracy --weights real       # weights/gpt2-medium

Random weights (GPT-2's init) have none of GPT-2's outlier activation channels, so
each path is also measured on a copy with outliers planted (bench.workload.plant_outliers:
the same float function, a harder distribution for an activation quantizer). On random
weights the logits are nearly flat, so top-1 agreement is a harsh measure and the
perplexities are those of a random model: compare the columns, not the numbers with
GPT-2's published ones. "int8 unsmoothed" is int8 without the SmoothQuant fold, to show
what the fold buys.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

import sybil
from bench.throughput import step_costs
from bench.workload import plant_outliers, random_model, real_model
from sybil.cli.common import OneLineParser, run_cli
from sybil.engine.scoring import perplexity, sliding_nll
from sybil.errors import SybilError
from sybil.model.gpt import weight_bytes
from sybil.ops import native
from sybil.weights.loader import quantize_weights
from sybil.weights.tokenizer import encode

PATHS = ("float32", "int8wo", "int8", "int8 unsmoothed", "int4")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--target", default="gpt2-medium", help="preset or checkpoint (default gpt2-medium)")
    p.add_argument("--weights", choices=["random", "real"], default="random")
    p.add_argument("--positions", type=int, default=256, help="teacher-forced positions (default 256: 2 rows of 128)")
    p.add_argument("--outliers", default="4x40", metavar="NxF",
                   help="random weights: plant N channels scaled F times (default 4x40; 'none' to skip)")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    return p


def step_ms(model: sybil.GPT, widths=(1, 5, 9)) -> dict[int, float]:
    """Median ms of a forward of each width with 256 tokens cached (bench.throughput's)."""
    ms = step_costs({str(w): (model, w, None) for w in widths})
    return {w: ms[str(w)] for w in widths}


def quantized(model: sybil.GPT, path: str) -> sybil.GPT:
    import copy

    q = copy.deepcopy(model)
    if path == "float32":
        return q
    if path == "int8 unsmoothed":
        return quantize_weights(q, "int8", smooth=False)
    return quantize_weights(q, path)


def measure(base: sybil.GPT, idx: torch.Tensor, text: list[int]) -> list[dict]:
    want = base(idx).float()
    logp_ref = F.log_softmax(want, -1)
    rows = []
    for path in PATHS:
        model = quantized(base, path)
        got = model(idx).float()
        logp = F.log_softmax(got, -1)
        kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean().item()  # KL(float32 || path)
        context = min(512, model.config.n_positions)
        nll, n = sliding_nll(model, text, context=context, stride=context // 2)
        ms = step_ms(model)
        rows.append({
            "path": path, "MB_per_token": weight_bytes(model) / 1e6,
            "step_ms": ms[1], "5_tok_ms": ms[5], "9_tok_ms": ms[9],
            "top1": (got.argmax(-1) == want.argmax(-1)).float().mean().item(), "kl": kl,
            "max_logit_diff": (got - want).abs().max().item(), "ppl": perplexity(nll, n),
        })
        print(f"  {path}: top-1 {rows[-1]['top1']:.3f}, step {ms[1]:.1f} ms", flush=True)
        del model
    return rows


def render(name: str, rows: list[dict]) -> str:
    head = "| path | MB/token | step ms | 5 tok | 9 tok | top-1 vs float32 | mean KL | max logit diff | perplexity |"
    lines = [f"### {name}", head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['path']} | {r['MB_per_token']:.0f} | {r['step_ms']:.1f} | {r['5_tok_ms'] / r['step_ms']:.2f}x "
                     f"| {r['9_tok_ms'] / r['step_ms']:.2f}x | {r['top1']:.3f} | {r['kl']:.5f} "
                     f"| {r['max_logit_diff']:.3f} | {r['ppl']:.2f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    torch.set_grad_enabled(False)
    if not native.available():
        raise SybilError(f"the CPU kernels are unavailable ({native.why_unavailable()}): nothing to measure")
    if args.positions < 2:
        raise SybilError("--positions must be at least 2")
    cpu = torch.device("cpu")
    base = random_model(args.target, 0, torch.float32, cpu) if args.weights == "random" else \
        real_model(args.target, torch.float32, cpu)
    texts = json.loads(resources.files("bench").joinpath("prompts.json").read_text())
    text = encode("\n\n".join(texts * 4))  # the perplexity text: the benchmark prompts, not the calibration text
    rows_n = max(1, args.positions // 128)
    g = torch.Generator().manual_seed(6)
    if args.weights == "random":
        idx = torch.randint(0, base.config.vocab_size, (rows_n, args.positions // rows_n), generator=g)
    else:
        idx = torch.tensor(text[: args.positions]).view(rows_n, -1)
    cases = [("as loaded", base)]
    if args.weights == "random" and args.outliers != "none":
        try:
            n, f = args.outliers.split("x")
            loud = plant_outliers(random_model(args.target, 0, torch.float32, cpu), int(n), float(f), seed=0)
        except ValueError:
            raise SybilError(f"--outliers takes NxF (e.g. 4x40) or none, got {args.outliers!r}") from None
        cases.append((f"planted outliers ({n} channels x {f})", loud))
    print(f"{args.target}, {args.weights} weights, {idx.numel()} teacher-forced positions, "
          f"perplexity over {len(text)} tokens, {native.threads()} threads")
    out = {}
    for name, model in cases:
        print(f"{name}:", flush=True)
        out[name] = measure(model, idx, text)
    print("\n" + "\n\n".join(render(name, rows) for name, rows in out.items()))
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
