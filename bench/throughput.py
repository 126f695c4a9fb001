"""python -m bench.throughput: Sybil against `transformers`, side by side, in one run.

Same prompts, same weights, same dtype, greedy, warm-ups excluded, medians over
repeats; Sybil's rows (plain and every K) take turns within each repeat, so that
the machine's drift falls on all of them alike. With --weights random (real
shapes, random values) acceptance means nothing, so --simulate-acceptance A keeps
the draft model's real cost but makes its proposal the target's own next token
with probability A; every output marks those rows as simulated.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import sybil
from bench.llamacpp import llamacpp_peer
from bench.peers import ct2_installed, ct2_peer
from bench.workload import (
    SimulatedDrafter,
    hf_mirror,
    load_prompts,
    random_model,
    real_model,
)
from sybil.cli.common import QUANTIZE_HELP, OneLineParser, run_cli
from sybil.errors import SybilError
from sybil.model.gpt import weight_bytes
from sybil.model.kv_cache import KVCache
from sybil.ops import memory, native
from sybil.spec.controller import expected_tokens
from sybil.weights.loader import (
    DRAFT_QUANTIZE,
    QUANTIZE,
    check_quantize,
    quantize_weights,
    resolve_device,
    resolve_draft_quantize,
    resolve_dtype,
)

STEP_TOKENS = (1, 2, 4, 5, 8)


@dataclass
class Row:
    name: str  # sybil-autoregressive | sybil-speculative | hf-generate | hf-assisted
    k: int | str | None
    tokens_per_s: float | None
    speedup: float | None = None
    acceptance_rate: float | None = None
    mean_accepted: float | None = None
    simulated: bool = False
    expected_speedup: float | None = None
    achieved_over_expected: float | None = None
    decode_tokens_per_s: float | None = None  # after each prompt's first token (its prefill and first round)
    decode_speedup: float | None = None
    ms_per_token: float | None = None
    x_floor: float | None = None
    peak_mb: float | None = None
    note: str = ""


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def read_bandwidth_gbps(mb: int = 1024, repeats: int = 7) -> float:
    """Memory read bandwidth with every core (torch's sum runs on all its threads) over a
    buffer far larger than any cache; the best pass, since noise only ever slows a pass.
    The buffer lives in 2 MiB pages where the weights do (sybil.ops.memory): they read faster."""
    x = memory.zeros((mb * 2**20 // 4,), torch.float32).fill_(1.0)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / min(times) / 1e9


@contextmanager
def torch_threads(n: int):
    """torch's own intra-op threads set to n inside (Sybil sets them to 1 once its kernels
    load; transformers and the bandwidth probe compute with torch's)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def step_costs(cases: dict[str, tuple[sybil.GPT, int, int | None]], context: int = 256, repeats: int = 7
               ) -> dict[str, float]:
    """Median ms of one forward per case (model, tokens fed, vocab: a reduced head, as a
    draft with --draft-vocab runs) with `context` tokens already cached. The cases take
    turns, round after round, so that the machine's drift (its read bandwidth moved
    between 16 and 26 GB/s within an hour) falls on every width alike instead of on
    whichever ran last; one measured alone can be off by a third."""
    caches: dict[int, tuple[KVCache, torch.Tensor, int]] = {}
    for model, _, _ in cases.values():
        if id(model) in caches:
            continue
        top = max(n for m, n, _ in cases.values() if m is model)
        ctx = min(context, model.config.n_positions - top)
        cache = KVCache.for_model(model.config, 1, ctx + top, dtype=model.dtype, device=model.device)
        gen = torch.Generator().manual_seed(0)
        idx = torch.randint(0, model.config.vocab_size, (1, ctx + top), generator=gen).to(model.device)
        model(idx[:, :ctx], cache)
        caches[id(model)] = cache, idx, ctx
    times: dict[str, list[float]] = {key: [] for key in cases}
    for r in range(repeats + 1):  # round 0 warms up
        for key, (model, n, vocab) in cases.items():
            cache, idx, ctx = caches[id(model)]
            cache.truncate(ctx)
            _sync(model.device)
            t = time.perf_counter()
            model(idx[:, ctx : ctx + n], cache, vocab=vocab)
            _sync(model.device)
            if r:
                times[key].append(time.perf_counter() - t)
    return {key: 1000 * statistics.median(ts) for key, ts in times.items()}


