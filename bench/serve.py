"""python -m bench.serve: load on the OpenAI-compatible server, at several concurrencies.

Starts a server (or targets --url), runs N concurrent clients per level and reports
total tokens/s, time to first token and inter-token latency (p50, p99) per level, with
and without the draft, as a table and JSON. `--workload uniform` (the default): every
request a streaming greedy one of the same length. `--workload mixed` (bench.mixed):
prompts of 2-400 tokens, outputs of 8-128, shared prefixes and repeats, streams and
non-streams, disconnects and bad requests; each level then also counts what the server
got wrong and checks a sample of answers against the same requests sent alone.
`--duration S` soaks one level of the mixed workload for S seconds and reports the
server's resident memory after the first minute and at the end. `--compare-chunking`
adds a row with chunked prefill off (each prompt prefilled whole as it joins), and
`--peer llamacpp` a row for llama.cpp's llama-server on the same weights (GGUF).
Every server is started first and they take turns at each level (`--repeat N`: N
turns each, pooled into one row), so rows compare runs seconds apart.

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

from bench import mixed
from bench.workload import SimulatedDrafter, load_prompts, random_model, real_model
from sybil import generate
from sybil.cli.common import (
    DRAFT_QUANTIZE_HELP,
    OneLineParser,
    parse_chunk,
    parse_k,
    run_cli,
)
from sybil.engine.factory import EngineConfig, load
from sybil.engine.round_log import RoundLog
from sybil.errors import SybilError
from sybil.model.gpt import GPT
from sybil.serve.http import bind, serve
from sybil.serve.scheduler import Scheduler
from sybil.weights.loader import DRAFT_QUANTIZE, quantize_weights


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
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            ids = choice.get("token_ids")
            # a peer without token ids (llama-server) streams one token per chunk
            n = len(ids) if ids is not None else int(bool(choice) and choice.get("finish_reason") is None)
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


def measure_level(url: str, prompts: list[list[int]], concurrency: int, requests_per_client: int,
                  max_tokens: int) -> dict:
    """One run of a level: every request's tokens, first-token time and gaps, the wall
    time and the draft counters' growth (summarise turns runs into a row)."""
    results: list[dict] = []
    errors: list[str] = []
    retried = [0]  # requests sent again after the server closed their connection unanswered
    with httpx.Client(timeout=600) as c:
        drafted0, accepted0 = metric(c, url, "sybil_draft_tokens_total"), metric(c, url, "sybil_accepted_tokens_total")

    def client(i: int) -> None:
        with httpx.Client(timeout=600) as c:
            for j in range(requests_per_client):
                prompt = prompts[(i + j * concurrency) % len(prompts)]
                try:
                    try:
                        results.append(one_request(c, url, prompt, max_tokens))
                    except httpx.RemoteProtocolError:  # llama-server drops an idle kept-alive connection
                        retried[0] += 1
                        results.append(one_request(c, url, prompt, max_tokens))
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
    return {"concurrency": concurrency, "results": results, "wall_s": wall, "drafted": drafted,
            "accepted": accepted, "retried": retried[0]}


def summarise(runs: list[dict]) -> dict:
    """A level's row from one or more runs of it (--repeat): their requests pooled, tokens
    over the sum of their wall times, percentiles over every first token and gap."""
    results = [r for run in runs for r in run["results"]]
    drafted, accepted = sum(run["drafted"] for run in runs), sum(run["accepted"] for run in runs)
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    gaps = [g for r in results for g in r["gaps_s"]]
    tokens, wall = sum(r["tokens"] for r in results), sum(run["wall_s"] for run in runs)
    ms = lambda v: None if v is None else 1000 * v  # noqa: E731
    return {
        "concurrency": runs[0]["concurrency"],
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "runs": len(runs),
        "ttft_ms_p50": ms(percentile(ttft, 50)),
        "ttft_ms_p99": ms(percentile(ttft, 99)),
        "itl_ms_p50": ms(percentile(gaps, 50)),
        "itl_ms_p99": ms(percentile(gaps, 99)),
        "acceptance": accepted / drafted if drafted else None,
        "retried": sum(run["retried"] for run in runs),
    }


def run_level(url: str, prompts: list[list[int]], concurrency: int, requests_per_client: int,
              max_tokens: int) -> dict:
    return summarise([measure_level(url, prompts, concurrency, requests_per_client, max_tokens)])


def _drain(stream) -> None:
    for _ in stream:
        pass


