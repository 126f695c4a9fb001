"""python -m sybil.perplexity: the strided sliding-window perplexity equals the same
computation with transformers on the same checkpoint; bad input is one line, status 2."""

import json
import math
import subprocess
import sys

import pytest
from conftest import hf_model, hf_sliding, run_main

from sybil.weights.tokenizer import encode

TEXT = ("The river rose through the night, and by morning the lower town was under water. " * 9 +
        "Nobody had expected it; the old maps showed no flood in three hundred years.\n") * 2


def _run(*args):
    return subprocess.run([sys.executable, "-m", "sybil.perplexity", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def small(hf_checkpoint):
    return hf_checkpoint("small")


@pytest.mark.parametrize("context, stride, batch", [(128, 64, "1"), (256, 100, "2")])
def test_perplexity_equals_transformers_sliding_windows(small, tmp_path, context, stride, batch):
    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    r = _run("--model", str(small), "--file", str(f), "--context", str(context), "--stride", str(stride),
             "--batch", batch, "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    ids = encode(TEXT)
    nll, count = hf_sliding(hf_model(small), ids, context, stride)
    assert rec["tokens"] == count == len(ids) - 1
    assert math.isclose(rec["nll"], nll / count, rel_tol=1e-5)
    assert math.isclose(rec["perplexity"], math.exp(nll / count), rel_tol=1e-5)
    assert set(rec) == {"perplexity", "tokens", "nll", "seconds"}


def test_the_plain_line_and_the_default_context(small):
    r = _run("--model", str(small), "--text", TEXT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("perplexity ") and f"over {len(encode(TEXT)) - 1} tokens" in r.stdout
    assert "context 256, stride 128" in r.stdout  # the model's own context, half of it as stride


@pytest.mark.parametrize("args, message", [
    (["--file", "/nonexistent/text.txt"], "cannot read --file"),
    (["--text", ""], "the text is empty"),
    (["--text", "   \n"], "the text is empty"),
    (["--text", "Hi"], "at least 2"),
    (["--text", TEXT, "--context", "64", "--stride", "64"], "below the context"),
    (["--text", TEXT, "--context", "64", "--stride", "100"], "below the context"),
    (["--text", TEXT, "--context", "512"], "longer than the model's context"),
    (["--text", TEXT, "--batch", "0"], "--batch"),
    (["--text", TEXT, "--quantize", "int2"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(small, args, message, capsys):
    from sybil.cli.perplexity import main

    code, lines = run_main(main, ["--model", str(small), *args], capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_a_file_that_is_not_utf8_is_one_line(small, tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\x00bad")
    r = _run("--model", str(small), "--file", str(f))
    assert r.returncode == 2 and "cannot read --file" in r.stderr and "Traceback" not in r.stderr