def leviathan_speedup(alpha: float, k: int, draft_ratio: float, verify_ratio: float) -> float:
    """Expected speed-up of k-token speculation over plain decoding (Leviathan et al. 2023),
    with the measured draft step and (k+1)-token verify costs, both in target-step units."""
    return expected_tokens(alpha, k) / (k * draft_ratio + verify_ratio)


def alpha_from_mean(mean_accepted: float, k: int) -> float:
    """The per-token acceptance a with expected_tokens(a, k) == mean_accepted (bisection):
    what measured rounds imply, for rows whose acceptance is real."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, k) < mean_accepted else (lo, mid)
    return lo


def timed(fn, repeats: int) -> tuple[float, list]:
    """Median seconds over repeats of fn() -> results, and the last results."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def sybil_runner(target, prompts, n, *, draft=None, k=4, oracles=None, accept=None, device=None, draft_vocab=None):
    """A function that decodes every prompt once (one repeat of a row), after a warm-up.
    k "auto" starts a fresh controller in every call, as a one-off `generate --k auto`
    does; "auto-shared" hands one controller to all of the row's calls (warm-up
    included), as the server keeps one across requests."""
    shared = sybil.BatchK() if k == "auto-shared" else None

    def once(prompts=prompts, n=n):
        outs = []
        for i, p in enumerate(prompts):
            d = draft
            if accept is not None:
                d = SimulatedDrafter(draft, len(p) + n, [p + oracles[i]], accept, seed=i, vocab=draft_vocab)
            # a simulated drafter carries its reduced head itself; generate() takes draft_vocab for models
            outs.append(sybil.generate(target, p, n, draft=d, k=shared or k, stop_at_eos=False,
                                       draft_vocab=draft_vocab if accept is None else None))
        _sync(device)
        return outs

    if draft is not None:
        once(prompts[:1], 4)  # warm-up (a plain row's warm-up is the run that makes the oracles)
    return once


def interleaved(runners: dict, repeats: int) -> dict:
    """Median seconds and every repeat's outputs for each runner, the runners taking
    turns in every repeat: the machines this runs on drift (memory bandwidth moved by
    a third within minutes), and taking turns lays that drift on every row alike
    instead of on whichever row ran in a slow minute."""
    times = {name: [] for name in runners}
    outs = {name: [] for name in runners}
    for _ in range(repeats):
        for name, once in runners.items():
            t = time.perf_counter()
            outs[name].append(once())
            times[name].append(time.perf_counter() - t)
    return {name: (statistics.median(times[name]), outs[name]) for name in runners}


def sybil_row(k, secs: float, repeats: list[list], simulated: bool) -> Row:
    outs = repeats[-1]
    tokens = sum(len(o.tokens) for o in outs)
    row = Row("sybil-speculative" if k is not None else "sybil-autoregressive", k, tokens / secs)
    # decode: each generation after its first token, as llama-bench's tg counts (no prompt)
    decode_s = lambda o: o.stats["total_s"] - o.stats["prefill_ms"] / 1000  # noqa: E731
    decode_tokens = sum(o.stats["decode_tokens_per_s"] * decode_s(o) for o in outs)
    row.decode_tokens_per_s = decode_tokens / statistics.median(sum(map(decode_s, rep)) for rep in repeats)
    if k is not None:
        drafted = sum(o.stats["drafted"] for o in outs)
        accepted = sum(o.stats["accepted"] for o in outs)
        rounds = sum(o.stats["rounds"] for o in outs)
        row.acceptance_rate = accepted / drafted if drafted else 0.0
        row.mean_accepted = tokens / rounds
        row.simulated = simulated
    return row


def run_hf(hf_target, prompts, n, repeats, device, hf_draft=None) -> Row:
    def once():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            kw = dict(assistant_model=hf_draft) if hf_draft is not None else {}
            hf_target.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=50256, **kw,
            )
        _sync(device)

    ids = torch.tensor([prompts[0]], device=device)
    hf_target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=50256)
    secs, _ = timed(once, repeats)
    name = "hf-assisted" if hf_draft is not None else "hf-generate"
    return Row(name, "hf" if hf_draft is not None else None, n * len(prompts) / secs)


def run_ct2(peer, prompts, n, repeats) -> Row:
    def once():
        return [peer.generate(p, n) for p in prompts]

    peer.generate(prompts[0], 4)  # warm-up
    secs, outs = timed(once, repeats)
    row = Row("ct2-generate", None, sum(len(o) for o in outs) / secs)
    row.note = peer.compute_type
    return row