def start_worker(args, with_draft: bool, chunk: str = "auto", cache: bool = True, round_log: Path | None = None
                 ) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "bench.serve", "--worker", "--target", args.target, "--weights", args.weights,
           "--dtype", args.dtype, "--max-batch", str(args.max_batch), "--max-tokens", str(args.max_tokens),
           "--prompts", str(args.prompts), "--k", str(args.k), "--draft-quantize", args.draft_quantize,
           "--prefill-chunk", str(chunk), "--quantize", args.quantize] + ([] if cache else ["--no-prompt-cache"])
    cmd += ["--round-log", str(round_log)] if round_log else []
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
    """The server the benchmark starts: sybil's own factory, scheduler and HTTP layer, with
    random weights built here and the simulated drafter around the draft model."""
    config = EngineConfig(model=args.target, dtype=args.dtype, device="cpu", quantize=args.quantize,
                          draft=None if args.draft == "none" else args.draft, draft_quantize=args.draft_quantize,
                          k=parse_k(args.k), max_batch=args.max_batch, max_queue=4 * args.max_batch,
                          prefill_chunk=parse_chunk(args.prefill_chunk) or None,
                          prompt_cache=not args.no_prompt_cache)

    def build(name, dtype, device, quantize):  # sybil.engine.factory.Build, over the benchmark's weights
        if args.weights == "random":
            model = random_model(name, 0 if name == args.target else 1, dtype, device)
        else:
            model = real_model(name, dtype, device)
        return quantize_weights(model, quantize) if quantize else model

    loaded = load(config, build)
    label = f", draft {args.draft} k={args.k}" if config.draft in ("ngram", "suffix") else ""
    if isinstance(loaded.draft, GPT):
        label = f", draft {args.draft} ({loaded.draft.quantized}) k={args.k}"
        if args.weights == "random":
            # The target's greedy continuation of every benchmark prompt, so the simulated
            # draft can propose the right token with probability A, whatever slot it is in.
            table = [p + generate(loaded.model, p, args.max_tokens, stop_at_eos=False).tokens
                     for p in load_prompts(args.prompts)]
            loaded.draft = SlotSimulatedDrafter(loaded.draft, loaded.model.config.n_positions, args.max_batch, table,
                                                args.simulate_acceptance)
            label += f", SIMULATED acceptance {args.simulate_acceptance}"
    scheduler = Scheduler.from_config(loaded, RoundLog(args.round_log) if args.round_log else None)
    label += f", prefill chunk {args.prefill_chunk}" + (", no prompt cache" if args.no_prompt_cache else "")
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
    load = "mixed workload (bench.mixed)" if config.get("workload") == "mixed" or config.get("duration") else (
        f"{config['max_tokens']} tokens per request, streaming")
    checked = any("problems" in r for r in rows)
    lines = [
        f"server: {config['target']} ({config['weights']} weights), {config['dtype']}"
        f"{'' if config.get('quantize', 'none') == 'none' else ' compute, ' + config['quantize'] + ' weights'}, max batch "
        f"{config['max_batch']}, {load}, greedy",
        "| draft | concurrency | requests | tokens/s | vs concurrency 1 | TTFT p50 ms | TTFT p99 ms "
        "| ITL p50 ms | ITL p99 ms | acceptance |" + (" wrong | solo checks (mismatches) | RSS growth |" if checked else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if checked else ""),
    ]
    f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        line = (
            f"| {r['draft']} | {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
            f"{f(r.get('vs_concurrency_1'), '.2f')} | {f(r['ttft_ms_p50'], '.0f')} | {f(r['ttft_ms_p99'], '.0f')} | "
            f"{f(r['itl_ms_p50'], '.1f')} | {f(r['itl_ms_p99'], '.1f')} | {f(r['acceptance'], '.2f')} |"
        )
        if checked:
            growth = r.get("rss_growth")
            line += (f" {r.get('problems', 'n/a')} | {r.get('solo_checked', 'n/a')} ({r.get('solo_mismatches', 'n/a')}) "
                     f"| {'n/a' if growth is None else format(growth, '+.1%')} |")
        lines.append(line)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--target", default="gpt2-medium")
    p.add_argument("--draft", default="gpt2", help="the draft for the rows with a draft; 'none' skips them")
    p.add_argument("--weights", choices=["real", "random"], default="random")
    p.add_argument("--simulate-acceptance", type=float, default=0.8, metavar="A",
                   help="random weights: the simulated draft's acceptance (default 0.8)")
    p.add_argument("--k", default="auto", help="the draft window: auto (default, per row) or a number")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--draft-quantize", choices=DRAFT_QUANTIZE, default="auto", help=DRAFT_QUANTIZE_HELP)
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated levels")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="how many of the benchmark prompts to cycle through")
    p.add_argument("--workload", choices=["uniform", "mixed", "cache"], default="uniform",
                   help="uniform (default): identical streaming requests; mixed: see bench.mixed; cache: the "
                        "prompt cache and the draft on repeated requests (bench.mixed.cache_workload)")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="soak: the mixed workload at the last concurrency level for S seconds")
    p.add_argument("--seed", type=int, default=0, help="the mixed workload's seed (default 0)")
    p.add_argument("--check", type=int, default=20, metavar="N",
                   help="mixed workload: send up to N completed answers again alone and compare (default 20)")
    p.add_argument("--prefill-chunk", default="auto", help="the server's --prefill-chunk (default auto)")
    p.add_argument("--compare-chunking", action="store_true",
                   help="add a row with chunked prefill off, in the same run")
    p.add_argument("--peer", choices=["llamacpp"], default=None,
                   help="add a row for llama.cpp's llama-server on the same weights (bench/build_llamacpp.sh)")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                   help="the target's weights, Sybil's and the peer's alike: none (float32; F32), int8 (Q8_0), "
                        "int4 (Q4_0)")
    p.add_argument("--threads", type=int, default=2, help="the peer's threads (default 2)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="uniform workload: run each level N times, the setups taking turns, and pool the "
                        "runs into its row (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--round-log", type=Path, default=None, metavar="DIR",
                   help="each Sybil server's rounds (sybil.engine.round_log) into DIR/<setup>.jsonl (none, sequential, "
                        "draft; the worker is given its file)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-prompt-cache", action="store_true", help=argparse.SUPPRESS)  # the worker's
    return p


