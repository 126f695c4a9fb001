"""The server's Prometheus metrics, in a registry of their own (no process globals,
so two servers in one process, as in the tests, do not share counts)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, running: Callable[[], int], queued: Callable[[], int], cached: Callable[[], int] = lambda: 0
                 ) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sybil_requests", "Completion requests answered, by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("sybil_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generated_tokens = Counter("sybil_generated_tokens", "Tokens generated (committed)", registry=r)
        self.drafted_tokens = Counter("sybil_draft_tokens", "Tokens proposed by the draft", registry=r)
        self.accepted_tokens = Counter("sybil_accepted_tokens", "Draft tokens the target accepted", registry=r)
        Gauge("sybil_running_requests", "Requests decoding in the batch", registry=r).set_function(running)
        Gauge("sybil_queued_requests", "Requests waiting for a slot", registry=r).set_function(queued)
        Gauge("sybil_cached_prompt_tokens", "Prompt tokens whose cache entries a slot already held (so far, in all)",
              registry=r).set_function(cached)
        self.ttft = Histogram(
            "sybil_time_to_first_token_seconds", "From a request's arrival to its first token",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "sybil_inter_token_latency_seconds",
            "Time per token after the first (a round that commits n tokens counts its gap / n, n times)",
            buckets=LATENCY_BUCKETS, registry=r,
        )

    def round(self, tokens: int, drafted: int, accepted: int) -> None:
        self.generated_tokens.inc(tokens)
        self.drafted_tokens.inc(drafted)
        self.accepted_tokens.inc(accepted)

    def latency(self, first: bool, gap_s: float, tokens: int) -> None:
        if first:
            self.ttft.observe(gap_s)
            tokens -= 1
            gap_s = 0.0  # the first round's other tokens arrived with the first
        for _ in range(tokens):
            self.itl.observe(gap_s / max(tokens, 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
