"""sybil.engine.factory: one configuration, one set of loaded models, whoever asks (the
CLIs, the server, bench.serve)."""

import pytest

import sybil
from sybil.engine.factory import EngineConfig, load, load_checkpoint_model
from sybil.errors import SybilError


@pytest.fixture(scope="module")
def small(hf_checkpoint):
    return str(hf_checkpoint("small"))


def test_a_draft_naming_the_target_at_its_precision_is_the_target_itself(small):
    loaded = load(EngineConfig(model=small, dtype="float32", device="cpu", draft=small, draft_quantize="none"))
    assert loaded.draft is loaded.model  # one copy, two roles
    other = load(EngineConfig(model=small, dtype="float32", device="cpu", draft=small, draft_quantize="int8wo"))
    assert other.draft is not other.model and other.draft.quantized == "int8wo"


def test_lookups_stay_names_and_suffix_plus_a_model_is_the_lookup_then_the_model(small):
    assert load(EngineConfig(model=small, device="cpu", draft="ngram")).draft == "ngram"
    loaded = load(EngineConfig(model=small, dtype="float32", device="cpu", draft=f"suffix+{small}",
                               draft_quantize="int8wo"))
    lookup, model = loaded.draft
    assert lookup == "suffix" and isinstance(model, sybil.GPT) and model.quantized == "int8wo"


def test_every_model_goes_through_the_given_build(small):
    built = []

    def build(name, dtype, device, quantize):
        built.append((name, str(dtype), device.type, quantize))
        return load_checkpoint_model(name, dtype, device, quantize)

    loaded = load(EngineConfig(model=small, dtype="float32", device="cpu", quantize="int8wo", draft=small,
                               draft_quantize="none"), build)
    assert built == [(small, "torch.float32", "cpu", "int8wo"), (small, "torch.float32", "cpu", None)]
    assert loaded.model.quantized == "int8wo" and loaded.draft.quantized is None
    assert loaded.describe("served") == f"served (float32 on cpu, int8wo weights, draft {small} k=auto)"


def test_a_bad_quantize_fails_before_anything_is_built(small):
    built = []
    with pytest.raises(SybilError, match="unknown quantize"):
        load(EngineConfig(model=small, device="cpu", quantize="int3"), lambda *a: built.append(a))
    assert built == []