def run_mixed(url: str, concurrency: int, seed: int, count: int | None = None, duration: float | None = None,
              pid: int | None = None, check: int = 20) -> dict:
    """`count` requests of the mixed workload (or as many as `duration` seconds take) from
    `concurrency` clients; what went wrong; a sample checked against solo answers."""
    with httpx.Client(timeout=60) as c:
        context = c.get(url + "/v1/models").json()["data"][0].get("max_model_len", 1024)
    gen, lock, results, issued = mixed.requests(seed, context), threading.Lock(), [], [0]
    deadline = None if duration is None else time.perf_counter() + duration
    rss: dict[str, int] = {}

    def take():
        with lock:
            if (deadline is None and issued[0] >= count) or (deadline is not None and time.perf_counter() > deadline):
                return None
            issued[0] += 1
            return next(gen)

    def client() -> None:
        with httpx.Client(timeout=600) as c:
            while (req := take()) is not None:
                try:
                    r = mixed.send(c, url, req)
                except httpx.HTTPError as e:  # a dropped connection is the server's fault here
                    r = {"kind": req.kind, "status": 599, "ids": [], "ttft_s": None, "gaps_s": [], "req": req,
                         "error": str(e)}
                with lock:
                    results.append(r)

    def watch() -> None:
        time.sleep(60)
        rss["after_1_min"] = mixed.rss_bytes(pid)

    with httpx.Client(timeout=600) as c:
        drafted0, accepted0 = metric(c, url, "sybil_draft_tokens_total"), metric(c, url, "sybil_accepted_tokens_total")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    if pid and duration and duration > 60:
        threads.append(threading.Thread(target=watch, daemon=True))
    for t in threads:
        t.start()
    for t in threads[:concurrency]:
        t.join()
    wall = time.perf_counter() - t0
    if pid:
        rss["end"] = mixed.rss_bytes(pid)
    with httpx.Client(timeout=60) as c:  # the server must be idle again once every client is gone
        for _ in range(50):
            running, queued = metric(c, url, "sybil_running_requests"), metric(c, url, "sybil_queued_requests")
            if running == queued == 0:
                break
            time.sleep(0.2)
        drafted = metric(c, url, "sybil_draft_tokens_total") - drafted0
        accepted = metric(c, url, "sybil_accepted_tokens_total") - accepted0
    streamed = [r for r in results if r["req"].kind == "ok" and r["req"].stream and r["status"] == 200]
    ttft = [r["ttft_s"] for r in streamed if r["ttft_s"] is not None]
    gaps = [g for r in streamed for g in r["gaps_s"]]
    wrong = mixed.problems(results)
    checked, mismatches = mixed.check_solo(url, results, check)
    ms = lambda v: None if v is None else 1000 * v  # noqa: E731
    row = {
        "concurrency": concurrency, "requests": len(results), "wall_s": wall,
        "tokens": sum(len(r["ids"]) for r in results if r["status"] == 200),
        "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
        "itl_ms_p50": ms(percentile(gaps, 50)), "itl_ms_p99": ms(percentile(gaps, 99)),
        "acceptance": accepted / drafted if drafted else None, "problems": len(wrong), "problem_examples": wrong[:3],
        "solo_checked": checked, "solo_mismatches": len(mismatches), "mismatch_examples": mismatches[:3],
        "running_after": running, "queued_after": queued,
    }
    row["tokens_per_s"] = row["tokens"] / wall
    if rss:
        row["rss_mb"] = {k: v / 2**20 for k, v in rss.items()}
        if "after_1_min" in rss:
            row["rss_growth"] = rss["end"] / rss["after_1_min"] - 1
    return row


