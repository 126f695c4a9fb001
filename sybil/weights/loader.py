"""Load Hugging Face GPT-2 safetensors checkpoints into sybil.model.GPT.

Only safetensors is read (never pickle). Each checkpoint key is matched against a
declarative key map; anything unknown, missing or mis-shaped is an error naming it.
"""

from __future__ import annotations

import json
import re
import sys
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open

from sybil.errors import SybilError
from sybil.model.config import PRESETS, GPTConfig
from sybil.model.gpt import GPT
from sybil.ops import memory, native
from sybil.quant import MODES, quantize_model
from sybil.weights.download import default_weights_dir, download_preset
from sybil.weights.tokenizer import encode

# What to do with each checkpoint key (after an optional "transformer." prefix).
# GPT-2 stores its four projections as Conv1D, weight [in, out]; nn.Linear wants
# [out, in], so those are transposed once here. The causal-mask buffers are
# dropped (the mask comes from positions), and lm_head is tied to wte.
KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"w[tp]e\.weight", "copy"),
    (r"ln_f\.(weight|bias)", "copy"),
    (r"h\.\d+\.ln_[12]\.(weight|bias)", "copy"),
    (r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight", "transpose"),
    (r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.bias", "copy"),
    (r"h\.\d+\.attn\.(masked_)?bias", "drop"),
    (r"lm_head\.weight", "tied"),
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SybilError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> tuple[torch.dtype, str]:
    """The torch dtype for a name (or 'auto'), and a short reason for the choice.

    'auto' prefers bfloat16 only where the hardware computes it natively: on a CPU
    without AVX512-BF16/AMX, bfloat16 matmuls are emulated and slower than float32.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise SybilError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype, "as requested"
    if dtype == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "auto: CUDA device with bfloat16 support"
            return torch.float16, "auto: CUDA device without bfloat16"
        if _cpu_has_native_bf16():
            return torch.bfloat16, "auto: this CPU has native bfloat16 (AVX512-BF16/AMX)"
        return torch.float32, "auto: this CPU has no native bfloat16, float32 is faster"
    if dtype not in DTYPES:
        raise SybilError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype], "as requested"


def infer_config(shapes: dict[str, tuple[int, ...]]) -> GPTConfig:
    """A config from tensor shapes alone, for a bare .safetensors file.

    Shapes fix everything but the head count; every GPT-2 uses 64-wide heads, so a
    preset with the same width and depth is preferred, else n_embd // 64.
    """
    try:
        vocab, n_embd = shapes["wte.weight"]
        n_positions = shapes["wpe.weight"][0]
    except KeyError as e:
        raise SybilError(f"checkpoint has no {e.args[0]} tensor: not a GPT-2 checkpoint") from None
    n_layer = len({k.split(".")[1] for k in shapes if k.startswith("h.")})
    n_head = next(
        (p["n_head"] for p in PRESETS.values() if p["n_embd"] == n_embd and p["n_layer"] == n_layer),
        max(1, n_embd // 64),
    )
    return GPTConfig(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head)


def key_action(key: str) -> str:
    """What KEY_MAP says to do with a checkpoint key: copy, transpose, drop or tied."""
    for pattern, action in KEY_MAP:
        if re.fullmatch(pattern, key):
            return action
    raise SybilError(f"unknown tensor {key!r} in checkpoint: not a GPT-2 (GPT2LMHeadModel) layout")


def _checkpoint_files(path: Path) -> tuple[Path, Path | None]:
    if path.is_dir():
        st = path / "model.safetensors"
        if not st.is_file():
            hint = " (pickle .bin checkpoints are not loaded; convert to safetensors)" if any(path.glob("*.bin")) else ""
            raise SybilError(f"{path} has no model.safetensors{hint}")
        cfg = path / "config.json"
        return st, cfg if cfg.is_file() else None
    if path.suffix != ".safetensors":
        raise SybilError(f"{path} is not a .safetensors file; only safetensors checkpoints are loaded")
    return path, None


QUANTIZE = ("none", *MODES)  # sybil.quant.MODES: int8, int4, int8wo
DRAFT_QUANTIZE = ("auto", *QUANTIZE)


def check_quantize(quantize: str | None, device: torch.device) -> str | None:
    """None or a sybil.quant mode; an error for anything else, or for one off the CPU."""
    if quantize is not None and quantize not in QUANTIZE:
        raise SybilError(f"unknown quantize {quantize!r}; use one of {', '.join(QUANTIZE)}")
    if quantize not in (None, "none") and device.type != "cpu":
        raise SybilError(f"{quantize} weights are a CPU path; on CUDA use --dtype float16 or bfloat16")
    return None if quantize == "none" else quantize


def resolve_draft_quantize(quantize: str, device: torch.device) -> str | None:
    """A draft's weights: "auto" is int4 where the CPU kernels run. The draft never decides
    what is kept, so its precision costs acceptance at most, never output; and int4 is
    the fastest draft step (docs/speculation.md)."""
    if quantize == "auto":
        quantize = "int4" if device.type == "cpu" and native.available() else "none"
    return check_quantize(quantize, device)


def calibration_tokens() -> torch.Tensor:
    """The built-in calibration text (assets/calibration.txt), tokenized: [1, T]."""
    text = resources.files("sybil").joinpath("assets/calibration.txt").read_text()
    return torch.tensor([encode(text)])


def quantize_weights(model: GPT, mode: str, smooth: bool = True) -> GPT:
    """Quantize a loaded model in place (sybil.quant.quantize_model), SmoothQuant folded in
    from the built-in calibration text for the integer formats unless smooth is False."""
    return quantize_model(model, mode, calibration_tokens() if smooth and mode != "int8wo" else None)


def load_checkpoint(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
) -> GPT:
    """Build a GPT from a checkpoint directory or .safetensors file; quantize (a
    sybil.quant mode) quantizes its linears and head (dtype is then the compute dtype)."""
    quantize = check_quantize(quantize, torch.device(device))
    st_path, cfg_path = _checkpoint_files(Path(path))
    try:
        f = safe_open(str(st_path), framework="pt", device="cpu")  # memory-mapped
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise SybilError(f"cannot read {st_path}: {e}") from None
    with f:
        keys = {k.removeprefix("transformer."): k for k in f.keys()}
        shapes = {k: tuple(f.get_slice(full).get_shape()) for k, full in keys.items()}
        try:
            config = GPTConfig.from_json(cfg_path) if cfg_path else infer_config(shapes)
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            raise SybilError(f"bad config {cfg_path}: {e}") from None
        with torch.device("meta"):
            model = GPT(config)
        expected = {k: tuple(p.shape) for k, p in model.state_dict().items() if k != "lm_head.weight"}
        state: dict[str, torch.Tensor] = {}
        # Float weights on the CPU go into 2 MiB pages (sybil.ops.memory says why) as they are
        # read, transposed in the same copy: one copy of the model, not a transposed one and
        # then a rehomed one (float32 gpt2-medium, four loads in one process, 2-core Zen 3:
        # 0.73-1.25 s against 1.44-2.33 s). Quantized weights are rehomed as they are made.
        home = quantize is None and torch.device(device).type == "cpu"
        for key, full in keys.items():
            action = key_action(key)
            if action == "drop":
                continue
            if action == "tied":
                continue  # checked against wte below
            if key not in expected:
                raise SybilError(f"unexpected tensor {full!r}: config has {config.n_layer} layers")
            shape = shapes[key][::-1] if action == "transpose" else shapes[key]
            if shape != expected[key]:
                raise SybilError(f"tensor {full!r} has shape {shapes[key]}, expected {expected[key]} for this config")
            t = f.get_tensor(full).to(dtype)  # no copy where the dtype is the checkpoint's
            t = t.t() if action == "transpose" else t
            state[key] = (memory.rehome(t) if home else t).contiguous()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise SybilError(f"checkpoint is missing {len(missing)} tensor(s), first {missing[0]!r}")
        if "lm_head.weight" in keys and not torch.equal(f.get_tensor(keys["lm_head.weight"]).to(dtype), state["wte.weight"]):
            raise SybilError("lm_head.weight differs from wte.weight: untied GPT-2 heads are not supported")
    model.load_state_dict(state, strict=False, assign=True)
    del state  # the model holds the only references now, so each rehomed tensor frees its old copy
    model.lm_head.weight = model.wte.weight  # assign=True replaced wte's parameter; re-tie
    if quantize:
        try:
            quantize_weights(model, quantize)  # its quantized weights are made in 2 MiB pages
        except ValueError as e:  # a shape the format cannot hold
            raise SybilError(str(e)) from None
    return model.to(device).eval()


def resolve_checkpoint(name_or_path: str, weights_dir: Path | None = None, download: bool = True) -> Path:
    """A path to load: an existing file or directory, or a preset's weights/<name>/."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if name_or_path not in PRESETS:
        raise SybilError(f"{name_or_path!r} is neither a checkpoint path nor a preset ({', '.join(PRESETS)})")
    target = (weights_dir or default_weights_dir()) / name_or_path
    if (target / "model.safetensors").is_file():
        return target
    if not download:
        raise SybilError(f"no weights in {target}/; run: python -m sybil.download {name_or_path}")
    print(f"sybil: weights for {name_or_path} not found in {target}/, downloading", file=sys.stderr)
    return download_preset(name_or_path, target.parent)


def load_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    *,
    weights_dir: Path | None = None,
    download: bool = True,
    quantize: str | None = None,
) -> GPT:
    """Load a GPT-2 by preset name (downloading if needed) or checkpoint path.

    quantize ("int8", "int4", "int8wo": sybil.quant) quantizes every linear and the
    tied head at load time from the ordinary checkpoint; dtype stays the compute
    dtype (of activations and the cache)."""
    dev = resolve_device(device)
    dt, _ = resolve_dtype(dtype, dev)
    check_quantize(quantize, dev)  # before any download: a bad value fails at once
    return load_checkpoint(resolve_checkpoint(str(name_or_path), weights_dir, download), dt, dev, quantize)
