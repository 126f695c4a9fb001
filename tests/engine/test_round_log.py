"""sybil.engine.round_log: one line per round of the engine, whose counts add up to what the rows
committed, and `python -m sybil.serve --round-log` writing it."""

import json

import pytest
import torch
from conftest import Server, run_main

import sybil
from sybil.engine.core import EngineCore
from sybil.engine.generate import make_drafter
from sybil.engine.round_log import RoundLog
from sybil.engine.sequence import Generation
from sybil.sample.params import SamplingParams

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def models(hf_checkpoint, noisy_checkpoint):
    return sybil.load_model(hf_checkpoint("small")), sybil.load_model(noisy_checkpoint)


@pytest.mark.parametrize("chunk", [None, 4])
def test_each_round_is_one_record_whose_counts_add_up(models, tmp_path, chunk):
    target, draft = models
    batch = EngineCore(target, 2, 128, make_drafter(draft, target, SamplingParams(), 128, 2, False), k=3,
                  prefill_chunk=chunk)
    path = tmp_path / "rounds.jsonl"
    log = RoundLog(path)
    batch.on_round = log
    outs = [Generation(prompt_ids=p) for p in ([5, 6, 7, 8, 9, 10, 11], [40, 41])]
    batch.add(0, outs[0], 12, SamplingParams(), None, stop_at_eos=False)
    steps = 0
    while batch.active or steps < 2:
        if steps == 2:  # a second row joins mid-run (and is fed in chunks when chunk is set)
            batch.add(1, outs[1], 9, SamplingParams(), None, stop_at_eos=False)
        batch.step()
        steps += 1
    log.close()
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["round"] for r in recs] == list(range(1, steps + 1))
    assert sum(r["committed"] for r in recs) == sum(len(o.tokens) for o in outs) == 12 + 9
    # chunked: every prompt token but the last (fed with the row's first decode) in the rounds' chunks
    assert sum(r["prefill_tokens"] for r in recs) == (sum(len(o.prompt_ids) - 1 for o in outs) if chunk else 0)
    for r in recs:
        assert r["rows"] == len(r["windows"]) and all(0 <= w <= 3 for w in r["windows"])
        assert 0 <= r["accepted"] <= r["drafted"] <= sum(r["windows"])
        assert r["tokens"] == r["rows"] + r["drafted"] + r["prefill_tokens"]
        assert r["committed"] <= r["accepted"] + r["rows"]  # each row: its accepted drafts + 1, cut by its limit
        assert r["verify_ms"] > 0 and r["draft_ms"] >= r["catchup_ms"] >= 0
    assert any(r["drafted"] for r in recs) and [r["t_s"] for r in recs] == sorted(r["t_s"] for r in recs)


def test_the_server_writes_a_round_log_that_adds_up_to_its_completions(hf_checkpoint, noisy_checkpoint, tmp_path):
    import httpx

    path = tmp_path / "rounds.jsonl"
    srv = Server(tmp_path, "--model", str(hf_checkpoint("small")), "--draft", str(noisy_checkpoint),
                 "--draft-quantize", "none", "--round-log", str(path))
    try:
        body = {"model": str(hf_checkpoint("small")), "prompt": [[1, 2, 3], [7, 8]], "max_tokens": 10,
                "temperature": 0}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200
        completion = r.json()["usage"]["completion_tokens"]
    finally:
        assert srv.stop() == 0
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert recs and sum(r["committed"] for r in recs) == completion


def test_an_unwritable_round_log_is_a_one_line_error(tmp_path, capsys):
    from sybil.cli.serve import main

    code, err = run_main(main, ["--port", "0", "--round-log", str(tmp_path / "no" / "such" / "dir" / "log.jsonl")], capsys)
    assert code == 2 and len(err) == 1 and "--round-log" in err[0]


def test_with_k_auto_each_round_carries_the_controllers_price(models, tmp_path):
    """The batch controller's expected seconds for the chosen windows and for a plain
    round of the same rows: equal exactly when no row drafts, higher when one does."""
    target, draft = models
    batch = EngineCore(target, 3, 128, make_drafter(draft, target, SamplingParams(), 128, 3, False), k="auto")
    recs = []
    batch.on_round = lambda rec: recs.append(json.loads(rec.line()))
    for b, p in enumerate(([5, 6, 7], [40, 41, 42, 43], [9])):
        batch.add(b, Generation(prompt_ids=p), 30, SamplingParams(), None, stop_at_eos=False)
    while batch.active:
        batch.step()
    assert recs[0]["predicted_ms"] is None  # the first round measures; nothing is priced yet
    priced = [r for r in recs if r["predicted_ms"] is not None]
    assert len(priced) == len(recs) - 1 and any(sum(r["windows"]) for r in priced)
    for r in priced:
        assert (r["predicted_ms"] == r["plain_predicted_ms"]) == (sum(r["windows"]) == 0)
        assert r["predicted_ms"] >= r["plain_predicted_ms"] > 0
        # each row commits its accepted drafts + 1: exactly the rows' count when none drafts
        assert (r["predicted_tokens"] == r["rows"]) == (sum(r["windows"]) == 0)
        assert r["rows"] <= r["predicted_tokens"] <= r["rows"] + sum(r["windows"])
        assert r["predicted_catchup_ms"] >= 0 and (sum(r["windows"]) or not r["predicted_catchup_ms"])
