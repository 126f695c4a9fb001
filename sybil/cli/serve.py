"""python -m sybil.serve: an OpenAI-compatible completions server.

Loads the models, binds the socket (so a taken port is a one-line error, and
--port 0 picks a free one, printed on stderr), then runs uvicorn until SIGTERM
or Ctrl-C: it stops accepting, lets requests in flight finish for up to
--shutdown-grace seconds, cancels the rest, and exits with status 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sybil.cli.common import (
    OneLineParser,
    add_engine_flags,
    engine_config,
    parse_chunk,
    run_cli,
)
from sybil.engine.factory import load
from sybil.engine.round_log import RoundLog
from sybil.errors import SybilError
from sybil.serve.http import bind, serve
from sybil.serve.scheduler import Scheduler


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m sybil.serve", description="Serve GPT-2 over an OpenAI-compatible HTTP API.")
    add_engine_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded at once (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; then 429 (default 64)")
    p.add_argument("--no-prompt-cache", action="store_true",
                   help="prefill every prompt from scratch (slots lend no shared prefix; to measure the cache)")
    p.add_argument("--prefill-chunk", type=parse_chunk, default="auto", metavar="N",
                   help="prompt tokens fed per round beside the decoding rows: N, 'auto' (default: a round with "
                        "a chunk costs about two without) or 0 (prefill each prompt whole as it joins)")
    p.add_argument("--shutdown-grace", type=float, default=5.0,
                   help="seconds requests in flight may run after SIGTERM (default 5)")
    p.add_argument("--round-log", type=Path, default=None, metavar="PATH",
                   help="append one JSON line per round (rows, draft windows, tokens fed, verify and draft ms) "
                        "to PATH: why a draft pays or not under load (sybil.engine.round_log)")
    return p


def run(args) -> int:
    if args.max_batch < 1 or args.max_queue < 0:
        raise SybilError("--max-batch must be at least 1 and --max-queue at least 0")
    if args.shutdown_grace < 0:
        raise SybilError("--shutdown-grace must be >= 0")
    if not 0 <= args.port <= 65535:
        raise SybilError(f"--port must be in 0..65535, got {args.port}")
    config = engine_config(args, max_batch=args.max_batch, max_queue=args.max_queue,
                           prefill_chunk=args.prefill_chunk or None, prompt_cache=not args.no_prompt_cache)
    round_log = RoundLog(args.round_log) if args.round_log else None  # an unwritable log fails fast
    sock = bind(args.host, args.port)  # before loading: so does a taken port
    loaded = load(config)
    scheduler = Scheduler.from_config(loaded, round_log)
    served = args.served_model_name or args.model
    try:
        serve(scheduler, served, sock, args.shutdown_grace, loaded.describe(served))
    finally:
        if round_log is not None:
            round_log.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
