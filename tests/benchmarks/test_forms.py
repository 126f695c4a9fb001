"""bench.forms: every kernel form the CPU has, with the default the flags choose."""

import re

import pytest

from bench import forms
from sybil.ops import native


def test_every_form_is_timed_for_every_format_and_the_default_is_marked(hf_checkpoint, capsys):
    if not native.available():
        pytest.skip(f"CPU kernels unavailable: {native.why_unavailable()}")
    ck = hf_checkpoint("int-dots", n_layer=1, n_head=2, n_embd=64, vocab_size=512, n_positions=300)
    before = native.int_dot(), native.float_wide()
    assert forms.main(["--target", str(ck), "--rounds", "1", "--repeats", "1"]) == 0
    assert (native.int_dot(), native.float_wide()) == before  # the benchmark leaves the choices as it found them
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| (int[48]|none) \|", line)]
    modes = ("none", "int8", "int4")
    assert [(r.split("|")[1].strip(), r.split("|")[2].split()[0]) for r in rows] == [
        (m, f) for m in modes for f in forms.forms(m)]
    defaults = [r.split("|")[2].split()[0] for r in rows if "(default)" in r]
    assert defaults == [("wide" if before[1] else "narrow"), before[0], before[0]]
    for r in rows:
        step, five, ratio = map(float, re.search(r"\| ([\d.]+) \| ([\d.]+) \(([\d.]+)x\)", r).groups())
        slack = 0.005 + ratio * (0.005 / five + 0.005 / step)  # the printed values are rounded
        assert step > 0 and abs(ratio - five / step) <= slack


def test_a_bad_format_is_one_line(capsys):
    assert forms.main(["--quantize", "int2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --quantize")