def run_batches(target, draft, prompts, n, repeats, sizes, k, accept, device) -> list[dict]:
    """Total and per-sequence tokens/s of batched target-only and speculative decoding."""
    out = []
    for size in sizes:
        batch = [prompts[i % len(prompts)] for i in range(size)]
        sybil.generate(target, batch, 4, stop_at_eos=False)  # warm-up
        secs, plain = timed(lambda: sybil.generate(target, batch, n, stop_at_eos=False), repeats)
        out.append({"name": "sybil-batch", "batch": size, "k": None, "total_tokens_per_s": size * n / secs,
                    "per_seq_tokens_per_s": n / secs, "simulated": False})
        oracles = [p + o.tokens for p, o in zip(batch, plain)]

        def spec():
            d = draft if accept is None else SimulatedDrafter(draft, max(map(len, oracles)), oracles, accept, seed=size)
            return sybil.generate(target, batch, n, draft=d, k=k, stop_at_eos=False)

        secs, outs = timed(spec, repeats)
        drafted = sum(o.stats["drafted"] for o in outs)
        out.append({"name": "sybil-batch-speculative", "batch": size, "k": k, "total_tokens_per_s": size * n / secs,
                    "per_seq_tokens_per_s": n / secs, "simulated": accept is not None,
                    "acceptance_rate": sum(o.stats["accepted"] for o in outs) / drafted if drafted else 0.0})
        progress(f"batch {size}: {out[-2]['total_tokens_per_s']:.1f} / {out[-1]['total_tokens_per_s']:.1f} tokens/s")
    return out


def render_batches(rows: list[dict]) -> str:
    lines = ["\n", "| batch | engine | K | total tokens/s | per-sequence tokens/s | acceptance |", "|---|---|---|---|---|---|"]
    for r in rows:
        sim = " SIMULATED" if r["simulated"] else ""
        acc = f"{r['acceptance_rate']:.2f}" if "acceptance_rate" in r else "n/a"
        lines.append(f"| {r['batch']} | {r['name']}{sim} | {r['k'] or ''} | {r['total_tokens_per_s']:.2f} | "
                     f"{r['per_seq_tokens_per_s']:.2f} | {acc} |")
    return "\n".join(lines)


def parse_ks(text: str) -> list[int | str]:
    ks: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if part in ("auto", "auto-shared"):
            ks.append(part)
        elif part.isdigit() and int(part) >= 1:
            ks.append(int(part))
        else:
            raise SybilError(
                f"--k takes a comma-separated list of positive integers, 'auto' and 'auto-shared', got {text!r}"
            )
    return ks


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m bench.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--target", default="gpt2-medium", help="target preset (gpt2-medium)")
    p.add_argument("--draft", default="gpt2", help="draft preset (gpt2)")
    p.add_argument("--weights", choices=["real", "random"], default="real",
                   help="real: checkpoints in weights/ (downloaded); random: random weights in the real shapes")
    p.add_argument("--simulate-acceptance", type=float, default=None, metavar="A",
                   help="the draft proposes the target's own token with probability A (its cost stays real); "
                        "rows say SIMULATED")
    p.add_argument("--k", default="1,2,4,8,auto,auto-shared",
                   help="windows to run: integers, auto (a fresh controller per prompt), auto-shared (one "
                        "controller for all of the row's prompts, as the server keeps one)")
    p.add_argument("--dtype", default="float32", help="compute dtype for every engine (float32)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none", help="the target's weights: " + QUANTIZE_HELP)
    p.add_argument("--draft-quantize", choices=DRAFT_QUANTIZE, default="none",
                   help="the draft's weights (auto: int4 where the CPU kernels run, as sybil.generate and serve choose)")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="the draft's head covers ids below N and <|endoftext|> only")
    p.add_argument("--no-peers", action="store_true", help="skip the CTranslate2 and llama.cpp rows")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (cpu)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per prompt (64)")
    p.add_argument("--prompts", type=int, default=4, help="prompts from bench/prompts.json (4)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; rows report medians (3)")
    p.add_argument("--batch-sizes", default=None, metavar="B,..", help="also run batched rows, e.g. 1,4,8,16")
    p.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    p.add_argument("--plot", type=Path, default=None, help="a PNG of the rows (needs matplotlib)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for every engine (default: Sybil's, the cores)")
    p.add_argument("--quick", action="store_true",
                   help="about a minute: 2 prompts x 32 tokens, 1 repeat, K 4 and auto-shared, an int8 draft "
                        "with a reduced head (--draft-vocab 8192), no transformers-assisted or peer rows")
    return p


