"""python -m bench.busy: decode speed on a quiet machine and on one that is not idle.

Each engine decodes the same greedy tokens from the same random-weight checkpoint
(real shapes), first with the machine quiet, then with one and with two busy
processes (`python -c "while True: pass"`) competing for the cores, and the table
gives tokens/s and the busy/quiet ratio. Every measurement runs in a fresh
process (so thread pools start clean), engines take turns within each load, and
decode speed is (n - 1) / (time for n tokens - time for 1), medians of --repeats.

Rows: `sybil` (its kernels on Sybil's own thread pool), `sybil-openmp` (the same
kernels with their regions on at::parallel_for, as before the pool: the A/B),
`sybil-thread` (the same call as `sybil`, made from a threading.Thread), and
`ct2` (CTranslate2, when installed, 2 threads, converted from the same weights).
llama.cpp is not run here: it needs a built llama-bench and GGUF files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sybil.cli.common import OneLineParser, run_cli
from sybil.errors import SybilError

SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
}
PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 383, 3139, 286, 262]
BUSY = "while True: pass"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m bench.busy", description="Decode speed, quiet and with busy processes.")
    p.add_argument("--target", choices=sorted(SHAPES), default="gpt2-medium", help="model shape (gpt2-medium)")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per generation (64)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per measurement, median (3)")
    p.add_argument("--loads", default="0,1,2", help="busy processes per level, comma-separated (0,1,2)")
    p.add_argument("--engines", default="sybil,sybil-openmp,ct2",
                   help="rows: sybil, sybil-openmp, sybil-thread, ct2 (sybil,sybil-openmp,ct2)")
    p.add_argument("--precisions", default="float32,int8", help="float32 and/or int8 (both)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    p.add_argument("--worker", nargs=3, metavar=("ENGINE", "PRECISION", "DIR"), help=argparse.SUPPRESS)
    return p


def _decode_rate(generate, n: int, repeats: int) -> float:
    """(n - 1) tokens over (time for n - time for 1): decoding after the first token."""
    generate(n)  # warm-up
    one, full = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        generate(1)
        one.append(time.perf_counter() - t)
        t = time.perf_counter()
        generate(n)
        full.append(time.perf_counter() - t)
    return (n - 1) / max(statistics.median(full) - statistics.median(one), 1e-9)


def pool_note() -> str:
    """What Sybil's pool did (csrc/pool.h): regions run on the caller alone (the serial
    fallback) and the share of parallel time the caller waited for a helper's chunk."""
    import torch

    from sybil.ops import native

    if not native.available() or not hasattr(torch.ops.sybil, "pool_stats"):
        return ""
    regions, serial, fallbacks, run_s, wait_s = torch.ops.sybil.pool_stats().tolist()
    if regions + serial == 0:
        return ""
    return f"{serial / (regions + serial):.0%} serial, waits {wait_s / max(run_s, 1e-9):.0%}"


def worker(engine: str, precision: str, folder: Path, n: int, repeats: int) -> float:
    if engine.startswith("sybil"):
        import torch

        import sybil
        from sybil.ops import native

        torch.set_grad_enabled(False)
        native.available()
        model = sybil.load_model(folder / "hf", torch.float32, quantize="int8" if precision == "int8" else None)
        if engine == "sybil-thread":  # the same call from a threading.Thread (the walkthrough's main-thread anomaly)
            import threading

            out = []
            t = threading.Thread(target=lambda: out.append(
                _decode_rate(lambda m: sybil.generate(model, PROMPT, m, stop_at_eos=False), n, repeats)))
            t.start()
            t.join()
            return out[0]
        return _decode_rate(lambda m: sybil.generate(model, PROMPT, m, stop_at_eos=False), n, repeats)
    import ctranslate2

    from bench.peers import CT2_COMPUTE

    compute = CT2_COMPUTE[("float32", "int8" if precision == "int8" else None)]
    gen = ctranslate2.Generator(str(folder / f"ct2-{compute}"), device="cpu", compute_type=compute,
                                intra_threads=os.cpu_count() or 1)
    vocab = json.loads((folder / "hf" / "vocab.json").read_text())
    tokens = {i: t for t, i in vocab.items()}
    prompt = [tokens[i] for i in PROMPT]

    def generate(m: int) -> None:
        gen.generate_batch([prompt], max_length=m, min_length=m, sampling_topk=1, include_prompt_in_result=False,
                           end_token=[])

    return _decode_rate(generate, n, repeats)


