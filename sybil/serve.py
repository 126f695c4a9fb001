"""python -m sybil.serve: an OpenAI-compatible completions server.

Loads the models, binds the socket (so a taken port is a one-line error, and
--port 0 picks a free one, printed on stderr), then runs uvicorn until SIGTERM
or Ctrl-C: it stops accepting, lets requests in flight finish for up to
--shutdown-grace seconds, cancels the rest, and exits with status 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from pathlib import Path

import torch
import uvicorn

from sybil import native
from sybil.cli import OneLineParser, run_cli
from sybil.errors import SybilError
from sybil.generate import _k, check_draft_flags
from sybil.api import build_app
from sybil.loader import (DRAFT_QUANTIZE, DRAFT_QUANTIZE_HELP, QUANTIZE, QUANTIZE_HELP, load_draft, load_model,
                          resolve_device, resolve_dtype)
from sybil.round_log import RoundLog
from sybil.scheduler import Scheduler


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m sybil.serve", description="Serve GPT-2 over an OpenAI-compatible HTTP API.")
    p.add_argument("--model", default="gpt2-medium", help="preset name or checkpoint path (default gpt2-medium)")
    p.add_argument("--draft", default=None, help="speculative draft: preset name, checkpoint path, 'ngram', 'suffix' (lookup in this and "
                        "earlier requests' text), or suffix+MODEL (the lookup first, then the model)")
    p.add_argument("--k", type=_k, default=None,
                   help="draft window: a positive integer, or 'auto' (the default: each row's own window, priced for the whole batch; needs --draft)")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="N", help="draft from ids below N only")
    p.add_argument("--dtype", default="auto", help="auto (default), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for Sybil's kernels (default: SYBIL_THREADS, else torch's count, the cores)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none", help=QUANTIZE_HELP)
    p.add_argument("--draft-quantize", choices=DRAFT_QUANTIZE, default="auto", help=DRAFT_QUANTIZE_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded at once (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; then 429 (default 64)")
    p.add_argument("--no-prompt-cache", action="store_true",
                   help="prefill every prompt from scratch (slots lend no shared prefix; to measure the cache)")
    p.add_argument("--prefill-chunk", type=_chunk, default="auto", metavar="N",
                   help="prompt tokens fed per round beside the decoding rows: N, 'auto' (default: a round with "
                        "a chunk costs about two without) or 0 (prefill each prompt whole as it joins)")
    p.add_argument("--shutdown-grace", type=float, default=5.0,
                   help="seconds requests in flight may run after SIGTERM (default 5)")
    p.add_argument("--round-log", type=Path, default=None, metavar="PATH",
                   help="append one JSON line per round (rows, draft windows, tokens fed, verify and draft ms) "
                        "to PATH: why a draft pays or not under load (sybil.round_log)")
    return p


def _chunk(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"--prefill-chunk takes a number of tokens, 'auto' or 0, got {text!r}")
    return n


def bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        raise SybilError(f"cannot listen on {host}:{port} ({e}); pick another --port or --host") from None
    sock.set_inheritable(True)
    sock.listen(2048)  # from now on connections wait in the backlog: none is refused before uvicorn starts
    return sock


class _Server(uvicorn.Server):
    """uvicorn, but the first SIGTERM or Ctrl-C drains before it stops listening: the
    socket stays open and new requests (and /health) get 503 while those in flight
    run for up to the grace period; then uvicorn shuts down. A second signal stops
    at once."""

    def __init__(self, config: uvicorn.Config, drain) -> None:
        super().__init__(config)
        self.drain = drain
        self.draining = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.draining is None:
            def drain_then_exit() -> None:
                self.drain()
                self.should_exit = True  # uvicorn's main loop looks every 0.1 s

            self.draining = threading.Thread(target=drain_then_exit, name="sybil-drain", daemon=True)
            self.draining.start()
            return
        super().handle_exit(sig, frame)


def run(args) -> int:
    if args.max_batch < 1 or args.max_queue < 0:
        raise SybilError("--max-batch must be at least 1 and --max-queue at least 0")
    if args.shutdown_grace < 0:
        raise SybilError("--shutdown-grace must be >= 0")
    if not 0 <= args.port <= 65535:
        raise SybilError(f"--port must be in 0..65535, got {args.port}")
    if args.threads is not None:
        native.set_threads(args.threads)
    check_draft_flags(args)
    round_log = RoundLog(args.round_log) if args.round_log else None  # an unwritable log fails fast
    sock = bind(args.host, args.port)  # before loading: so does a taken port
    device = resolve_device(args.device)
    dtype, _ = resolve_dtype(args.dtype, device)
    model = load_model(args.model, dtype, device, quantize=args.quantize)
    draft = load_draft(args.draft, model, args.model, args.quantize, args.draft_quantize)
    scheduler = Scheduler(model, draft, args.k, args.max_batch, args.max_queue, args.draft_vocab,
                          args.prefill_chunk or None, not args.no_prompt_cache, round_log)
    served = args.served_model_name or args.model
    what = f"{served} ({str(dtype).removeprefix('torch.')} on {device}"
    what += f", {model.quantized} weights" if model.quantized else ""
    what += f", draft {args.draft} k={args.k})" if args.draft else ")"
    try:
        serve(scheduler, served, sock, args.shutdown_grace, what)
    finally:
        if round_log is not None:
            round_log.close()
    return 0


def serve(scheduler: Scheduler, served: str, sock: socket.socket, grace_s: float, what: str) -> None:
    """Run the HTTP server on a bound socket until SIGTERM or Ctrl-C, then drain."""
    app = build_app(scheduler, served, grace_s)
    logging.basicConfig(level=logging.INFO, format="sybil: %(message)s", stream=sys.stderr)
    host, port = sock.getsockname()[:2]
    print(f"sybil: serving {what} on http://{host}:{port}/v1 "
          f"(max batch {scheduler.max_batch}, queue {scheduler.max_queue})", file=sys.stderr, flush=True)
    # The scheduler keeps the grace period itself (it then cancels the rows, whose
    # streams end with an error event); uvicorn's own timeout is only a backstop.
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=grace_s + 10, lifespan="on")
    server = _Server(config, drain=lambda: scheduler.stop(grace_s))
    # uvicorn handles SIGTERM/SIGINT itself and, once shut down, re-raises the
    # signal to the handler it found: leave it a no-op so that a clean shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    print("sybil: stopped", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
