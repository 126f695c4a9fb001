"""Loading Hugging Face checkpoints: the key map, its errors, dtypes and path resolution."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sybil
from sybil.errors import SybilError
from sybil.model.config import GPTConfig
from sybil.weights.loader import infer_config, resolve_checkpoint, resolve_dtype

TINY = Path(__file__).parents[1] / "fixtures" / "tiny"
torch.set_grad_enabled(False)


@pytest.fixture
def tensors():
    return load_file(TINY / "model.safetensors")


def _write(tmp_path, tensors, config=True) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "model.safetensors")
    if config:
        shutil.copy(TINY / "config.json", tmp_path / "config.json")
    return tmp_path


def _logits(model):
    return model(torch.tensor([[1, 2, 3, 4]]))


def test_conv1d_weights_are_transposed_and_head_is_tied(tensors):
    model = sybil.load_model(TINY)
    assert torch.equal(model.h[0].attn.c_attn.weight, tensors["transformer.h.0.attn.c_attn.weight"].t())
    assert torch.equal(model.h[1].mlp.c_proj.weight, tensors["transformer.h.1.mlp.c_proj.weight"].t())
    assert model.lm_head.weight is model.wte.weight


def test_prefix_is_optional_and_mask_buffers_are_dropped(tmp_path, tensors):
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    bare["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))  # older checkpoints carry these
    bare["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    bare["lm_head.weight"] = bare["wte.weight"].clone()
    got = _logits(sybil.load_model(_write(tmp_path, bare)))
    # Same weights, same maths; MKL may still sum in another order for other alignments.
    assert torch.allclose(got, _logits(sybil.load_model(TINY)), rtol=0, atol=1e-6)


def test_single_file_infers_config_from_shapes(tmp_path, tensors):
    f = tmp_path / "tiny.safetensors"
    save_file(tensors, f)
    model = sybil.load_model(f)
    assert (model.config.vocab_size, model.config.n_positions, model.config.n_layer) == (256, 64, 2)
    # No preset is 2 x 32 wide, so heads fall back to 64-wide: a different model from the
    # 4-head original, which the config.json would have said.
    assert model.config.n_head == 1


def test_infer_config_prefers_a_matching_preset():
    shapes = {"wte.weight": (50257, 1024), "wpe.weight": (1024, 1024)}
    shapes.update({f"h.{i}.ln_1.weight": (1024,) for i in range(24)})
    assert infer_config(shapes) == GPTConfig.from_name("gpt2-medium")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.update({"transformer.h.0.attn.c_attn.lora": torch.zeros(1)}), "unknown tensor"),
        (lambda t: t.update({"transformer.h.7.ln_1.weight": torch.zeros(32)}), "unexpected tensor"),
        (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), "missing"),
        (lambda t: t.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(128, 32)}), "has shape"),
        (lambda t: t.update({"lm_head.weight": torch.zeros(256, 32)}), "untied"),
    ],
)
def test_bad_checkpoints_are_errors_naming_the_tensor(tmp_path, tensors, edit, message):
    edit(tensors)
    with pytest.raises(SybilError, match=message):
        sybil.load_model(_write(tmp_path, tensors))


def test_dtype_conversion(tensors):
    for name, dt in [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)]:
        model = sybil.load_model(TINY, dtype=name)
        assert all(p.dtype == dt for p in model.parameters())
        assert torch.equal(model.wpe.weight, tensors["transformer.wpe.weight"].to(dt))


def test_dtype_auto_says_why():
    dtype, why = resolve_dtype("auto", torch.device("cpu"))
    assert dtype in (torch.float32, torch.bfloat16) and why.startswith("auto:")
    with pytest.raises(SybilError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SybilError, match="pickle"):
        sybil.load_model(tmp_path)


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(SybilError, match="cannot read"):
        sybil.load_model(tmp_path)


def test_config_for_another_architecture_is_refused(tmp_path, tensors):
    _write(tmp_path, tensors)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SybilError, match="llama"):
        sybil.load_model(tmp_path)


def test_missing_preset_without_download_says_where_to_put_files(tmp_path):
    with pytest.raises(SybilError, match="sybil.download gpt2"):
        resolve_checkpoint("gpt2", weights_dir=tmp_path, download=False)
    with pytest.raises(SybilError, match="neither a checkpoint path nor a preset"):
        resolve_checkpoint(str(tmp_path / "nope"), weights_dir=tmp_path)


def test_preset_folder_is_found(tmp_path, tensors):
    (tmp_path / "gpt2").mkdir()
    _write(tmp_path / "gpt2", tensors)
    assert resolve_checkpoint("gpt2", weights_dir=tmp_path, download=False) == tmp_path / "gpt2"


def test_presets_have_the_published_shapes():
    c = GPTConfig.from_name("gpt2-xl")
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.n_positions) == (48, 25, 1600, 50257, 1024)
    assert GPTConfig.from_name("distilgpt2").n_layer == 6
    with pytest.raises(ValueError, match="unknown model preset"):
        GPTConfig.from_name("gpt3")
