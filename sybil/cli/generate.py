"""python -m sybil.generate: stream GPT-2 text from the command line.

Text goes to stdout as tokens are committed; the finish line and any --stats
summary go to stderr, so stdout is exactly the generated text (or, with --json,
one JSON object). Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sybil.cli.common import OneLineParser, add_engine_flags, engine_config, run_cli
from sybil.engine.factory import load
from sybil.engine.generate import generate
from sybil.engine.sequence import Generation
from sybil.errors import SybilError
from sybil.ops import native
from sybil.weights.tokenizer import EOT_ID, StreamDecoder, decode, encode


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def _bias(text: str) -> tuple[int, float]:
    try:
        token, value = text.split(":")
        return int(token), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--logit-bias takes ID:VALUE, e.g. 198:-100, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m sybil.generate", description="Generate text with GPT-2.")
    add_engine_flags(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    src.add_argument("--prompt-ids", type=_ids, action="append", help="prompt as token ids, e.g. 464,2068; repeatable")
    src.add_argument(
        "--prompts-file", type=Path, help='one prompt per line, or JSON lines ({"prompt": ...} or {"prompt_ids": [...]})'
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="with --json: each generated token's log-probability and its N most likely alternatives")
    p.add_argument("--logit-bias", type=_bias, action="append", default=None, metavar="ID:VALUE",
                   help="add VALUE (-100..100) to token ID's logit before choosing; repeatable")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's presence penalty, -2..2 (0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's frequency penalty, -2..2 (0)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming text")
    p.add_argument("--stats", action="store_true", help="print a one-line telemetry summary to stderr")
    return p


def _summary(stats: dict) -> str:
    return (
        f"rounds {stats['rounds']}, drafted {stats['drafted']}, accepted {stats['accepted']} "
        f"({stats['acceptance_rate']:.1%}), {stats['mean_accepted']:.2f} tokens/round, "
        f"draft {stats['time_draft_s']:.2f}s, verify {stats['time_verify_s']:.2f}s, other {stats['time_other_s']:.2f}s"
    )


def read_prompts_file(path: Path) -> list[list[int]]:
    """Prompts from a file: plain lines are text; lines starting with '{' are JSON."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SybilError(f"cannot read --prompts-file {path}: {e}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            prompts.append(encode(line))
            continue
        try:
            rec = json.loads(line)
            prompts.append([int(t) for t in rec["prompt_ids"]] if "prompt_ids" in rec else encode(rec["prompt"]))
        except (ValueError, KeyError, TypeError) as e:
            raise SybilError(f"{path}:{n}: expected {{\"prompt\": TEXT}} or {{\"prompt_ids\": [...]}} ({e})") from None
    if not prompts:
        raise SybilError(f"--prompts-file {path} has no prompts")
    return prompts


def _record(out: Generation, dtype: torch.dtype, device: torch.device) -> dict:
    text_ids = out.tokens[:-1] if out.finish_reason == "eos" else out.tokens
    record = {
        "kernel_build_s": native.build_seconds() if device.type == "cpu" else 0.0,
        "prompt_ids": out.prompt_ids,
        "tokens": out.tokens,
        "text": decode(text_ids),
        "finish_reason": out.finish_reason,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        **out.stats,
    }
    if out.logprobs is not None:
        record["logprobs"] = [{"token": e.token, "logprob": e.logprob, "top": [[t, lp] for t, lp in e.top]}
                              for e in out.logprobs]
    if out.error:
        record["error"] = out.error
    return record


def run(args: argparse.Namespace) -> int:
    config = engine_config(args)
    if args.prompts_file is not None:
        prompts = read_prompts_file(args.prompts_file)
    elif args.prompt_ids is not None:
        prompts = args.prompt_ids
    elif args.prompt is not None:
        prompts = [encode(p) for p in args.prompt]
    else:
        raise SybilError("give a prompt with --prompt TEXT, --prompt-ids 1,2,3 or --prompts-file FILE")
    batched = len(prompts) > 1
    if args.logprobs is not None and not args.json:
        raise SybilError("--logprobs is printed with --json; add --json")
    loaded = load(config)
    model, dtype, device = loaded.model, loaded.dtype, loaded.device
    if args.dtype == "auto":
        print(f"sybil: dtype {str(dtype).removeprefix('torch.')} ({loaded.dtype_reason})", file=sys.stderr)

    # One prompt streams its text as tokens are committed; a batch prints each
    # result whole, in input order, once all are done.
    stream = None if args.json or batched else StreamDecoder()

    def on_token(_row: int, t: int) -> None:
        if stream is not None and t != EOT_ID:
            sys.stdout.write(stream.push(t))
            sys.stdout.flush()

    result = generate(
        model,
        prompts if batched else prompts[0],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_at_eos=not args.ignore_eos,
        draft=loaded.draft,
        k=config.k,
        on_token=on_token,
        draft_vocab=args.draft_vocab,
        logit_bias=dict(args.logit_bias or []),
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        logprobs=args.logprobs,
    )
    outs = result if batched else [result]
    for i, out in enumerate(outs):
        rec = _record(out, dtype, device)
        if args.json:
            print(json.dumps(rec))
        elif stream is not None:
            sys.stdout.write(stream.flush() + "\n")
        elif out.error:
            print(f"[{i}] error: {out.error}")
        else:
            print(f"[{i}] {rec['text']}")
        if out.error:
            continue
        s = out.stats
        if not args.json:
            built = native.build_seconds() if device.type == "cpu" else 0.0
            print(
                f"[{'' if not batched else f'{i}: '}{out.finish_reason}: {len(out.tokens)} tokens, "
                f"first token {s['prefill_ms']:.0f} ms, {s['decode_tokens_per_s']:.1f} tokens/s"
                + (f"; kernels compiled first in {built:.0f} s, not counted" if built else "") + "]",
                file=sys.stderr,
            )
        if args.stats:
            print(_summary(out.stats), file=sys.stderr)
    return 2 if any(out.error for out in outs) else 0  # the good rows were still printed


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
