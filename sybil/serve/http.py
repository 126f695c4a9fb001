"""Running the HTTP layer: bind the socket first (a taken port is a one-line error and
--port 0 picks a free one), then uvicorn until SIGTERM or Ctrl-C, which drains: no new
requests, those in flight run for up to the grace period, the rest are cancelled."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading

import uvicorn

from sybil.errors import SybilError
from sybil.serve.api import build_app
from sybil.serve.scheduler import Scheduler


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

