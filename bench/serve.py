"""python -m bench.serve: load on the OpenAI-compatible server, at several concurrencies.

Starts a server (or targets --url), runs N concurrent streaming clients per level
(greedy, <|endoftext|> ignored, every request the same length), and reports total
tokens/s, time to first token and inter-token latency (p50, p99) per level, with
and without the draft, as a table and JSON.

With --weights random (real shapes, random values, the default here: no real
weights can be downloaded on the machines this runs on) acceptance between two
random models means nothing, so the draft rows use the simulated-acceptance
drafter of bench.throughput: the draft model runs for real, and its proposal is
the target's own next token with probability --simulate-acceptance. Those rows
say SIMULATED wherever they print.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from bench.workload import SimulatedDrafter, load_prompts, random_model, real_model
from sybil.cli import OneLineParser, run_cli
from sybil.errors import SybilError
from sybil.loader import DRAFT_QUANTIZE, DRAFT_QUANTIZE_HELP


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def one_request(client, url: str, prompt: list[int], max_tokens: int) -> dict:
    """A streaming greedy request: its tokens, time to first token, and per-token gaps."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}
    t0 = time.perf_counter()
    first, last, tokens, gaps = None, None, 0, []
    with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise SybilError(f"the server answered {r.status_code}: {r.read().decode()[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SybilError(f"the server ended a stream: {chunk['error']['message']}")
            n = len(chunk["choices"][0].get("token_ids") or [])
            if not n:
                continue
            now = time.perf_counter()
            if first is None:
                first = now - t0
            else:
                gaps += [(now - last) / n] * n  # a round that commits n tokens: n tokens at gap / n
            last, tokens = now, tokens + n
    return {"tokens": tokens, "ttft_s": first, "gaps_s": gaps}


def metric(client, url: str, name: str) -> float:
    for line in client.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def run_level(url: str, prompts: list[list[int]], concurrency: int, requests_per_client: int,
              max_tokens: int) -> dict:
    results: list[dict] = []
    errors: list[str] = []
    with httpx.Client(timeout=600) as c:
        drafted0, accepted0 = metric(c, url, "sybil_draft_tokens_total"), metric(c, url, "sybil_accepted_tokens_total")

    def client(i: int) -> None:
        with httpx.Client(timeout=600) as c:
            for j in range(requests_per_client):
                try:
                    results.append(one_request(c, url, prompts[(i + j * concurrency) % len(prompts)], max_tokens))
                except Exception as e:  # noqa: BLE001 - reported, not hidden
                    errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SybilError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    with httpx.Client(timeout=600) as c:
        drafted = metric(c, url, "sybil_draft_tokens_total") - drafted0
        accepted = metric(c, url, "sybil_accepted_tokens_total") - accepted0
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    gaps = [g for r in results for g in r["gaps_s"]]
    tokens = sum(r["tokens"] for r in results)
    ms = lambda v: None if v is None else 1000 * v  # noqa: E731
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_ms_p50": ms(percentile(ttft, 50)),
        "ttft_ms_p99": ms(percentile(ttft, 99)),
        "itl_ms_p50": ms(percentile(gaps, 50)),
        "itl_ms_p99": ms(percentile(gaps, 99)),
        "acceptance": accepted / drafted if drafted else None,
    }


def _drain(stream) -> None:
    for _ in stream:
        pass


