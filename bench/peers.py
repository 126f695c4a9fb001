"""Other engines, run on the same weights in the same benchmark: CTranslate2.

CTranslate2's converter reads a Hugging Face checkpoint folder, tokenizer files
included, so the weights (real or random) are written out through the
`transformers` mirror, with vocab.json and merges.txt made from the ranks file
Sybil ships. Each peer is optional (`pip install -e ".[peers]"`); a missing one
is a row that says why.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from sybil.weights.tokenizer import EOT, mergeable_ranks

# compute type for each (dtype, quantize) the benchmark runs
CT2_COMPUTE = {("float32", None): "float32", ("float32", "int8"): "int8_float32", ("bfloat16", None): "bfloat16",
               ("bfloat16", "int8"): "int8_bfloat16", ("float32", "int8wo"): "int8_float32",
               ("bfloat16", "int8wo"): "int8_bfloat16"}  # CTranslate2's int8 quantizes activations too


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the alphabet of vocab.json and merges.txt)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _split(ranks: dict[bytes, int], token: bytes) -> list[bytes]:
    """Run BPE on token with only the merges ranked below it: the last merge's two halves."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        best = min(
            (ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))
        )
        if best[0] >= limit:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def write_hf_tokenizer(folder: Path) -> None:
    """vocab.json and merges.txt for GPT-2, from sybil's shipped tiktoken ranks."""
    ranks = mergeable_ranks()
    u = _byte_to_unicode()
    text = lambda b: "".join(u[c] for c in b)  # noqa: E731
    vocab = {text(tok): rank for tok, rank in ranks.items()}
    vocab[EOT] = len(vocab)
    merges = ["#version: 0.2"]
    for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            a, b = _split(ranks, tok)
            merges.append(f"{text(a)} {text(b)}")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")


class CT2Peer:
    """A CTranslate2 generator converted from the same weights, at the matching precision."""

    def __init__(self, hf_model, dtype: str, quantize: str | None, threads: int) -> None:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter

        compute = CT2_COMPUTE[(dtype, quantize)]
        if compute not in ctranslate2.get_supported_compute_types("cpu"):
            raise RuntimeError(f"CTranslate2 has no {compute} on this CPU")
        self.compute_type = compute
        self._tmp = tempfile.TemporaryDirectory(prefix="sybil-ct2-")
        src, out = Path(self._tmp.name) / "hf", Path(self._tmp.name) / "ct2"
        hf_model.save_pretrained(src)  # in its own dtype; the converter casts to compute_type
        write_hf_tokenizer(src)
        TransformersConverter(str(src), low_cpu_mem_usage=True).convert(str(out), quantization=compute)
        self.generator = ctranslate2.Generator(str(out), device="cpu", compute_type=compute, intra_threads=threads)
        vocab = json.loads((src / "vocab.json").read_text())
        self.tokens = {i: t for t, i in vocab.items()}

    def generate(self, prompt: list[int], n: int) -> list[int]:
        """n greedy tokens after prompt (EOS ignored), as ids."""
        res = self.generator.generate_batch(
            [[self.tokens[i] for i in prompt]], max_length=n, min_length=n, sampling_topk=1,
            include_prompt_in_result=False, end_token=[],
        )
        return res[0].sequences_ids[0]


def ct2_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("ctranslate2") is not None


def ct2_peer(hf_model, dtype: torch.dtype, quantize: str | None) -> tuple[CT2Peer | None, str]:
    """The peer, or None and why not."""
    if not ct2_installed():
        return None, "not installed (pip install -e '.[peers]')"
    if hf_model is None:
        return None, "needs transformers to convert the weights"
    if (str(dtype).removeprefix("torch."), quantize) not in CT2_COMPUTE:
        return None, f"no CTranslate2 compute type matches {quantize} weights"
    try:
        from sybil.ops import native

        return CT2Peer(hf_model, str(dtype).removeprefix("torch."), quantize, native.threads()), ""
    except (RuntimeError, ValueError) as e:
        return None, str(e)
