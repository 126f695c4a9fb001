"""What every command line here shares: one-line errors and exit status 2 for bad input,
and the flags that choose a model, its precision and its draft (one set, one meaning,
turned into an EngineConfig for sybil.engine.factory)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from sybil.engine.factory import EngineConfig
from sybil.errors import SybilError
from sybil.weights.loader import DRAFT_QUANTIZE, QUANTIZE

QUANTIZE_HELP = ("the weights, quantized at load (CPU): int8 (int8 weights and activations, integer math), "
                 "int4 (4-bit weights in groups of 32, int8 head), int8wo (weight-only int8, float math: "
                 "the most accurate); --dtype is then the compute dtype")
DRAFT_QUANTIZE_HELP = "the draft model's weights (auto: the fastest, int4, on the CPU; the output is the target's either way)"
THREADS_HELP = "CPU threads for Sybil's kernels (default: SYBIL_THREADS, else torch's count, the cores)"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse's default also prints usage)."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """Parse argv and run (without autograd); a SybilError becomes its message on one
    line and status 2."""
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        return run(args)
    except SybilError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into head
        return 0


def parse_k(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes a positive integer or 'auto', got {text!r}") from None


def parse_chunk(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"--prefill-chunk takes a number of tokens, 'auto' or 0, got {text!r}")
    return n


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The flags of sybil.generate and sybil.serve that choose the models (EngineConfig)."""
    p.add_argument("--model", default="gpt2-medium", help="preset name or checkpoint path (default gpt2-medium)")
    p.add_argument("--dtype", default="auto", help="auto (default), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    p.add_argument("--quantize", choices=QUANTIZE, default="none", help=QUANTIZE_HELP)
    p.add_argument("--draft-quantize", choices=DRAFT_QUANTIZE, default="auto", help=DRAFT_QUANTIZE_HELP)
    p.add_argument("--draft", default=None, help="speculative draft: preset name, checkpoint path, 'ngram', 'suffix' (lookup in this and "
                        "earlier requests' text), or suffix+MODEL (the lookup first, then the model)")
    p.add_argument("--k", type=parse_k, default=None,
                   help="draft window: a positive integer, or 'auto' (the default: each row's own window, priced for the whole batch; needs --draft)")
    p.add_argument(
        "--draft-vocab", type=int, default=None, metavar="N",
        help="draft from token ids below N and <|endoftext|> only (a cheaper draft head; output unchanged)",
    )


def engine_config(args: argparse.Namespace, **server) -> EngineConfig:
    """The EngineConfig the engine flags describe. --k and --draft-vocab shape a draft:
    without --draft they would be ignored, so that is an error."""
    for flag, value in (("--k", args.k), ("--draft-vocab", args.draft_vocab)):
        if value is not None and args.draft is None:
            raise SybilError(f"{flag} sets up speculative decoding; it needs --draft (a model, or ngram)")
    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                        draft=args.draft, draft_quantize=args.draft_quantize, draft_vocab=args.draft_vocab,
                        k="auto" if args.k is None else args.k, threads=args.threads, **server)