def start_worker(args, with_draft: bool) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "bench.serve", "--worker", "--target", args.target, "--weights", args.weights,
           "--dtype", args.dtype, "--max-batch", str(args.max_batch), "--max-tokens", str(args.max_tokens),
           "--prompts", str(args.prompts), "--k", str(args.k), "--draft-quantize", args.draft_quantize]
    cmd += ["--draft", args.draft if with_draft else "none", "--simulate-acceptance", str(args.simulate_acceptance)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        found = re.search(r"serving .* on (http://[^/\s]+)/v1", line)
        if found:
            threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()  # its log, unread
            return proc, found.group(1)
    raise SybilError("the benchmark server did not start: " + "".join(lines[-5:]).strip())


def worker(args) -> int:
    """The server the benchmark starts: sybil's own scheduler and HTTP layer, with models
    built here so that random weights and the simulated drafter can be used."""
    import torch

    from sybil import generate
    from sybil.loader import load_model, resolve_device, resolve_draft_quantize, resolve_dtype
    from sybil.scheduler import Scheduler
    from sybil.serve import bind, serve

    torch.set_grad_enabled(False)
    device = resolve_device("cpu")
    dtype, _ = resolve_dtype(args.dtype, device)
    build = (lambda name, seed: random_model(name, seed, dtype, device)) if args.weights == "random" else (
        lambda name, seed: real_model(name, dtype, device))
    target = build(args.target, 0)
    draft, label = None, ""
    if args.draft != "none":
        quantize = resolve_draft_quantize(args.draft_quantize, device)
        model = build(args.draft, 1) if args.weights == "random" else load_model(args.draft, dtype, device)
        if quantize:
            model.quantize(quantize)
        draft, label = model, f", draft {args.draft} ({quantize}) k={args.k}"
        if args.weights == "random":
            # The target's greedy continuation of every benchmark prompt, so the simulated
            # draft can propose the right token with probability A, whatever slot it is in.
            table = [p + generate(target, p, args.max_tokens, stop_at_eos=False).tokens
                     for p in load_prompts(args.prompts)]
            draft = SlotSimulatedDrafter(model, target.config.n_positions, args.max_batch, table,
                                         args.simulate_acceptance)
            label += f", SIMULATED acceptance {args.simulate_acceptance}"
    scheduler = Scheduler(target, draft, args.k if args.k == "auto" else int(args.k), args.max_batch, 4 * args.max_batch)
    serve(scheduler, args.target, bind("127.0.0.1", 0), 1.0, f"{args.target} ({args.weights} weights{label})")
    return 0


class SlotSimulatedDrafter(SimulatedDrafter):
    """The simulated drafter in a server: a slot serves different requests over time,
    so the right token comes from the table entry (a benchmark prompt and the
    target's greedy continuation) that the slot's sequence starts with."""

    def __init__(self, model, max_len: int, slots: int, table: list[list[int]], acceptance: float) -> None:
        super().__init__(model, max_len, [[] for _ in range(slots)], acceptance, seed=0)
        self.table = table

    def propose(self, seqs, ks, seeds, params=None):
        self.oracles = [next((t for t in self.table if t[: len(s)] == s), []) for s in seqs]
        return super().propose(seqs, ks, seeds, params)


def render(rows: list[dict], config: dict) -> str:
    lines = [
        f"server: {config['target']} ({config['weights']} weights), {config['dtype']}, max batch "
        f"{config['max_batch']}, {config['max_tokens']} tokens per request, greedy, streaming",
        "| draft | concurrency | requests | tokens/s | vs concurrency 1 | TTFT p50 ms | TTFT p99 ms "
        "| ITL p50 ms | ITL p99 ms | acceptance |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['draft']} | {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
            f"{f(r.get('vs_concurrency_1'), '.2f')} | {f(r['ttft_ms_p50'], '.0f')} | {f(r['ttft_ms_p99'], '.0f')} | "
            f"{f(r['itl_ms_p50'], '.1f')} | {f(r['itl_ms_p99'], '.1f')} | {f(r['acceptance'], '.2f')} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--target", default="gpt2-medium")
    p.add_argument("--draft", default="gpt2", help="the draft for the rows with a draft; 'none' skips them")
    p.add_argument("--weights", choices=["real", "random"], default="random")
    p.add_argument("--simulate-acceptance", type=float, default=0.8, metavar="A",
                   help="random weights: the simulated draft's acceptance (default 0.8)")
    p.add_argument("--k", default="4")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--draft-quantize", choices=DRAFT_QUANTIZE, default="auto", help=DRAFT_QUANTIZE_HELP)
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated levels")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="how many of the benchmark prompts to cycle through")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace) -> int:
    if args.worker:
        return worker(args)
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise SybilError(f"--concurrency takes comma-separated integers, got {args.concurrency!r}") from None
    if not levels or min(levels) < 1 or args.requests_per_client < 1 or args.max_tokens < 1:
        raise SybilError("--concurrency levels, --requests-per-client and --max-tokens must be at least 1")
    if args.weights == "random" and not 0 <= args.simulate_acceptance <= 1:
        raise SybilError("--simulate-acceptance must be between 0 and 1")
    prompts = load_prompts(args.prompts)
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "json")}
    rows = []
    setups = [("external", args.url)] if args.url else [("none", None)] + (
        [] if args.draft == "none" else [("draft", None)])
    for name, url in setups:
        proc = None
        if url is None:
            proc, url = start_worker(args, with_draft=name == "draft")
        try:
            with httpx.Client() as c:
                one_request(c, url, prompts[0], 4)  # warm-up
            label = name
            if name == "draft":
                label = f"{args.draft} k={args.k}"
                if args.weights == "random":
                    label += f" SIMULATED acceptance {args.simulate_acceptance}"
            base = None
            for c in levels:
                print(f"[bench] {label}: concurrency {c}", file=sys.stderr, flush=True)
                r = run_level(url, prompts, c, args.requests_per_client, args.max_tokens)
                r["draft"] = label
                base = base or (r["tokens_per_s"] if c == levels[0] else None)
                r["vs_concurrency_1"] = r["tokens_per_s"] / base if base and levels[0] == 1 else None
                rows.append(r)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    print(render(rows, config))
    record = {"config": config, "rows": rows,
              "note": "acceptance in rows marked SIMULATED is simulated (random weights)" if args.weights == "random"
              else ""}
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
