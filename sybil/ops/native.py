"""Building and loading Sybil's C++ CPU kernels (sybil/ops/csrc/kernels.cpp).

The kernels are compiled once per machine with the system C++ compiler against
the installed torch, cached under ~/.cache/sybil (or $SYBIL_CACHE), and loaded
as torch custom ops (torch.ops.sybil.linear, torch.ops.sybil.attend). No ninja,
no pybind, no Python headers: a plain `g++ -shared` of one file.

They need AVX2 and FMA, read from the CPU's flags, never assumed. Where those,
or a compiler, are missing, `available()` is False with the reason, and
sybil.ops.dispatch falls back to torch's own ops (still exact, slower).

The integer linears' dot products (csrc/int_linear.h) use VNNI's vpdpbusd on ymm
where the flags show AVX512-VNNI with VL or AVX-VNNI, else AVX2; every form gives the
same integers, so the same bits. SYBIL_INT_DOT=avx2|avxvnni|avx512vnni forces one (for
comparisons), and only one the CPU has.

The float linear takes 32 registers (csrc/float_linear.h) where the flags show
AVX512F and AVX512VL (SYBIL_FLOAT_WIDE=0 turns that off): the same instructions and
the same bits, with more weight rows per pass.

Their parallel regions run on Sybil's own thread pool (csrc/pool.h says why), of
`threads()` threads: SYBIL_THREADS, else torch's count (which follows
OMP_NUM_THREADS and the CPUs this process may use). Once they load, torch's own
intra-op pool is set to one thread (see _load); set_threads(n) sizes Sybil's.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from sybil.errors import SybilError

REQUIRED_FLAGS = ("avx2", "fma", "f16c")
SOURCES = ("kernels.cpp", "float_linear.h", "pool.h", "simd.h", "int_linear.h", "elementwise.h", "attention.h")  # what the build reads: all of it keys the cached library


INT_DOTS = {"avx2": ((), 0), "avxvnni": (("avx_vnni",), 1), "avx512vnni": (("avx512_vnni", "avx512vl"), 2)}


def int_dot_choices() -> list[str]:
    """The integer dot products this CPU can run, best last (from its flags)."""
    flags = cpu_flags()
    return [name for name, (need, _) in INT_DOTS.items() if all(f in flags for f in need)]


def int_dot() -> str:
    """The integer dot products to use: SYBIL_INT_DOT if set (and supported), else VNNI
    where the flags allow: a multi-token integer forward is bound by instructions per
    block, and vpdpbusd does in one what AVX2 does in two. AVX512-VNNI first: it broadcasts x's four bytes inside vpdpbusd, where AVX-VNNI
    (VEX) needs a broadcast of its own."""
    choices = int_dot_choices()
    env = os.environ.get("SYBIL_INT_DOT")
    if env is not None:
        if env not in INT_DOTS or env not in choices:
            raise SybilError(f"SYBIL_INT_DOT={env!r}: this CPU can run {', '.join(choices)}")
        return env
    return next(d for d in ("avx512vnni", "avxvnni", "avx2") if d in choices)


def set_int_dot(name: str) -> str:
    """Switch the loaded kernels' integer dot products (tests and benchmarks compare them)."""
    if name not in int_dot_choices():
        raise SybilError(f"integer dot {name!r}: this CPU can run {', '.join(int_dot_choices())}")
    if available():
        torch.ops.sybil.set_int_dot(INT_DOTS[name][1])
    os.environ["SYBIL_INT_DOT"] = name
    return name


WIDE_FLAGS = ("avx512f", "avx512vl")  # 32 ymm registers for the float linear (csrc/float_linear.h)


def can_float_wide() -> bool:
    """Whether the flags show what the wide float linear needs."""
    return all(f in cpu_flags() for f in WIDE_FLAGS)


def float_wide() -> bool:
    """Whether the float linear uses 32 registers: where the flags show AVX512F and
    AVX512VL, unless SYBIL_FLOAT_WIDE=0 (the same bits either way)."""
    return os.environ.get("SYBIL_FLOAT_WIDE") != "0" and can_float_wide()


def set_float_wide(on: bool) -> bool:
    """Switch the loaded kernels' float linear form (tests and benchmarks compare them)."""
    if on and not can_float_wide():
        raise SybilError(f"the wide float linear needs {' and '.join(WIDE_FLAGS)}, which this CPU lacks")
    os.environ["SYBIL_FLOAT_WIDE"] = "1" if on else "0"
    if available():
        torch.ops.sybil.set_float_wide(on)
    return on


