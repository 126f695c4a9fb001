"""Continuous batching for the server: one thread owns the models and runs Sybil's
engine core (sybil.engine.core) over the requests in flight.

Requests wait in a bounded queue and join the running batch at round boundaries,
each in a free slot of the preallocated caches; a row leaves when it finishes or
its client cancels, and its slot is free for the next round. The HTTP layer
(sybil.serve.api) never touches a model: it submits Jobs and receives Events through
a callback, called on this thread, that must not block.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from sybil.engine.core import EngineCore
from sybil.engine.factory import Loaded
from sybil.engine.generate import make_drafter
from sybil.engine.prompt_cache import next_admission
from sybil.engine.round_log import RoundRecord
from sybil.engine.sequence import Generation
from sybil.errors import SybilError
from sybil.model.gpt import GPT
from sybil.sample.logprobs import TokenLogprob
from sybil.sample.params import SamplingParams
from sybil.spec.controller import Controller
from sybil.spec.drafter import Drafter


@dataclass
class Event:
    """What one round did for one job. finish_reason is set on its last event:
    "eos", "length", "context" (from the engine), "cancelled" or "error". A job
    that asked for its prompt's log-probabilities gets them in a first event
    without tokens."""

    tokens: list[int]
    drafted: int = 0
    accepted: int = 0
    finish_reason: str | None = None
    error: str | None = None
    time: float = field(default_factory=time.perf_counter)
    logprobs: list[TokenLogprob] | None = None  # one per token, when the job asked
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Job:
    prompt: list[int]  # checked by the caller: non-empty, in the vocabulary, fits the context with max_tokens
    max_tokens: int  # 0: score the prompt only (prompt_logprobs set)
    params: SamplingParams
    seed: int | None = None  # None: a fresh random seed when sampling
    stop_at_eos: bool = True
    emit: Callable[[Event], None] = lambda event: None
    logprobs: int | None = None  # report each token's log-probability with this many alternatives
    prompt_logprobs: int | None = None  # and the prompt's
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    cached: int = 0  # prompt tokens its slot already held (set before its first event)
    passed: int = 0  # times a job queued behind it was admitted first (sybil.engine.prompt_cache.next_admission)


class QueueFull(SybilError):
    """More requests than --max-batch running and --max-queue waiting."""


class ShuttingDown(SybilError):
    """The server is draining and takes no new requests."""


class Scheduler:
    """Owns the target (and draft) and an engine of max_batch slots; runs rounds on its
    own thread while any job is running."""

    WINDOW = 16  # queued jobs considered for each free slot (each a prefix match per free slot)

    def __init__(
        self,
        model: GPT,
        draft: GPT | str | Drafter | None = None,
        k: int | str | Controller = "auto",
        max_batch: int = 8,
        max_queue: int = 64,
        draft_vocab: int | None = None,
        prefill_chunk: int | str | None = "auto",
        prompt_cache: bool = True,
        round_log: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise SybilError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        max_len = model.config.n_positions
        graphs = model.device.type == "cuda"
        drafter = make_drafter(draft, model, SamplingParams(), max_len, max_batch, graphs, draft_vocab)
        # chunked prefill (sybil.engine.prefill): a joining prompt is fed inside the running
        # rows' rounds, so they never wait for a whole prompt; None prefills it at once.
        # prompt_cache False: every prompt prefilled from scratch. round_log: each round's
        # record (sybil.engine.round_log), if asked for.
        self.engine = EngineCore(model, max_batch, max_len, drafter, k, graphs, prefill_chunk,
                                 prompt_cache=prompt_cache, on_round=round_log)
        self.engine.prefault()  # at start, not in each slot's first round
        self.jobs: list[Job | None] = [None] * max_batch  # the job in each slot
        self.queue: deque[Job] = deque()
        self.cond = threading.Condition()
        self.accepting = True
        self.stopping = False
        self.rounds = 0
        self.thread = threading.Thread(target=self._run, name="sybil-scheduler", daemon=True)

    @classmethod
    def from_config(cls, loaded: Loaded, round_log: Callable[[RoundRecord], None] | None = None) -> "Scheduler":
        """The scheduler an EngineConfig describes, over its loaded models (sybil.engine.factory)."""
        c = loaded.config
        return cls(loaded.model, loaded.draft, c.k, c.max_batch, c.max_queue, c.draft_vocab, c.prefill_chunk,
                   c.prompt_cache, round_log)

    # ---- called from the HTTP layer's threads
    def start(self) -> None:
        """Start the scheduler thread (once; later calls do nothing)."""
        if self.thread.ident is None:
            self.thread.start()

    @property
    def running(self) -> int:
        return sum(j is not None for j in self.jobs)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the engine took from its slots' earlier sequences, in all."""
        return self.engine.cached_tokens

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.accepting

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs, all or none: QueueFull when they do not fit in the free slots and
        the queue together, ShuttingDown once the server drains."""
        with self.cond:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down")
            free = self.max_batch - self.running
            if self.queued + len(jobs) > self.max_queue + free:
                raise QueueFull(
                    f"the server is busy ({self.running} running, {self.queued} queued); retry shortly"
                )
            self.queue.extend(jobs)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job (its client went away): it leaves the batch before the next round."""
        with self.cond:
            job.cancelled = True
            self.cond.notify()

    def stop(self, grace_s: float = 0.0) -> None:
        """Take no new jobs; let those in flight run for up to grace_s, then cancel the
        rest and end the thread."""
        with self.cond:
            self.accepting = False
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self.running or self.queued):
            time.sleep(0.02)
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join()

    # ---- the scheduler thread
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                admit = self._boundary()
                if admit is None:
                    return
                for slot, job in admit:
                    self._add(slot, job)
                if self.engine.active:
                    self._step()

    def _boundary(self) -> list[tuple[int, Job]] | None:
        """Between rounds: drop cancelled jobs, take queued ones into free slots, or
        wait for work. None when the thread should end."""
        with self.cond:
            while True:
                if self.stopping:
                    for job in [*self.queue, *filter(None, self.jobs)]:
                        job.emit(Event([], finish_reason="cancelled"))
                    self.queue.clear()
                    self.jobs = [None] * self.max_batch
                    return None
                for slot, job in enumerate(self.jobs):
                    if job is not None and job.cancelled:
                        self.engine.remove(slot)
                        self.jobs[slot] = None
                        job.emit(Event([], finish_reason="cancelled"))
                for job in [j for j in self.queue if j.cancelled]:
                    self.queue.remove(job)
                    job.emit(Event([], finish_reason="cancelled"))
                admit = []
                free = [b for b in self.engine.free_slots() if self.jobs[b] is None]
                while self.queue and free:  # each job to the free slot holding most of its prompt
                    job = self._next(free)
                    slot = self.engine.best_slot(job.prompt, free)
                    free.remove(slot)
                    self.jobs[slot] = job
                    admit.append((slot, job))
                if admit or self.engine.active:
                    return admit
                self.cond.wait()

    def _next(self, free: list[int]) -> Job:
        """The queued job that takes a free slot next, taken off the queue: of the oldest
        WINDOW, the one the free slots hold most of (sybil.engine.prompt_cache.next_admission;
        a job passed over max_batch times goes first)."""
        window = list(itertools.islice(self.queue, self.WINDOW))
        i = next_admission([j.prompt for j in window], [j.passed for j in window],
                           lambda p: max(self.engine.reusable(b, p) for b in free), self.max_batch)
        for ahead in window[:i]:
            ahead.passed += 1
        del self.queue[i]
        return window[i]

    def _add(self, slot: int, job: Job) -> None:
        seed = job.seed  # None when sampling: EngineCore.add draws a fresh one
        out = Generation(prompt_ids=job.prompt)
        try:
            job.cached = self.engine.add(slot, out, job.max_tokens, job.params, seed, job.stop_at_eos,
                                         logprobs=job.logprobs, prompt_logprobs=job.prompt_logprobs)
        except Exception as e:  # a bug, not bad input (the HTTP layer checked it): fail this job only
            self._fail(slot, job, e)
            return
        if out.prompt_logprobs is not None:
            job.emit(Event([], prompt_logprobs=out.prompt_logprobs))
        if out.finish_reason:  # scored only: the slot was never taken
            with self.cond:
                self.jobs[slot] = None
            job.emit(Event([], finish_reason=out.finish_reason))

    def _step(self) -> None:
        try:
            results = self.engine.step()
        except Exception as e:  # a bug: fail the rows in flight, keep serving
            for slot, job in enumerate(self.jobs):
                if job is not None:
                    self.engine.remove(slot)
                    self._fail(slot, job, e)
            return
        self.rounds += 1
        for c in results:
            job = self.jobs[c.slot]
            if job is None:
                continue
            job.emit(Event(c.tokens, c.drafted, c.accepted, c.out.finish_reason or None, logprobs=c.logprobs))
            if c.out.finish_reason:
                with self.cond:
                    self.jobs[c.slot] = None

    def _fail(self, slot: int, job: Job, e: Exception) -> None:
        with self.cond:
            self.jobs[slot] = None
        job.emit(Event([], finish_reason="error", error=f"{type(e).__name__}: {e}"))
