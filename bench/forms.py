"""python -m bench.forms: the CPU kernels' forms side by side.

For int8 and int4 weights, every integer dot-product form this CPU has
(sybil.ops.native.int_dot_choices: AVX2, AVX-VNNI, AVX512-VNNI); for float32
(`none`), the float linear on 16 registers and, where AVX512VL is, on 32. Each runs
the same forwards (1, 5 and 9 tokens with 256 tokens cached), the forms taking turns
round after round in one process, so the machine's drift falls on all of them
alike. The forms give the same bits (tests/ops/test_dispatch.py); only their speed
differs, and this is where the choices in sybil.ops.native come from.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.throughput import step_costs
from bench.workload import random_model
from sybil.errors import SybilError
from sybil.ops import native
from sybil.weights.loader import quantize_weights

WIDTHS = (1, 5, 9)


def forms(mode: str) -> list[str]:
    """The forms to compare for weights `mode`."""
    if mode != "none":
        return native.int_dot_choices()
    return ["narrow", "wide"] if native.can_float_wide() else ["narrow"]


def default_form(mode: str) -> str:
    if mode != "none":
        return native.int_dot()
    return "wide" if native.float_wide() else "narrow"


def use(mode: str, form: str) -> None:
    if mode == "none":
        native.set_float_wide(form == "wide")
    else:
        native.set_int_dot(form)


def measure(target: str, modes: list[str], rounds: int, repeats: int) -> dict[tuple[str, str], dict[int, float]]:
    """(mode, form) -> {tokens: ms}, the best of `rounds` rounds of median-of-`repeats` costs."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for mode in modes:
        model = random_model(target, 0, torch.float32, torch.device("cpu"))
        if mode != "none":
            quantize_weights(model, mode)
        for _ in range(rounds):
            for form in forms(mode):
                use(mode, form)
                ms = step_costs({n: (model, n, None) for n in WIDTHS}, repeats=repeats)
                best = out.setdefault((mode, form), ms)
                out[(mode, form)] = {n: min(best[n], ms[n]) for n in WIDTHS}
    return out


def render(results: dict[tuple[str, str], dict[int, float]], defaults: dict[str, str]) -> str:
    lines = ["| weights | form | step ms | 5 tok ms (/ step) | 9 tok ms (/ step) |", "|---|---|---|---|---|"]
    for (mode, form), ms in results.items():
        mark = " (default)" if form == defaults[mode] else ""
        lines.append(f"| {mode} | {form}{mark} | {ms[1]:.2f} | {ms[5]:.2f} ({ms[5] / ms[1]:.2f}x) "
                     f"| {ms[9]:.2f} ({ms[9] / ms[1]:.2f}x) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.forms", description=__doc__.splitlines()[0])
    p.add_argument("--target", default="gpt2-medium", help="preset or checkpoint folder (random weights)")
    p.add_argument("--quantize", default="none,int8,int4",
                   help="weights to run, comma-separated: none (float32), int8, int4")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every form in turn; the best is kept")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per width per round (median)")
    args = p.parse_args(argv)
    try:
        modes = [m.strip() for m in args.quantize.split(",") if m.strip()]
        if not modes or any(m not in ("none", "int8", "int4") for m in modes):
            raise SybilError(f"--quantize takes none, int8 and int4, comma-separated; got {args.quantize!r}")
        if args.rounds < 1 or args.repeats < 1:
            raise SybilError("--rounds and --repeats must be at least 1")
        if not native.available():
            raise SybilError(f"the CPU kernels are unavailable ({native.why_unavailable()}): nothing to compare")
        defaults = {m: default_form(m) for m in modes}
        torch.set_grad_enabled(False)
        try:
            results = measure(args.target, modes, args.rounds, args.repeats)
        finally:
            for m, form in defaults.items():
                use(m, form)
    except SybilError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.target} (random weights), float32 compute, {native.threads()} threads, 256 tokens cached; "
          f"integer dots this CPU can run: {', '.join(native.int_dot_choices())}")
    print(render(results, defaults))
    return 0


if __name__ == "__main__":
    sys.exit(main())
