"""bench.int_dots: every form the CPU has, with the default the flags choose."""

import re

import pytest

from bench import int_dots
from sybil import native


def test_every_form_is_timed_for_every_format_and_the_default_is_marked(hf_checkpoint, capsys):
    if not native.available():
        pytest.skip(f"CPU kernels unavailable: {native.why_unavailable()}")
    ck = hf_checkpoint("int-dots", n_layer=1, n_head=2, n_embd=64, vocab_size=512, n_positions=300)
    before = native.int_dot()
    assert int_dots.main(["--target", str(ck), "--rounds", "1", "--repeats", "1"]) == 0
    assert native.int_dot() == before  # the benchmark leaves the choice as it found it
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| int[48] \|", line)]
    forms = native.int_dot_choices()
    assert [(r.split("|")[1].strip(), r.split("|")[2].split()[0]) for r in rows] == [
        (m, f) for m in ("int8", "int4") for f in forms]
    assert sum("(default)" in r for r in rows) == 2 and all(before in r for r in rows if "(default)" in r)
    for r in rows:
        step, five, ratio = map(float, re.search(r"\| ([\d.]+) \| ([\d.]+) \(([\d.]+)x\)", r).groups())
        slack = 0.005 + ratio * (0.005 / five + 0.005 / step)  # the printed values are rounded
        assert step > 0 and abs(ratio - five / step) <= slack


def test_a_bad_format_is_one_line(capsys):
    assert int_dots.main(["--quantize", "int2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --quantize")