def render(rows: list[Row], floor: dict, step: dict, config: dict) -> str:
    lines = []
    if config["simulated_acceptance"] is not None:
        lines.append(
            f"NOTE: weights are {config['weights']}; rows marked SIMULATED draw acceptance at "
            f"{config['simulated_acceptance']} (the draft model runs for real; its token is replaced)."
        )
    elif config["weights"] == "random":
        lines.append("NOTE: random weights: acceptance rates between random models mean nothing.")
    q = lambda v: f" ({v} weights)" if v else ""  # noqa: E731
    head = f" (head: ids < {config['draft_vocab']} and <|endoftext|>)" if config["draft_vocab"] else ""
    lines.append(
        f"target {config['target']}{q(config['quantize'])}, draft {config['draft']}{q(config['draft_quantize'])}{head}, "
        f"{config['dtype']} compute on {config['device']} ({config['threads']} thread{'s' if config['threads'] != 1 else ''}, kernels: {config['kernels']}), "
        f"{config['prompts']} prompts x {config['max_new_tokens']} tokens, median of {config['repeats']}"
    )
    lines.append(
        f"floor: {floor['weight_bytes'] / 1e6:.0f} MB of weights per token / {floor['read_GBps']:.1f} GB/s read "
        f"= {floor['floor_ms_per_token']:.1f} ms/token"
    )
    lines.append(
        "step ms (cache 256): target " + ", ".join(f"{n} tok {v:.1f}" for n, v in step["target"].items())
        + f"; draft 1 tok {step['draft']['1']:.1f} (draft/target step-cost ratio "
        + f"{step['draft']['1'] / step['target']['1']:.2f})"
    )
    lines.append("")
    peak = "peak CUDA MB" if config["device"].startswith("cuda") else "peak RSS MB (process)"
    head = f"| engine | K | tokens/s | speed-up | decode speed-up | acceptance | mean accepted | ms/token | x floor | expected | achieved/expected | {peak} |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]

    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    for r in rows:
        sim = " SIMULATED" if r.simulated else ""
        tps = r.note if r.tokens_per_s is None else f(r.tokens_per_s, ".2f")
        lines.append(
            f"| {r.name}{sim} | {'' if r.k is None else r.k} | {tps} | {f(r.speedup, '.2f')} | "
            f"{f(r.decode_speedup, '.2f')} | "
            f"{f(r.acceptance_rate, '.2f')} | {f(r.mean_accepted, '.2f')} | {f(r.ms_per_token, '.1f')} | "
            f"{f(r.x_floor, '.2f')} | {f(r.expected_speedup, '.2f')} | {f(r.achieved_over_expected, '.2f')} | "
            f"{f(r.peak_mb, '.0f')} |"
        )
    return "\n".join(lines)