def start_llama_server(args) -> tuple[subprocess.Popen, str, object]:
    """llama.cpp's server on GGUF conversions of the same random weights (seed 0), at the
    matching precision, with --max-batch slots."""
    import socket

    import torch

    from bench import llamacpp
    from bench.workload import hf_mirror

    if args.weights != "random":
        raise SybilError("--peer llamacpp converts the benchmark's random weights; use --weights random")
    server = llamacpp.binary("llama-server")
    if server is None or llamacpp.why_unavailable():
        raise SybilError(f"llama-server is not available: {llamacpp.why_unavailable() or 'not built'} "
                         "(bench/build_llamacpp.sh)")
    target = random_model(args.target, 0, torch.float32, torch.device("cpu"))
    peer = llamacpp.LlamaCppPeer(hf_mirror(target), None if args.quantize == "none" else args.quantize, args.threads)
    gguf = peer.files[peer.types[0]]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = args.max_batch * target.config.n_positions
    proc = subprocess.Popen([str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np",
                             str(args.max_batch), "-c", str(ctx), "-t", str(args.threads), "-cb"],
                            stdout=subprocess.DEVNULL, stderr=open(peer.dir / "llama-server.log", "w"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, peer
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.terminate()
    log = (peer.dir / "llama-server.log").read_text().strip().splitlines()[-1:]
    peer.close()
    raise SybilError(f"llama-server did not start: {log}")


def run_cache(args: argparse.Namespace) -> int:
    """--workload cache: the same requests against a server with the prompt cache, one
    without, and (with --draft) one with the draft and the cache."""
    setups = [("prompt cache", False, True), ("no prompt cache", False, False)]
    if args.draft != "none":
        setups.append((f"prompt cache, draft {args.draft}", True, True))
    rows = []
    for label, with_draft, cache in setups:
        proc, url = start_worker(args, with_draft=with_draft, cache=cache)
        try:
            with httpx.Client(timeout=60) as c:
                context = c.get(url + "/v1/models").json()["data"][0].get("max_model_len", 1024)
                one_request(c, url, load_prompts(1)[0], 4)  # warm-up
            print(f"[bench] {label}", file=sys.stderr, flush=True)
            r = mixed.cache_workload(url, args.seed, context)
            with httpx.Client(timeout=60) as c:
                drafted, accepted = metric(c, url, "sybil_draft_tokens_total"), metric(c, url, "sybil_accepted_tokens_total")
            r.update(setup=label, acceptance=accepted / drafted if drafted else None)
            rows.append(r)
        finally:
            proc.terminate()
            proc.wait(60)
    same = all(r["lmeval_logprobs"] == rows[0]["lmeval_logprobs"] and r["repeat_ids"][0] == rows[0]["repeat_ids"][0]
               for r in rows)
    f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
    lines = [f"server: {args.target} ({args.weights} weights), {args.dtype}; the same requests on each setup "
             f"(answers {'identical' if same else 'DIFFERENT'} across setups)",
             "| setup | 400-token prompt TTFT ms: first, repeat (ratio) | 20 lm-eval requests s | "
             "greedy request decode tok/s: first, repeat (ratio) | acceptance |", "|---|---|---|---|---|"]
    for r in rows:
        (t1, t2), (d1, d2) = r["repeat_ttft_ms"], r["repeat_decode_tokens_per_s"]
        lines.append(f"| {r['setup']} | {t1:.0f}, {t2:.0f} ({t2 / t1:.2f}x) | {r['lmeval_20_s']:.2f} | "
                     f"{f(d1, '.1f')}, {f(d2, '.1f')} ({f(d2 / d1 if d1 and d2 else None, '.2f')}x) | "
                     f"{f(r['acceptance'], '.2f')} |")
    if len(rows) > 1:
        lines.append(f"lm-eval requests with the cache: {rows[0]['lmeval_20_s'] / rows[1]['lmeval_20_s']:.2f}x "
                     "the time without")
    print("\n".join(lines))
    record = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "json")}, "rows": rows,
              "identical_answers": same}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2, default=str))
    return 0 if same else 1


