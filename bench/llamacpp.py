"""llama.cpp as a peer row of bench.throughput: `llama-bench` on GGUF conversions of
the very weights Sybil runs, at the matching precision.

The binaries come from bench/build_llamacpp.sh (the vendored tree of the
llama-cpp-python source distribution, built once outside the repository), found in
$SYBIL_LLAMACPP/build/bin, ~/.cache/sybil/llama.cpp/build/bin, or on PATH. The
weights go through the tree's own convert_hf_to_gguf.py (float32) and llama-quantize.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.peers import write_hf_tokenizer

# GGUF types run for each Sybil precision: the same bits per weight first.
GGUF_TYPES = {None: ("F32",), "int8": ("Q8_0",), "int8wo": ("Q8_0",), "int4": ("Q4_0", "Q4_K_M")}


def root() -> Path:
    return Path(os.environ.get("SYBIL_LLAMACPP", Path.home() / ".cache" / "sybil" / "llama.cpp"))


def binary(name: str) -> Path | None:
    built = root() / "build" / "bin" / name
    if built.is_file():
        return built
    found = shutil.which(name)
    return Path(found) if found else None


def converter() -> Path | None:
    script = root() / "src" / "convert_hf_to_gguf.py"
    return script if script.is_file() else None


def why_unavailable() -> str | None:
    if binary("llama-bench") is None or binary("llama-quantize") is None:
        return "not built (bench/build_llamacpp.sh, about 10 minutes)"
    if converter() is None:
        return f"no convert_hf_to_gguf.py under {root() / 'src'}"
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the gguf package is missing (bench/build_llamacpp.sh installs it)"
    return None


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise RuntimeError(f"{Path(cmd[0]).name} failed: {last}")
    return proc.stdout


class LlamaCppPeer:
    """GGUF files of one float model, in a temporary folder that lives as long as the peer."""

    def __init__(self, hf_model, quantize: str | None, threads: int) -> None:
        self.threads = threads
        self.types = GGUF_TYPES[quantize]
        self.dir = Path(tempfile.mkdtemp(prefix="sybil-gguf-"))
        hf = self.dir / "hf"
        hf_model.save_pretrained(hf)
        write_hf_tokenizer(hf)
        cfg = json.loads((hf / "config.json").read_text())
        cfg["n_ctx"] = cfg["n_positions"]  # the converter reads GPT-2's old key
        (hf / "config.json").write_text(json.dumps(cfg))
        f32 = self.dir / "F32.gguf"
        _run([sys.executable, str(converter()), str(hf), "--outtype", "f32", "--outfile", str(f32)])
        shutil.rmtree(hf)
        self.files = {}
        for t in self.types:
            if t == "F32":
                self.files[t] = f32
            else:
                out = self.dir / f"{t}.gguf"
                _run([str(binary("llama-quantize")), str(f32), str(out), t, str(threads)])
                self.files[t] = out
        if "F32" not in self.types:
            f32.unlink()

    def decode_tokens_per_s(self, n_gen: int, depth: int, repeats: int) -> dict[str, float]:
        """llama-bench's tg: n_gen tokens decoded after `depth` tokens in the cache, median
        of `repeats` (llama-bench warms up first)."""
        out = {}
        for t, path in self.files.items():
            text = _run([str(binary("llama-bench")), "-m", str(path), "-p", "0", "-n", str(n_gen), "-d", str(depth),
                         "-t", str(self.threads), "-r", str(max(repeats, 1)), "-o", "json"])
            record = json.loads(text)[0]
            samples = sorted(record["samples_ts"])
            out[t] = samples[len(samples) // 2]
        return out

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def llamacpp_peer(hf_model, quantize: str | None, threads: int) -> tuple[LlamaCppPeer | None, str]:
    """The peer, or None and why not."""
    why = why_unavailable()
    if why:
        return None, why
    if hf_model is None:
        return None, "needs transformers to write the weights"
    try:
        return LlamaCppPeer(hf_model, quantize, threads), ""
    except (RuntimeError, OSError) as e:
        return None, str(e)
