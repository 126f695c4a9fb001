"""python -m sybil.generate: stream GPT-2 text from the command line.

Text goes to stdout as tokens are committed; the finish line and any --stats
summary go to stderr, so stdout is exactly the generated text (or, with --json,
one JSON object). Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import types

import torch

from sybil import engine
from sybil.errors import SybilError
from sybil.loader import load_model, resolve_device, resolve_dtype
from sybil.tokenizer import EOT_ID, StreamDecoder, decode, encode


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage too
        self.exit(2, f"error: {message} (see python -m sybil.generate --help)\n")


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def _k(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes a positive integer or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m sybil.generate", description="Generate text with GPT-2.")
    p.add_argument("--model", default="gpt2-medium", help="preset name or checkpoint path (default gpt2-medium)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", type=_ids, help="prompt as token ids, e.g. 464,2068")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", help="auto (default), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")
    p.add_argument("--draft", default=None, help="speculative draft: preset name, checkpoint path, or 'ngram'")
    p.add_argument("--k", type=_k, default=4, help="draft window: a positive integer or 'auto' (default 4)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--stats", action="store_true", help="print a one-line telemetry summary to stderr")
    return p


def _summary(stats: dict) -> str:
    return (
        f"rounds {stats['rounds']}, drafted {stats['drafted']}, accepted {stats['accepted']} "
        f"({stats['acceptance_rate']:.1%}), {stats['mean_accepted']:.2f} tokens/round, "
        f"draft {stats['time_draft_s']:.2f}s, verify {stats['time_verify_s']:.2f}s, other {stats['time_other_s']:.2f}s"
    )


def run(args: argparse.Namespace) -> int:
    if args.prompt is None and args.prompt_ids is None:
        raise SybilError("give a prompt with --prompt TEXT or --prompt-ids 1,2,3")
    prompt_ids = args.prompt_ids if args.prompt_ids is not None else encode(args.prompt)
    device = resolve_device(args.device)
    dtype, why = resolve_dtype(args.dtype, device)
    if args.dtype == "auto":
        print(f"sybil: dtype {str(dtype).removeprefix('torch.')} ({why})", file=sys.stderr)
    model = load_model(args.model, dtype, device)
    draft = args.draft
    if draft not in (None, "ngram"):
        draft = model if draft == args.model else load_model(draft, dtype, device)

    stream = None if args.json else StreamDecoder()

    def on_token(_row: int, t: int) -> None:
        if stream is not None and t != EOT_ID:
            sys.stdout.write(stream.push(t))
            sys.stdout.flush()

    out = engine.generate(
        model,
        prompt_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_at_eos=not args.ignore_eos,
        draft=draft,
        k=args.k,
        on_token=on_token,
    )
    text_ids = out.tokens[:-1] if out.finish_reason == "eos" else out.tokens
    if args.json:
        record = {
            "prompt_ids": out.prompt_ids,
            "tokens": out.tokens,
            "text": decode(text_ids),
            "finish_reason": out.finish_reason,
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            **out.stats,
        }
        print(json.dumps(record))
    else:
        sys.stdout.write(stream.flush() + "\n")
        s = out.stats
        print(
            f"[{out.finish_reason}: {len(out.tokens)} tokens, first token {s['prefill_ms']:.0f} ms, "
            f"{s['decode_tokens_per_s']:.1f} tokens/s]",
            file=sys.stderr,
        )
    if args.stats:
        print(_summary(out.stats), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except SybilError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into head
        return 0


class _CallableModule(types.ModuleType):
    """`import sybil.generate` rebinds the package attribute `sybil.generate` from
    the function to this module; making the module callable keeps
    `sybil.generate(model, ...)` working either way."""

    def __call__(self, *args, **kwargs) -> engine.Generation:
        return engine.generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
