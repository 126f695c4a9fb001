"""python -m bench.int_dots: the integer linears' dot-product forms side by side.

Every form this CPU has (sybil.native.int_dot_choices: AVX2, VNNI on ymm, AVX512 on
zmm) runs the same forwards of an int8 and an int4 target (1, 5 and 9 tokens with
256 tokens cached), the forms taking turns round after round in one process, so the
machine's drift falls on all of them alike. The forms give the same bits
(tests/test_matmul.py); only their speed differs, and this is where the choice in
sybil.native.int_dot comes from.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.throughput import step_costs
from bench.workload import random_model
from sybil import native
from sybil.errors import SybilError

WIDTHS = (1, 5, 9)


def measure(target: str, modes: list[str], rounds: int, repeats: int) -> dict[tuple[str, str], dict[int, float]]:
    """(mode, form) -> {tokens: ms}, the best of `rounds` rounds of median-of-`repeats` costs."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for mode in modes:
        model = random_model(target, 0, torch.float32, torch.device("cpu")).quantize(mode)
        for _ in range(rounds):
            for form in native.int_dot_choices():
                native.set_int_dot(form)
                ms = step_costs({n: (model, n, None) for n in WIDTHS}, repeats=repeats)
                best = out.setdefault((mode, form), ms)
                out[(mode, form)] = {n: min(best[n], ms[n]) for n in WIDTHS}
    return out


def render(results: dict[tuple[str, str], dict[int, float]], default: str) -> str:
    lines = ["| weights | dots | step ms | 5 tok ms (/ step) | 9 tok ms (/ step) |", "|---|---|---|---|---|"]
    for (mode, form), ms in results.items():
        mark = " (default)" if form == default else ""
        lines.append(f"| {mode} | {form}{mark} | {ms[1]:.2f} | {ms[5]:.2f} ({ms[5] / ms[1]:.2f}x) "
                     f"| {ms[9]:.2f} ({ms[9] / ms[1]:.2f}x) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.int_dots", description=__doc__.splitlines()[0])
    p.add_argument("--target", default="gpt2-medium", help="preset or checkpoint folder (random weights)")
    p.add_argument("--quantize", default="int8,int4", help="integer formats to run, comma-separated")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every form in turn; the best is kept")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per width per round (median)")
    args = p.parse_args(argv)
    try:
        modes = [m.strip() for m in args.quantize.split(",") if m.strip()]
        if not modes or any(m not in ("int8", "int4") for m in modes):
            raise SybilError(f"--quantize takes int8 and/or int4, got {args.quantize!r}")
        if args.rounds < 1 or args.repeats < 1:
            raise SybilError("--rounds and --repeats must be at least 1")
        if not native.available():
            raise SybilError(f"the CPU kernels are unavailable ({native.why_unavailable()}): nothing to compare")
        default = native.int_dot()
        torch.set_grad_enabled(False)
        results = measure(args.target, modes, args.rounds, args.repeats)
        native.set_int_dot(default)
    except SybilError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.target} (random weights), float32 compute, {native.threads()} threads, 256 tokens cached; "
          f"the CPU can run {', '.join(native.int_dot_choices())}")
    print(render(results, default))
    return 0


if __name__ == "__main__":
    sys.exit(main())
