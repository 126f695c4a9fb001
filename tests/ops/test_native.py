"""sybil.ops.native: the kernels build where they can, and say why not where they cannot."""

import os
import subprocess
import sys

import pytest

from sybil.ops import native

PROBE = (
    "import sys, torch, sybil;"
    "from sybil.ops import native;"
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


needs_kernels = pytest.mark.skipif(not native.available(), reason="the kernels do not build on this machine")


@needs_kernels
def test_the_pool_gives_the_same_bits_whatever_the_thread_count():
    """Each chunk is one thread's, summed in a fixed order: 1, 2, 3 or 5 threads (more
    than the cores, so helpers are descheduled mid-job) give identical results."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 1024, generator=g)
    w = torch.randn(3000, 1024, generator=g)
    b = torch.randn(3000, generator=g)
    qkv = torch.randn(2, 5, 3 * 256, generator=g)
    pos = torch.tensor([[10, 11, 12, 13, 14], [3, 4, 5, 6, 7]])
    outs = []
    try:
        for n in (1, 2, 3, 5):
            assert torch.ops.sybil.set_threads(n) == n
            kc, vc = torch.zeros(2, 4, 32, 64), torch.zeros(2, 4, 32, 64)
            runs = [(torch.ops.sybil.linear(x, w, b, None), torch.ops.sybil.attend(qkv, kc, vc, pos, 4))
                    for _ in range(20)]
            outs += runs
    finally:
        torch.ops.sybil.set_threads(native.threads())
    for lin, att in outs[1:]:
        assert torch.equal(lin, outs[0][0]) and torch.equal(att, outs[0][1])
    assert torch.allclose(outs[0][0].double(), x.double() @ w.double().T + b.double(), atol=1e-3)


@needs_kernels
def test_callers_on_several_threads_take_turns_and_get_their_own_results():
    import threading

    import torch

    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(512 + 8 * i, 256, generator=g) for i in range(4)]
    xs = [torch.randn(3, 256, generator=g) for _ in range(4)]
    want = [torch.ops.sybil.linear(x, w, None, None) for x, w in zip(xs, ws)]
    got = [[] for _ in range(4)]

    def call(i):
        for _ in range(50):
            got[i].append(torch.ops.sybil.linear(xs[i], ws[i], None, None))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(torch.equal(r, want[i]) for i in range(4) for r in got[i]) and all(len(r) == 50 for r in got)


def test_sybil_threads_sizes_the_pool_and_a_bad_value_is_one_line(hf_checkpoint):
    probe = ("import torch, sybil; from sybil.ops import native; m = sybil.load_model(__import__('sys').argv[1]);"
             "sybil.generate(m, [1, 2], 2); print(native.threads(), torch.ops.sybil.set_threads(native.threads()),"
             " torch.get_num_threads())")
    r = subprocess.run([sys.executable, "-c", probe, str(hf_checkpoint("small"))], capture_output=True, text=True,
                       env={**os.environ, "SYBIL_THREADS": "3"})
    assert r.returncode == 0, r.stderr
    if native.available():
        assert r.stdout.split() == ["3", "3", "1"]  # torch's own pool steps aside for Sybil's
    bad = subprocess.run([sys.executable, "-m", "sybil.generate", "--model", str(hf_checkpoint("small")),
                          "--prompt", "hi"], capture_output=True, text=True, env={**os.environ, "SYBIL_THREADS": "x"})
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: SYBIL_THREADS")


def test_the_integer_dot_follows_the_flags_and_a_bad_choice_is_one_line(hf_checkpoint, monkeypatch):
    flags = native.cpu_flags()
    choices = native.int_dot_choices()
    assert choices[0] == "avx2"
    assert ("avxvnni" in choices) == ("avx_vnni" in flags)
    assert ("avx512vnni" in choices) == ({"avx512_vnni", "avx512vl"} <= flags)
    monkeypatch.delenv("SYBIL_INT_DOT", raising=False)
    assert native.int_dot() == next(d for d in ("avx512vnni", "avxvnni", "avx2") if d in choices)
    missing = next((d for d in native.INT_DOTS if d not in choices), "nonsense")
    bad = subprocess.run([sys.executable, "-m", "sybil.generate", "--model", str(hf_checkpoint("small")),
                          "--prompt", "hi", "--quantize", "int8"], capture_output=True, text=True,
                         env={**os.environ, "SYBIL_INT_DOT": missing})
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and last.startswith("error: SYBIL_INT_DOT") and "avx2" in last, bad.stderr
