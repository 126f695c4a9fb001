"""python -m sybil.perplexity: the perplexity of a text under a GPT-2, by strided
sliding windows (the method of the Hugging Face perplexity guide; the windows and
the log-softmax are sybil.sample.logprobs', which the server's echo uses too).

Every token but the first is scored exactly once, each predicted from up to
--context tokens of its window before it. The result goes to stdout (one JSON
object with --json), a progress bar to stderr for texts of more than a few
windows; bad input is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sybil.cli.common import QUANTIZE_HELP, OneLineParser, run_cli
from sybil.engine.scoring import perplexity, sliding_nll, windows
from sybil.errors import SybilError
from sybil.ops import native
from sybil.weights.loader import QUANTIZE, load_model, resolve_device, resolve_dtype
from sybil.weights.tokenizer import encode

PROGRESS_MIN_WINDOWS = 4  # fewer windows finish before a bar would tell anything


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m sybil.perplexity",
                      description="Perplexity of a text under GPT-2, by strided sliding windows.")
    p.add_argument("--model", default="gpt2", help="preset name or checkpoint path (default gpt2)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", type=Path, help="a UTF-8 text file")
    src.add_argument("--text", help="the text itself")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per window (default: the model's context, 1024 for GPT-2)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts, below --context (default: half the context)")
    p.add_argument("--batch", type=int, default=1, help="full windows per forward (default 1)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, auto")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for Sybil's kernels (default: SYBIL_THREADS, else torch's count, the cores)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none", help=QUANTIZE_HELP)
    p.add_argument("--json", action="store_true",
                   help='print one object {"perplexity", "tokens", "nll", "seconds"} instead of a line')
    return p


def read_text(args: argparse.Namespace) -> str:
    if args.text is not None:
        text = args.text
    else:
        try:
            text = args.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SybilError(f"cannot read --file {args.file}: {e}") from None
    if not text.strip():
        raise SybilError("the text is empty; give --text or a --file with at least two tokens")
    return text


def _windows(n: int, context: int, stride: int | None) -> tuple[list, int]:
    stride = context // 2 if stride is None else stride
    try:
        return windows(n, context, stride), stride
    except ValueError as e:
        raise SybilError(f"{e}: lower --stride or raise --context") from None


def run(args: argparse.Namespace) -> int:
    text = read_text(args)
    ids = encode(text)
    if len(ids) < 2:
        raise SybilError(f"the text is {len(ids)} token; perplexity needs at least 2 (the first is never scored)")
    if args.batch < 1:
        raise SybilError(f"--batch must be at least 1, got {args.batch}")
    if args.threads is not None:
        native.set_threads(args.threads)
    if args.context is not None:  # a bad --stride fails before the model loads
        _windows(len(ids), args.context, args.stride)
    device = resolve_device(args.device)
    dtype, _ = resolve_dtype(args.dtype, device)
    model = load_model(args.model, dtype, device, quantize=args.quantize)
    context = args.context or model.config.n_positions
    if context > model.config.n_positions:
        raise SybilError(f"--context {context} is longer than the model's context ({model.config.n_positions})")
    plan, stride = _windows(len(ids), context, args.stride)

    bar = None
    if len(plan) >= PROGRESS_MIN_WINDOWS:
        from tqdm import tqdm

        bar = tqdm(total=len(ids) - 1, unit="tok", desc="scoring", file=sys.stderr, leave=False)
    start = time.perf_counter()
    with torch.inference_mode():
        nll, count = sliding_nll(model, ids, context, stride, args.batch, bar.update if bar else None)
    seconds = time.perf_counter() - start
    if bar:
        bar.close()
    ppl = perplexity(nll, count)
    if args.json:
        print(json.dumps({"perplexity": ppl, "tokens": count, "nll": nll / count, "seconds": seconds}))
    else:
        print(f"perplexity {ppl:.4f} over {count} tokens (mean negative log-likelihood {nll / count:.5f}; "
              f"context {context}, stride {stride}, {len(plan)} window{'s' if len(plan) > 1 else ''}, {seconds:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