def threads() -> int:
    """The kernels' thread count: SYBIL_THREADS if set, else torch's."""
    env = os.environ.get("SYBIL_THREADS")
    if env is not None:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise SybilError(f"SYBIL_THREADS must be a positive integer, got {env!r}")
        return n
    return _torch_default_threads()


@lru_cache(maxsize=1)
def _torch_default_threads() -> int:
    """torch's count as it was before the kernels loaded (they set torch's to 1)."""
    return torch.get_num_threads()


def set_threads(n: int) -> None:
    """Use n threads for Sybil's kernels (--threads); torch's ops get n too until the
    kernels load (and wherever they cannot)."""
    if n < 1:
        raise SybilError(f"--threads must be at least 1, got {n}")
    os.environ["SYBIL_THREADS"] = str(n)
    loaded = _load.cache_info().currsize and available()
    if loaded:
        torch.ops.sybil.set_threads(n)
    if not loaded or os.environ.get("SYBIL_POOL") == "openmp":
        torch.set_num_threads(n)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def _cache_dir() -> Path:
    return Path(os.environ.get("SYBIL_CACHE", Path.home() / ".cache" / "sybil"))


def _build(src: Path, out: Path) -> None:
    torch_dir = Path(torch.__file__).parent
    inc = torch_dir / "include"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [
        cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx2", "-mfma", "-mf16c",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DNDEBUG",
        f"-I{inc}", f"-I{inc / 'torch' / 'csrc' / 'api' / 'include'}",
        str(src), f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", "-ltorch",
        f"-Wl,-rpath,{torch_dir / 'lib'}", "-o",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: a half-written library is never loaded,
    # and two processes building at once both end with a whole file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cmd, tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"{cmd[0]} exited with {proc.returncode}"])[-1]
            raise RuntimeError(f"compiling {src.name} failed: {last}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(frozen=True)
class Status:
    reason: str | None  # None once the ops are loaded, else why they are not
    build_s: float = 0.0  # seconds this process spent compiling them (0: they were cached)


@lru_cache(maxsize=None)
def _load() -> Status:
    if os.environ.get("SYBIL_NATIVE", "1") == "0":
        return Status("disabled by SYBIL_NATIVE=0")
    dot = int_dot()  # a bad SYBIL_INT_DOT is an error even where the kernels cannot load
    missing = [f for f in REQUIRED_FLAGS if f not in cpu_flags()]
    if missing:
        return Status(f"this CPU lacks {', '.join(missing)}")
    src = resources.files("sybil.ops").joinpath("csrc/kernels.cpp")
    code = b"".join(resources.files("sybil.ops").joinpath(f"csrc/{f}").read_bytes() for f in SOURCES)
    key = hashlib.sha256(code + torch.__version__.encode() + sys.version.encode()).hexdigest()[:16]
    lib = _cache_dir() / f"sybil_kernels_{key}.so"
    build_s = 0.0
    if not lib.is_file():
        print("sybil: compiling the CPU kernels once for this machine (15 to 30 s)", file=sys.stderr)
        t = time.perf_counter()
        try:
            with resources.as_file(src) as path:
                _build(Path(path), lib)
        except (RuntimeError, OSError) as e:
            return Status(str(e))
        build_s = time.perf_counter() - t
        print(f"sybil: kernels built in {build_s:.0f} s ({lib})", file=sys.stderr)
    torch.ops.load_library(str(lib))
    torch.ops.sybil.set_int_dot(INT_DOTS[dot][1])
    torch.ops.sybil.set_float_wide(float_wide())
    n = threads()
    torch.ops.sybil.set_threads(n)
    if os.environ.get("SYBIL_POOL") != "openmp":
        # Every matmul and attention now runs on Sybil's pool; torch's own OpenMP
        # workers would only serve the few large elementwise ops of a step (a copy
        # of the logits, an argmax) and then spin, competing with the pool's helper
        # for its core: int8 gpt2-medium decoded at 0.75x with them (same process A/B).
        torch.set_num_threads(1)
    return Status(None, build_s)


def available() -> bool:
    return _load().reason is None


def why_unavailable() -> str | None:
    return _load().reason


def build_seconds() -> float:
    """Seconds this process spent compiling the kernels (0 when they came from the cache);
    loading them is the first thing a CPU generation does, outside its timings."""
    return _load().build_s
