"""The server's scheduler: continuous batching over engine.Batch, with each job's
output exactly its solo run, bounded admission, cancellation and shutdown."""

import threading

import pytest
import torch
from conftest import noisy_copy

import sybil
from sybil.sample.params import SamplingParams
from sybil.serve.scheduler import Job, QueueFull, Scheduler, ShuttingDown

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    target = sybil.load_model(hf_checkpoint("small"))
    return target, noisy_copy(target, 0.02, seed=0)


class Sink:
    """Collects a job's events (on the scheduler thread) and signals its end."""

    def __init__(self) -> None:
        self.events, self.done = [], threading.Event()

    def __call__(self, ev) -> None:
        self.events.append(ev)
        if ev.finish_reason:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [t for ev in self.events for t in ev.tokens]

    @property
    def finish(self) -> str | None:
        return self.events[-1].finish_reason if self.events else None


def _job(prompt, max_tokens, params=SamplingParams(), seed=None, stop_at_eos=False):
    sink = Sink()
    return Job(prompt, max_tokens, params, seed, stop_at_eos, sink), sink


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50257, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("draft", [None, "noisy", "ngram"])
def test_twelve_concurrent_jobs_each_equal_their_solo_run(models, draft):
    target, noisy = models
    draft = noisy if draft == "noisy" else draft
    s = Scheduler(target, draft, k=3, max_batch=4, max_queue=16)
    s.start()
    specs = []
    for i, p in enumerate(_prompts(12)):
        params = SamplingParams(0.8, top_k=40, top_p=0.95) if i % 3 == 0 else SamplingParams()
        specs.append((p, 4 + 5 * (i % 5), params, 1000 + i))
    jobs = [_job(p, m, sp, seed) for p, m, sp, seed in specs]
    for j, _ in jobs[:5]:
        s.submit([j])  # some now, the rest while those run: they join at round boundaries
    s.submit([j for j, _ in jobs[5:]])
    for _, sink in jobs:
        assert sink.done.wait(60)
    s.stop()
    for (p, m, sp, seed), (_, sink) in zip(specs, jobs):
        solo = sybil.generate(target, p, m, temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                              seed=seed, draft=draft, k=3, stop_at_eos=False)
        assert sink.tokens == solo.tokens
        assert sink.finish == "length"
    if draft is not None:
        assert sum(ev.drafted for _, sink in jobs for ev in sink.events) > 0


def test_admission_is_bounded_and_all_or_nothing(models):
    target, _ = models
    s = Scheduler(target, max_batch=2, max_queue=3)  # not started: nothing leaves the queue
    s.submit([_job([1, 2], 4)[0] for _ in range(4)])
    with pytest.raises(QueueFull, match="busy"):
        s.submit([_job([1, 2], 4)[0] for _ in range(2)])  # 6 > 2 + 3: neither is queued
    assert s.queued == 4
    s.submit([_job([1, 2], 4)[0]])
    assert s.queued == 5


def test_a_cancelled_job_leaves_and_its_slot_serves_the_next(models):
    target, _ = models
    s = Scheduler(target, max_batch=1, max_queue=1)
    s.start()
    long, long_sink = _job([5, 6, 7], 200)
    first = threading.Event()
    orig = long.emit
    long.emit = lambda ev: (orig(ev), first.set())
    s.submit([long])
    assert first.wait(30)
    s.cancel(long)
    assert long_sink.done.wait(30) and long_sink.finish == "cancelled"
    assert len(long_sink.tokens) < 200
    nxt, sink = _job([8, 9], 12)
    s.submit([nxt])
    assert sink.done.wait(30)
    assert sink.tokens == sybil.generate(target, [8, 9], 12, stop_at_eos=False).tokens
    assert s.running == 0
    s.stop()


def test_a_waiting_job_whose_prompt_the_free_slot_holds_goes_before_an_older_one(models):
    """First come, first served would overwrite the one free slot's prompt with the older
    job's and prefill the younger's from scratch; both outputs stay their solo runs."""
    target, _ = models
    s = Scheduler(target, max_batch=1, max_queue=4)
    s.start()
    held, other = [11, 12, 13, 14, 15, 16], [21, 22, 23, 24]
    first, sink = _job(held, 3)
    s.submit([first])
    assert sink.done.wait(30)
    (older, older_sink), (younger, younger_sink) = _job(other, 5), _job(held + [17], 5)
    s.submit([older, younger])  # both wait for the one slot, which holds `held`
    assert older_sink.done.wait(30) and younger_sink.done.wait(30)
    assert younger.cached == len(held) and older.cached == 0
    assert younger_sink.events[-1].time < older_sink.events[0].time  # it ran first
    assert older.passed == 1
    for job, got in ((older, older_sink), (younger, younger_sink)):
        assert got.tokens == sybil.generate(target, job.prompt, 5, stop_at_eos=False).tokens
    s.stop()


def test_stop_cancels_what_is_left_and_refuses_new_jobs(models):
    target, _ = models
    s = Scheduler(target, max_batch=1, max_queue=4)
    s.start()
    jobs = [_job([3, 4], 250) for _ in range(3)]
    s.submit([j for j, _ in jobs])
    s.stop(grace_s=0.0)
    assert all(sink.done.is_set() for _, sink in jobs)
    assert {sink.finish for _, sink in jobs} <= {"cancelled", "length"}
    assert "cancelled" in {sink.finish for _, sink in jobs}
    with pytest.raises(ShuttingDown):
        s.submit([_job([1], 1)[0]])
    assert not s.thread.is_alive()


def test_auto_k_in_a_running_batch_keeps_greedy_output_exact(models):
    """With k="auto" the window follows timing and the batch, but greedy output never
    depends on it: every job equals the target's plain greedy run."""
    target, noisy = models
    s = Scheduler(target, noisy, k="auto", max_batch=3, max_queue=8)
    s.start()
    prompts = _prompts(7, seed=1)
    jobs = [_job(p, 6 + 4 * i) for i, p in enumerate(prompts)]
    s.submit([j for j, _ in jobs])
    for _, sink in jobs:
        assert sink.done.wait(60)
    s.stop()
    for i, (p, (_, sink)) in enumerate(zip(prompts, jobs)):
        assert sink.tokens == sybil.generate(target, p, 6 + 4 * i, stop_at_eos=False).tokens