def _label(name: str, args: argparse.Namespace, simulated: bool) -> str:
    if name == "draft":
        return f"{args.draft} k={args.k}" + (f" SIMULATED acceptance {args.simulate_acceptance}" if simulated else "")
    return {"none": "none", "sequential": "none, prefill whole (no chunks)", "external": "external",
            "llama-server": "llama-server (llama.cpp)"}[name]


def run(args: argparse.Namespace) -> int:
    if args.worker:
        return worker(args)
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise SybilError(f"--concurrency takes comma-separated integers, got {args.concurrency!r}") from None
    if not levels or min(levels) < 1 or args.requests_per_client < 1 or args.max_tokens < 1 or args.repeat < 1:
        raise SybilError("--concurrency levels, --requests-per-client, --max-tokens and --repeat must be at least 1")
    if args.weights == "random" and not 0 <= args.simulate_acceptance <= 1:
        raise SybilError("--simulate-acceptance must be between 0 and 1")
    if args.duration is not None and args.duration <= 0:
        raise SybilError("--duration must be a positive number of seconds")
    if args.round_log:
        try:
            args.round_log.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SybilError(f"cannot make --round-log {args.round_log}: {e.strerror}") from None
    if args.workload == "cache":
        return run_cache(args)
    mixed_load = args.workload == "mixed" or args.duration is not None
    simulated = args.weights == "random" and args.draft not in ("ngram", "suffix")
    prompts = load_prompts(args.prompts)
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "json")}
    rows = []
    if args.url:
        setups = [("external", None)]
    else:
        setups = [("none", "auto")] + ([("sequential", "0")] if args.compare_chunking else []) + (
            [] if args.draft == "none" else [("draft", "auto")]) + ([("llama-server", None)] if args.peer else [])
    servers: list[tuple[str, str, str, subprocess.Popen | None, object]] = []  # name, label, url, proc, peer
    try:
        # Every server is started (and warmed) first and the setups take turns at each level,
        # so a ratio between two rows compares runs seconds apart, not minutes: these
        # machines drift by 10-20% over minutes, as much as a draft's gain or loss.
        for name, chunk in setups:
            proc, peer, url = None, None, args.url
            if name == "llama-server":
                proc, url, peer = start_llama_server(args)
            elif url is None:
                proc, url = start_worker(args, with_draft=name == "draft", chunk=chunk,
                                         round_log=args.round_log / f"{name}.jsonl" if args.round_log else None)
            servers.append((name, _label(name, args, simulated), url, proc, peer))
            with httpx.Client() as c:
                one_request(c, url, prompts[0], 4)  # warm-up
        runs: dict[tuple[int, int], list[dict]] = {}  # (server, level) -> its runs
        for c in levels if args.duration is None else levels[-1:]:
            for _ in range(1 if mixed_load else args.repeat):
                for i, (name, label, url, proc, _peer) in enumerate(servers):
                    print(f"[bench] {label}: concurrency {c}", file=sys.stderr, flush=True)
                    if name == "llama-server" and mixed_load:
                        r = run_level(url, prompts, c, args.requests_per_client, args.max_tokens)
                        r["draft"] = label + " (uniform workload: it is not checked)"
                    elif mixed_load:
                        r = run_mixed(url, c, args.seed, count=args.requests_per_client * c, duration=args.duration,
                                      pid=proc.pid if proc and name != "llama-server" else None, check=args.check)
                    else:
                        r = measure_level(url, prompts, c, args.requests_per_client, args.max_tokens)
                    runs.setdefault((i, c), []).append(r)
        for i, (_name, label, *_rest) in enumerate(servers):
            base = None
            for c in levels if args.duration is None else levels[-1:]:
                got = runs[(i, c)]
                r = got[0] if "tokens_per_s" in got[0] else summarise(got)
                r.setdefault("draft", label)
                base = base or (r["tokens_per_s"] if c == levels[0] else None)
                r["vs_concurrency_1"] = r["tokens_per_s"] / base if base and levels[0] == 1 else None
                rows.append(r)
    finally:
        for _name, _label_, _url, proc, peer in servers:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
            if peer is not None:
                if "SYBIL_KEEP_PEER_LOG" in __import__("os").environ:
                    print((peer.dir / "llama-server.log").read_text()[-3000:], file=sys.stderr)
                peer.close()
    print(render(rows, config))
    record = {"config": config, "rows": rows,
              "note": "acceptance in rows marked SIMULATED is simulated (random weights)" if simulated else ""}
    print(json.dumps(record, default=str))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