def plot(path: Path, rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = [r for r in rows if r.name == "sybil-speculative"]
    base = next(r for r in rows if r.name == "sybil-autoregressive")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [str(r.k) for r in spec]
    a.bar(labels, [r.tokens_per_s for r in spec], label="speculative")
    a.axhline(base.tokens_per_s, color="k", ls="--", label="target only")
    a.set_xlabel("K"), a.set_ylabel("tokens/s"), a.legend()
    a.set_title("tokens/s against K" + (" (simulated acceptance)" if any(r.simulated for r in spec) else ""))
    b.scatter([r.acceptance_rate for r in spec], [r.speedup for r in spec])
    for r in spec:
        b.annotate(f"K={r.k}", (r.acceptance_rate, r.speedup))
    b.axhline(1.0, color="k", ls="--")
    b.set_xlabel("acceptance rate"), b.set_ylabel("speed-up vs target only")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        native.set_threads(args.threads)
    if args.quick:
        # what the "which draft" table found pays: an int8 draft with a reduced head at K=4
        args.prompts, args.max_new_tokens, args.repeats = min(args.prompts, 2), 32, 1
        args.no_peers = True
        if args.k == "1,2,4,8,auto,auto-shared":
            args.k = "4,auto-shared"
        if args.draft_quantize == "none":
            args.draft_quantize = "auto"
        if args.draft_vocab is None:
            args.draft_vocab = 8192
    ks = parse_ks(args.k)
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else []
    except ValueError:
        sizes = [0]
    if any(b < 1 for b in sizes):
        raise SybilError(f"--batch-sizes takes comma-separated positive integers, got {args.batch_sizes!r}")
    if args.simulate_acceptance is not None and not 0 <= args.simulate_acceptance <= 1:
        raise SybilError("--simulate-acceptance must be between 0 and 1")
    if args.max_new_tokens < 1 or args.repeats < 1:
        raise SybilError("--max-new-tokens and --repeats must be at least 1")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SybilError("--plot needs matplotlib: pip install -e '.[plot]'") from None
    device = resolve_device(args.device)
    dtype, _ = resolve_dtype(args.dtype, device)
    torch.set_grad_enabled(False)
    prompts = load_prompts(args.prompts)

    quantize = check_quantize(args.quantize, device)
    draft_quantize = resolve_draft_quantize(args.draft_quantize, device)
    progress(f"loading {args.weights} weights: target {args.target}, draft {args.draft}")
    if args.weights == "random":
        target = random_model(args.target, 0, dtype, device)
        draft = random_model(args.draft, 1, dtype, device)
    else:
        target = real_model(args.target, dtype, device)
        draft = real_model(args.draft, dtype, device)
    if draft.config.vocab_size != target.config.vocab_size:
        raise SybilError("draft and target vocabularies differ")
    if args.draft_vocab is not None and not 1 <= args.draft_vocab <= draft.config.vocab_size:
        raise SybilError(f"--draft-vocab must be between 1 and {draft.config.vocab_size}")
    # The peers get the same weights, taken before int8 replaces the float ones.
    hf_target = hf_draft = None
    if not args.no_hf and quantize is None:
        hf_target, hf_draft = hf_mirror(target), hf_mirror(draft)
    ct2, ct2_note = None, "skipped (--quick)" if args.quick else "skipped (--no-peers)"
    if not args.no_peers:
        if ct2_installed():
            progress("converting the target for CTranslate2")
        ct2, ct2_note = ct2_peer(hf_target if hf_target is not None else hf_mirror(target), dtype, quantize)
    llama, llama_note = None, ct2_note
    if not args.no_peers:
        if dtype != torch.float32:
            llama_note = "float32 compute only"
        else:
            progress("converting the target to GGUF for llama.cpp")
            llama, llama_note = llamacpp_peer(hf_target if hf_target is not None else hf_mirror(target), quantize,
                                              native.threads())
    if quantize:
        quantize_weights(target, quantize)
    if draft_quantize:
        quantize_weights(draft, draft_quantize)

    progress("measuring memory bandwidth and step costs")
    with torch_threads(native.threads()):  # torch's sum reads with every core
        bw = read_bandwidth_gbps() if device.type == "cpu" else _cuda_copy_bandwidth()
    floor = {"read_GBps": bw, "weight_bytes": weight_bytes(target)}
    floor["floor_ms_per_token"] = floor["weight_bytes"] / (bw * 1e9) * 1000
    widths = sorted(set(STEP_TOKENS) | {k + 1 for k in ks if isinstance(k, int)})  # each verify width run
    ms = step_costs({**{f"target {n}": (target, n, None) for n in widths}, "draft 1": (draft, 1, args.draft_vocab)})
    step = {
        "target": {str(n): ms[f"target {n}"] for n in widths},
        "draft": {"1": ms["draft 1"]},
    }

    rows: list[Row] = []

    def add(row: Row) -> None:
        if device.type == "cuda":  # this row's own peak of allocated GPU memory
            row.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:  # the process's high-water mark so far: this row's peak or an earlier one
            row.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(row)
        if row.tokens_per_s is not None:
            k = f" K={row.k}" if row.k is not None else ""
            progress(f"  {row.name}{k}: {row.tokens_per_s:.1f} tokens/s")

    plain = sybil_runner(target, prompts, args.max_new_tokens, device=device)
    oracles = [o.tokens for o in plain()]  # also the plain row's warm-up
    runners = {None: plain}
    for k in ks:
        runners[k] = sybil_runner(
            target, prompts, args.max_new_tokens, draft=draft, k=k,
            oracles=oracles, accept=args.simulate_acceptance, device=device, draft_vocab=args.draft_vocab,
        )
    progress(f"sybil: plain and K = {', '.join(map(str, ks))} taking turns, {args.repeats} repeat{'s' if args.repeats != 1 else ''}"
             + (f" (simulated acceptance {args.simulate_acceptance})" if args.simulate_acceptance is not None else ""))
    results = interleaved(runners, args.repeats)
    for k, (secs, reps) in results.items():
        add(sybil_row(k, secs, reps, args.simulate_acceptance is not None))
    peak = max(r.peak_mb for r in rows)
    for r in rows:  # the rows ran in turns: one peak for all of them
        r.peak_mb = peak
    base = rows[0]

    if hf_target is None:
        note = "skipped (--no-hf)" if args.no_hf else f"n/a for {quantize}" if quantize else "not installed"
        rows += [Row("hf-generate", None, None, note=note), Row("hf-assisted", "hf", None, note=note)]
    else:
        with torch_threads(native.threads()):  # transformers computes with torch's own threads
            progress("hf-generate")
            add(run_hf(hf_target, prompts, args.max_new_tokens, args.repeats, device))
            if args.quick:  # assisted generation doubles the transformers time
                rows.append(Row("hf-assisted", "hf", None, note="skipped (--quick)"))
            else:
                progress("hf-assisted (its acceptance is real, not simulated)")
                row = run_hf(hf_target, prompts, args.max_new_tokens, args.repeats, device, hf_draft)
                row.note = "real acceptance" + (" of random weights" if args.weights == "random" else "")
                add(row)
    if ct2 is None:
        rows.append(Row("ct2-generate", None, None, note=ct2_note))
    else:
        progress(f"ct2-generate ({ct2.compute_type})")
        add(run_ct2(ct2, prompts, args.max_new_tokens, args.repeats))
    if llama is None:
        rows.append(Row("llamacpp-bench", None, None, note=llama_note))
    else:
        depth = round(statistics.median(map(len, prompts)))
        progress(f"llama-bench ({', '.join(llama.types)}, {args.max_new_tokens} tokens after {depth})")
        try:
            for t, tps in llama.decode_tokens_per_s(args.max_new_tokens, depth, max(args.repeats, 3)).items():
                add(Row(f"llamacpp-bench {t}", None, tps, decode_tokens_per_s=tps, note="decode only (tg)"))
        finally:
            llama.close()

    t1 = step["target"]["1"]
    for r in rows:
        if r.tokens_per_s is None:
            continue
        r.speedup = r.tokens_per_s / base.tokens_per_s
        if r.decode_tokens_per_s is not None:
            r.decode_speedup = r.decode_tokens_per_s / base.decode_tokens_per_s
        r.ms_per_token = 1000 / r.tokens_per_s
        r.x_floor = r.ms_per_token / floor["floor_ms_per_token"]
        if r.name == "sybil-speculative" and isinstance(r.k, int):
            alpha = args.simulate_acceptance if r.simulated else alpha_from_mean(r.mean_accepted, r.k)
            verify = step["target"][str(r.k + 1)]
            r.expected_speedup = leviathan_speedup(alpha, r.k, step["draft"]["1"] / t1, verify / t1)
            # the expectation models decoding: set it against the decode speed-up
            r.achieved_over_expected = (r.decode_speedup or r.speedup) / r.expected_speedup

    config = {
        "target": args.target, "draft": args.draft, "weights": args.weights, "dtype": str(dtype).removeprefix("torch."),
        "device": str(device), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "simulated_acceptance": args.simulate_acceptance, "threads": native.threads(),
        "quantize": quantize, "draft_quantize": draft_quantize, "draft_vocab": args.draft_vocab,
        "kernels": (f"sybil C++ (AVX2 float, {native.int_dot()} integer dots)" if native.available()
                    else f"torch ({native.why_unavailable()})"),
    }
    batch_rows = []
    if args.batch_sizes:
        k_batch = next((k for k in ks if isinstance(k, int)), 4)
        batch_rows = run_batches(target, draft, prompts, args.max_new_tokens, args.repeats, sizes,
                                 k_batch, args.simulate_acceptance, device)
    print(render(rows, floor, step, config) + (render_batches(batch_rows) if batch_rows else ""))
    if args.json:
        record = {"config": config, "floor": floor, "step_ms": step, "runs": [asdict(r) for r in rows]}
        if batch_rows:
            record["batch_runs"] = batch_rows
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(args.json)
    if args.plot:
        plot(args.plot, rows)
    return 0


def _cuda_copy_bandwidth() -> float:
    x = torch.empty(2**30 // 4, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 4 * 10 / (time.perf_counter() - t) / 1e9


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
