"""The command line: streaming text, --json, --stats, and one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest
from conftest import run_main

from sybil.weights.tokenizer import decode, encode


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sybil.generate", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def small(hf_checkpoint):
    return str(hf_checkpoint("small"))


def test_json_output_and_streamed_text_agree(small):
    common = ["--model", small, "--prompt", "Hello there, Sybil", "--max-new-tokens", "12", "--ignore-eos"]
    j = _run(*common, "--json")
    assert j.returncode == 0, j.stderr
    rec = json.loads(j.stdout)
    assert rec["prompt_ids"] == encode("Hello there, Sybil")
    assert len(rec["tokens"]) == 12 and rec["finish_reason"] == "length"
    assert rec["text"] == decode(rec["tokens"])
    for key in ("prefill_ms", "decode_tokens_per_s", "rounds", "acceptance_rate", "time_verify_s"):
        assert key in rec
    streamed = _run(*common)
    assert streamed.returncode == 0 and streamed.stdout == rec["text"] + "\n"
    assert "length: 12 tokens" in streamed.stderr


def test_speculative_cli_matches_plain_and_prints_stats(small):
    args = ["--model", small, "--prompt-ids", "11,22,33", "--max-new-tokens", "10", "--json", "--ignore-eos"]
    plain = json.loads(_run(*args).stdout)
    r = _run(*args, "--draft", small, "--k", "3", "--stats")
    spec = json.loads(r.stdout)
    assert spec["tokens"] == plain["tokens"]
    assert spec["drafted"] > 0 and "tokens/round" in r.stderr


def test_eos_stops_generation_and_is_reported(eos_checkpoint):
    r = _run("--model", str(eos_checkpoint), "--prompt-ids", "1000,17,1000", "--max-new-tokens", "20", "--json")
    rec = json.loads(r.stdout)
    assert rec["finish_reason"] == "eos" and rec["tokens"][-1] == 50256
    assert "<|endoftext|>" not in rec["text"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt-ids", "1,x"], "comma-separated integers"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["--prompt", "hi", "--draft", "ngram", "--k", "0"], "k must be"),
        (["--prompt", "hi", "--top-p", "1.5"], "top_p"),
        (["--prompt", "hi", "--dtype", "int8"], "unknown dtype"),
        (["--prompt", "hi", "--device", "cuda"], "no CUDA device"),
        (["--prompt", "hi", "--no-such-flag"], "unrecognized arguments"),
        ([], "give a prompt"),
        (["--prompt", "hi", "--logit-bias", "13"], "ID:VALUE"),
        (["--prompt", "hi", "--logit-bias", "50257:1"], "outside the vocabulary"),
        (["--prompt", "hi", "--presence-penalty", "2.5"], "presence_penalty"),
        (["--prompt", "hi", "--logprobs", "3"], "add --json"),
        (["--prompt", "hi", "--logprobs", "21", "--json"], "between 0 and 20"),
        (["--prompt", "hi", "--k", "3"], "needs --draft"),
        (["--prompt", "hi", "--draft-vocab", "100"], "needs --draft"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(small, args, message, capsys):
    from sybil.cli.generate import main

    code, lines = run_main(main, ["--model", small, *args], capsys)
    err = [line for line in lines if not line.startswith("sybil: dtype")]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_bad_input_from_a_real_process(small):
    r = _run("--model", small, "--prompt", "hi", "--max-new-tokens", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == "error: max_new_tokens must be at least 1, got 0"


def test_missing_preset_offline_says_where_to_put_files(tmp_path):
    r = _run("--model", "distilgpt2", "--prompt", "hi", env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "put config.json and model.safetensors in" in r.stderr.splitlines()[-1]


def test_sybil_generate_stays_callable_after_importing_the_cli_module(hf_checkpoint):
    import sybil
    import sybil.cli.generate  # the CLI lives apart from the function: importing it rebinds nothing

    model = sybil.load_model(hf_checkpoint("small"))
    assert sybil.generate(model, [1, 2, 3], 3).tokens == sybil.engine.generate.generate(model, [1, 2, 3], 3).tokens


def test_batch_from_a_prompts_file_prints_one_json_line_per_prompt_in_order(small, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text('The first prompt\n{"prompt_ids": [5, 6, 7]}\n\n{"prompt": ""}\nA third, longer, prompt: with more words\n')
    r = _run("--model", small, "--prompts-file", str(f), "--max-new-tokens", "6", "--json", "--ignore-eos")
    assert r.returncode == 2  # one prompt was bad; the others still ran
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["prompt_ids"] for rec in recs] == [encode("The first prompt"), [5, 6, 7], [], encode("A third, longer, prompt: with more words")]
    assert recs[2]["finish_reason"] == "error" and "empty" in recs[2]["error"]
    solo = json.loads(_run("--model", small, "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--json", "--ignore-eos").stdout)
    assert recs[1]["tokens"] == solo["tokens"]
    assert all(len(rec["tokens"]) == 6 for i, rec in enumerate(recs) if i != 2)


def test_repeated_prompt_flags_make_a_batch(small):
    r = _run("--model", small, "--prompt", "one", "--prompt", "two words", "--max-new-tokens", "3", "--ignore-eos")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[0] ") and lines[1].startswith("[1] ")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_cli_equals_the_api_and_a_cheap_draft_keeps_it(small, mode):
    import sybil

    args = ["--model", small, "--prompt-ids", "11,22,33", "--max-new-tokens", "10", "--json", "--ignore-eos"]
    r = _run(*args, "--quantize", mode)
    assert r.returncode == 0, r.stderr
    want = sybil.generate(sybil.load_model(small, quantize=mode), [11, 22, 33], 10, stop_at_eos=False).tokens
    assert json.loads(r.stdout)["tokens"] == want
    # a quantized draft (auto: int4) with a reduced head proposes; the target decides
    spec = _run(*args, "--quantize", mode, "--draft", small, "--draft-quantize", "auto", "--draft-vocab", "500")
    assert spec.returncode == 0, spec.stderr
    assert json.loads(spec.stdout)["tokens"] == want


def test_a_width_the_integer_formats_cannot_hold_is_a_one_line_error(hf_checkpoint):
    odd = str(hf_checkpoint("width-48", n_layer=1, n_head=4, n_embd=48, n_positions=64))
    r = _run("--model", odd, "--prompt", "hi", "--quantize", "int4")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "int8wo" in errors[0] and "Traceback" not in r.stderr
    ok = _run("--model", odd, "--prompt-ids", "1,2", "--max-new-tokens", "3", "--quantize", "int8wo", "--json")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quantize", "int2"], "invalid choice"),
        (["--draft", "ngram", "--draft-vocab", "100"], "model draft"),
        (["--draft", "SMALL", "--draft-vocab", "0"], "between 1 and"),
    ],
)
def test_bad_quantize_and_draft_vocab_are_one_line_errors(small, args, message, capsys):
    from sybil.cli.generate import main

    code, err = run_main(main, ["--model", small, "--prompt", "hi", *[small if a == "SMALL" else a for a in args]],
                         capsys)
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0]


def test_cli_logprobs_and_adjustments_are_the_apis(small):
    import torch

    import sybil

    r = _run("--model", small, "--prompt", "Hello there", "--max-new-tokens", "6", "--json", "--logprobs", "2",
             "--logit-bias", "13:4", "--logit-bias", "11:-100", "--frequency-penalty", "1.5", "--ignore-eos",
             "--draft", "ngram", "--k", "3", "--dtype", "float32")  # auto is bfloat16 where the CPU has it
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    out = sybil.generate(sybil.load_model(small, torch.float32), encode("Hello there"), 6, logprobs=2,
                         logit_bias={13: 4, 11: -100}, frequency_penalty=1.5, stop_at_eos=False)
    assert rec["tokens"] == out.tokens and 11 not in out.tokens
    assert rec["logprobs"] == [{"token": e.token, "logprob": e.logprob, "top": [list(t) for t in e.top]}
                               for e in out.logprobs]


def test_a_first_run_reports_the_kernel_build_apart_from_the_first_token(small, tmp_path):
    import os

    from sybil.ops import native

    if not all(f in native.cpu_flags() for f in native.REQUIRED_FLAGS):
        pytest.skip("this CPU never builds the kernels")
    r = _run("--model", small, "--prompt", "Hi", "--max-new-tokens", "3", "--json",
             env={**os.environ, "SYBIL_CACHE": str(tmp_path)})  # an empty cache: the kernels compile now
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["kernel_build_s"] > 1
    assert rec["prefill_ms"] < 1000 * rec["kernel_build_s"] / 4  # the first token does not count the build
    streamed = _run("--model", small, "--prompt", "Hi", "--max-new-tokens", "3",
                    env={**os.environ, "SYBIL_CACHE": str(tmp_path)})
    assert "compiled" not in streamed.stderr  # built once, then cached