def prepare(folder: Path, shape: str, engines: list[str], precisions: list[str]) -> list[str]:
    """Write the random checkpoint (and CTranslate2 conversions); the engines that can run."""
    import torch
    import transformers

    from bench.peers import CT2_COMPUTE, write_hf_tokenizer

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPES[shape])).eval()
    hf.save_pretrained(folder / "hf")
    write_hf_tokenizer(folder / "hf")
    if "ct2" in engines:
        try:
            from ctranslate2.converters import TransformersConverter
        except ImportError:
            print("bench.busy: ct2 skipped: CTranslate2 is not installed (pip install -e '.[peers]')",
                  file=sys.stderr)
            return [e for e in engines if e != "ct2"]
        print("bench.busy: converting the weights for CTranslate2", file=sys.stderr, flush=True)
        for p in precisions:
            compute = CT2_COMPUTE[("float32", "int8" if p == "int8" else None)]
            TransformersConverter(str(folder / "hf")).convert(str(folder / f"ct2-{compute}"), quantization=compute)
    return engines


def measure(engine: str, precision: str, folder: Path, args) -> float:
    env = dict(os.environ)
    env.pop("SYBIL_POOL", None)
    if engine == "sybil-openmp":
        env["SYBIL_POOL"] = "openmp"
    cmd = [sys.executable, "-m", "bench.busy", "--worker", engine, precision, str(folder),
           "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SybilError(f"{engine} {precision} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    tps, _, note = r.stdout.strip().splitlines()[-1].partition(" ")
    return float(tps), note


def run(args: argparse.Namespace) -> int:
    if args.worker:
        engine, precision, folder = args.worker
        tps = worker(engine, precision, Path(folder), args.tokens, args.repeats)
        print(tps, pool_note() if engine.startswith("sybil") else "")
        return 0
    try:
        loads = [int(x) for x in args.loads.split(",")]
    except ValueError:
        raise SybilError(f"--loads takes comma-separated integers, got {args.loads!r}") from None
    engines = [e for e in args.engines.split(",") if e]
    precisions = [p for p in args.precisions.split(",") if p]
    if set(engines) - {"sybil", "sybil-openmp", "sybil-thread", "ct2"} or set(precisions) - {"float32", "int8"}:
        raise SybilError("--engines takes sybil, sybil-openmp, sybil-thread, ct2; --precisions float32, int8")
    if args.tokens < 2 or args.repeats < 1 or any(x < 0 for x in loads):
        raise SybilError("--tokens must be at least 2, --repeats at least 1, --loads non-negative")
    results: dict[tuple[str, str], dict[int, float]] = {}
    notes: dict[tuple[str, str], dict[int, str]] = {}
    with tempfile.TemporaryDirectory(prefix="sybil-busy-") as tmp:
        folder = Path(tmp)
        engines = prepare(folder, args.target, engines, precisions)
        for load in loads:
            busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
            try:
                time.sleep(0.5)
                for precision in precisions:
                    for engine in engines:
                        tps, note = measure(engine, precision, folder, args)
                        results.setdefault((engine, precision), {})[load] = tps
                        notes.setdefault((engine, precision), {})[load] = note
                        print(f"bench.busy: {engine} {precision}, {load} busy: {tps:.1f} tokens/s"
                              + (f" ({note})" if note else ""), file=sys.stderr, flush=True)
            finally:
                for p in busy:
                    p.kill()
                    p.wait()
    print(render(results, loads, args))
    pool = [f"{e} {p}, {x} busy: {v[x]}" for (e, p), v in notes.items() for x in loads if v.get(x)]
    if pool:
        print("\nSybil's pool (regions on the caller alone; caller's waits for helpers):\n" + "\n".join(pool))
    if args.json:
        args.json.write_text(json.dumps({f"{e} {p}": {"tokens_per_s": v, "pool": notes.get((e, p), {})}
                                         for (e, p), v in results.items()}, indent=1))
    return 0


def render(results: dict, loads: list[int], args) -> str:
    head = ["engine", "precision"] + [f"{x} busy" if x else "quiet" for x in loads]
    head += [f"ratio {x} busy" for x in loads if x]
    lines = [f"{args.target} shape, random weights, {args.tokens} greedy tokens, decode tokens/s "
             f"(median of {args.repeats}), cores: {os.cpu_count()}",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (engine, precision), v in results.items():
        cells = [engine, precision] + [f"{v[x]:.1f}" for x in loads]
        cells += [f"{v[x] / v[0]:.2f}" if 0 in v else "" for x in loads if x]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
