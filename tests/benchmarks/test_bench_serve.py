"""python -m bench.serve on tiny random models: a complete record, tokens that add up,
simulated rows marked as such, and one-line errors."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, run_main

from bench.serve import percentile


@pytest.fixture(scope="module")
def tiny(hf_checkpoint):
    cfg = dict(n_layer=2, n_head=4, n_embd=64, n_positions=256)
    return hf_checkpoint("bench-target", seed=0, **cfg), hf_checkpoint("bench-draft", seed=1, **{**cfg, "n_layer": 1})


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.serve", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_a_small_run_reports_every_level_with_and_without_the_draft(tiny, tmp_path):
    target, draft = tiny
    out = tmp_path / "serve.json"
    r = _bench("--target", str(target), "--draft", str(draft), "--concurrency", "1,3", "--max-tokens", "6",
               "--requests-per-client", "2", "--prompts", "4", "--max-batch", "4", "--k", "2", "--repeat", "2", "--json", str(out),
               "--round-log", str(tmp_path / "rounds"))
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(out.read_text())
    rows = rec["rows"]
    for setup, mine in (("none", rows[:2]), ("draft", rows[2:])):  # each server's rounds: its rows' tokens + a warm-up's 4
        log = [json.loads(line) for line in (tmp_path / "rounds" / f"{setup}.jsonl").read_text().splitlines()]
        assert sum(r["committed"] for r in log) == sum(row["tokens"] for row in mine) + 4
        assert any(r["drafted"] for r in log) == (setup == "draft")
    assert [(row["concurrency"], "SIMULATED" in row["draft"]) for row in rows] == [
        (1, False), (3, False), (1, True), (3, True)]
    for row in rows:
        assert row["runs"] == 2 and row["requests"] == 2 * 2 * row["concurrency"]  # two runs pooled
        assert row["tokens"] == 6 * row["requests"]  # greedy, <|endoftext|> ignored: every request runs to max_tokens
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["wall_s"])
        assert row["ttft_ms_p50"] <= row["ttft_ms_p99"] and row["itl_ms_p50"] <= row["itl_ms_p99"]
        assert (row["acceptance"] is None) == ("SIMULATED" not in row["draft"])
    assert rows[1]["vs_concurrency_1"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert sum("SIMULATED" in line for line in table) == 2  # the table marks the simulated rows too
    assert "simulated" in rec["note"]


@pytest.mark.parametrize("args, message", [
    (["--concurrency", "1,x"], "--concurrency"),
    (["--concurrency", "0"], "at least 1"),
    (["--repeat", "0"], "at least 1"),
    (["--simulate-acceptance", "1.5"], "between 0 and 1"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    from bench.serve import main

    code, err = run_main(main, args, capsys)
    assert code == 2 and len(err) == 1 and message in err[0]


def test_a_bad_argument_from_a_real_process():
    r = _bench("--concurrency", "0")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "at least 1" in r.stderr


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(map(float, range(101))), 99) == 99.0


def test_the_mixed_workload_is_seeded_and_holds_every_kind_of_request():
    from itertools import islice

    from bench import mixed

    a = list(islice(mixed.requests(7, context=256), 300))
    b = list(islice(mixed.requests(7, context=256), 300))
    assert [(r.prompt, r.max_tokens, r.kind) for r in a] == [(r.prompt, r.max_tokens, r.kind) for r in b]
    kinds = {k: sum(r.kind == k for r in a) for k in ("ok", "disconnect", "bad")}
    assert all(kinds.values()) and kinds["ok"] > 0.8 * len(a)
    good = [r for r in a if r.kind != "bad"]
    assert all(2 <= len(r.prompt) <= 256 - 129 and 8 <= r.max_tokens <= 128 for r in good)
    assert {r.stream for r in good} == {True, False}
    prompts = [tuple(r.prompt) for r in good]
    assert len(set(prompts)) < len(prompts)  # exact repeats
    heads = [p[:50] for p in prompts if len(p) > 60]
    assert len(set(heads)) < len(heads)  # shared prefixes


def test_a_mixed_run_finds_nothing_wrong_and_every_checked_answer_equals_its_solo_run(tiny, tmp_path):
    target, _ = tiny
    out = tmp_path / "mixed.json"
    r = _bench("--target", str(target), "--draft", "suffix", "--workload", "mixed", "--concurrency", "3",
               "--requests-per-client", "5", "--max-batch", "3", "--compare-chunking", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["draft"].split(" ")[0] for row in rows] == ["none", "none,", "suffix"]
    for row in rows:
        assert row["requests"] == 15 and row["problems"] == 0, row["problem_examples"]
        assert row["solo_checked"] > 0 and row["solo_mismatches"] == 0, row["mismatch_examples"]
        assert row["running_after"] == row["queued_after"] == 0
    assert "SIMULATED" not in rows[2]["draft"] and rows[2]["acceptance"] is not None  # suffix acceptance is real


def test_the_cache_workload_gives_the_same_answers_with_and_without_the_cache_and_a_suffix_draft(tiny, tmp_path):
    target, _ = tiny
    out = tmp_path / "cache.json"
    r = _bench("--target", str(target), "--draft", "suffix", "--workload", "cache", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    rec = json.loads(out.read_text())
    assert rec["identical_answers"]
    cached, uncached, suffix = rec["rows"]
    assert uncached["setup"] == "no prompt cache" and suffix["acceptance"] > 0.5  # the repeat is drafted from the first
    assert suffix["repeat_ids"][0] == suffix["repeat_ids"][1]
    assert "lm-eval requests with the cache" in r.stdout
