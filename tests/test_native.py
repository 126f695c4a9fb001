"""sybil.native: the kernels build where they can, and say why not where they cannot."""

import os
import subprocess
import sys

import pytest

from sybil import native

PROBE = (
    "import sys, torch, sybil;"
    "from sybil import native;"
    "m = sybil.load_model(sys.argv[1]);"
    "print(native.why_unavailable());"
    "print(sybil.generate(m, [1, 2, 3], 4, stop_at_eos=False).tokens)"
)


def _probe(path, **env):
    return subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True,
                          env={**os.environ, **env})


def test_the_cpu_flags_are_read_not_assumed():
    flags = native.cpu_flags()
    assert isinstance(flags, set)
    assert native.available() == (all(f in flags for f in native.REQUIRED_FLAGS) and native.why_unavailable() is None)


def test_turned_off_it_says_why_once_and_still_decodes(hf_checkpoint):
    r = _probe(hf_checkpoint("small"), SYBIL_NATIVE="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "disabled by SYBIL_NATIVE=0"
    assert r.stderr.count("CPU kernels unavailable") == 1


def test_a_failed_build_is_a_reason_not_a_crash(hf_checkpoint, tmp_path):
    if not all(f in native.cpu_flags() for f in native.REQUIRED_FLAGS):
        pytest.skip("this CPU never builds the kernels")
    r = _probe(hf_checkpoint("small"), SYBIL_CACHE=str(tmp_path), CXX="/bin/false")
    assert r.returncode == 0, r.stderr
    assert "failed" in r.stdout.splitlines()[0]
    assert not list(tmp_path.glob("*.so"))  # no half-written library is left to load later
