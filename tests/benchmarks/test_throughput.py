"""Smoke test of python -m bench.throughput on tiny random models: its outputs are
complete, self-consistent, and mark simulated rows as simulated."""

import json

import pytest

from bench import throughput
from bench.throughput import alpha_from_mean, leviathan_speedup
from sybil.spec.controller import expected_tokens


@pytest.fixture(scope="module")
def tiny_pair(hf_checkpoint):
    cfg = dict(n_layer=2, n_head=4, n_embd=64, n_positions=256)
    return hf_checkpoint("bench-target", seed=0, **cfg), hf_checkpoint("bench-draft", seed=1, **{**cfg, "n_layer": 1})


def test_quick_run_writes_a_complete_consistent_record(tiny_pair, tmp_path, capsys):
    target, draft = tiny_pair
    out = tmp_path / "bench.json"
    code = throughput.main(
        ["--target", str(target), "--draft", str(draft), "--quick", "--k", "1,4,auto", "--simulate-acceptance", "0.8",
         "--json", str(out)]
    )
    assert code == 0
    captured = capsys.readouterr()
    table = captured.out
    # each row is reported as it finishes, before the table
    assert "sybil-speculative K=4:" in captured.err and "hf-generate:" in captured.err
    assert "CTranslate2" not in captured.err  # --quick runs no peer: nothing is converted
    assert "SIMULATED" in table and "NOTE" in table
    rec = json.loads(out.read_text())
    assert set(rec) == {"config", "floor", "step_ms", "runs"}
    assert set(rec["step_ms"]["target"]) == {"1", "2", "4", "5", "8"} and "1" in rec["step_ms"]["draft"]
    assert rec["floor"]["read_GBps"] > 0 and rec["floor"]["floor_ms_per_token"] > 0
    runs = {(r["name"], r["k"]): r for r in rec["runs"]}
    base = runs[("sybil-autoregressive", None)]
    assert base["speedup"] == pytest.approx(1.0) and not base["simulated"]
    spec = [r for r in rec["runs"] if r["name"] == "sybil-speculative"]
    assert [r["k"] for r in spec] == [1, 4, "auto"]
    for r in spec:
        assert r["simulated"] is True
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / base["tokens_per_s"])
        assert r["decode_speedup"] == pytest.approx(r["decode_tokens_per_s"] / base["decode_tokens_per_s"])
    # decoding leaves out each prompt's prefill and first round, so it runs faster than end to end
    assert base["decode_tokens_per_s"] > base["tokens_per_s"]
    # Acceptance is drawn at 0.8 per token, so the measured rate is near it (K=1: one draw a round).
    assert 0.55 <= runs[("sybil-speculative", 1)]["acceptance_rate"] <= 0.95
    assert {"hf-generate", "hf-assisted"} <= {r["name"] for r in rec["runs"]}
    assert runs[("hf-assisted", "hf")]["note"] == "skipped (--quick)"
    assert rec["config"]["draft_vocab"] == 8192 and rec["config"]["max_new_tokens"] == 32  # what pays, by default


def test_leviathan_formula():
    # alpha 0.8, k 4, free draft, verify as cheap as a step: E = (1 - 0.8^5) / 0.2
    assert leviathan_speedup(0.8, 4, 0.0, 1.0) == pytest.approx((1 - 0.8**5) / 0.2)
    assert leviathan_speedup(0.0, 3, 0.5, 1.0) == pytest.approx(1 / 2.5)


def test_alpha_from_mean_inverts_the_expectation():
    for alpha in (0.0, 0.3, 0.8, 0.99):
        assert alpha_from_mean(expected_tokens(alpha, 4), 4) == pytest.approx(alpha, abs=1e-6)


def test_bad_arguments_exit_2(capsys):
    assert throughput.main(["--k", "0", "--weights", "random"]) == 2
    assert "comma-separated" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        throughput.main(["--weights", "fake"])
    assert e.value.code == 2


def test_missing_real_weights_suggest_random(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sybil.weights.loader.default_weights_dir", lambda: tmp_path)
    assert throughput.main(["--target", "gpt2-xl", "--quick"]) == 2
    assert "--weights random" in capsys.readouterr().err


@pytest.mark.parametrize("mode, share", [("int8", 0.4), ("int4", 0.35)])
def test_quantized_run_records_its_precision_and_a_peer_row_or_why_not(tiny_pair, tmp_path, capsys, mode, share):
    target, draft = tiny_pair
    out = tmp_path / "bench.json"
    code = throughput.main(
        ["--target", str(target), "--draft", str(draft), "--quick", "--simulate-acceptance", "0.8", "--k", "1",
         "--quantize", mode, "--draft-quantize", mode, "--draft-vocab", "1000", "--json", str(out)]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert f"({mode} weights)" in table and "ids < 1000" in table
    rec = json.loads(out.read_text())
    assert rec["config"]["quantize"] == mode and rec["config"]["draft_quantize"] == mode
    runs = {r["name"]: r for r in rec["runs"]}
    assert runs["hf-generate"]["note"] == f"n/a for {mode}"  # transformers has no matching path
    ct2 = runs["ct2-generate"]
    assert (ct2["tokens_per_s"] or 0) > 0 or ct2["note"]  # measured, or it says why not
    assert runs["llamacpp-bench"]["note"] == "skipped (--quick)"
    # quantized weights are counted at their bytes (int4's head stays int8), not four per weight
    import sybil

    assert rec["floor"]["weight_bytes"] < share * throughput.weight_bytes(sybil.load_model(target))


def test_simulated_acceptance_stays_true(tiny_pair):
    """The rate a SimulatedDrafter deals is the rate asked for, not one sigma away."""
    import sybil
    from bench.workload import SimulatedDrafter

    target, draft = tiny_pair
    t = sybil.load_model(target)
    prompt = list(range(5, 15))
    plain = sybil.generate(t, prompt, 150, stop_at_eos=False).tokens
    for acceptance in (0.8, 0.5):
        sd = SimulatedDrafter(sybil.load_model(draft), 200, [prompt + plain], acceptance, seed=0)
        out = sybil.generate(t, prompt, 150, draft=sd, k=1, stop_at_eos=False)
        assert out.tokens == plain
        assert abs(out.stats["acceptance_rate"] - acceptance) <= 0.03


def test_rows_take_turns_in_every_repeat():
    """Drift on a shared machine must fall on every row alike: each repeat runs each
    row once, in the same order, and each row's time is its own median."""
    ran, clock = [], iter(range(100))

    def runner(name, cost):
        def once():
            ran.append(name)
            for _ in range(cost):
                next(clock)
            return name
        return once

    real = throughput.time.perf_counter
    throughput.time.perf_counter = lambda: float(next(clock))
    try:
        res = throughput.interleaved({"plain": runner("plain", 4), 2: runner(2, 1)}, repeats=3)
    finally:
        throughput.time.perf_counter = real
    assert ran == ["plain", 2] * 3
    assert res["plain"] == (5.0, ["plain"] * 3) and res[2] == (2.0, [2] * 3)


def test_k_list_takes_integers_and_both_autos():
    assert throughput.parse_ks("2, auto,auto-shared") == [2, "auto", "auto-shared"]
    with pytest.raises(throughput.SybilError):
        throughput.parse_ks("2,auto-warm")
