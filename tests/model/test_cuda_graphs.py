"""The fixed-shape (graph-capturable) steps: on the CPU they run eagerly and must give
what the ordinary path gives; on a CUDA machine the captured graphs are checked too."""

import pytest
import torch

import sybil
from sybil.model.cuda_graphs import StepGraphs
from sybil.model.kv_cache import KVCache
from sybil.model.runner import forward_rows

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return sybil.load_model(hf_checkpoint("small"))


def test_static_forward_equals_the_dynamic_one(model):
    rows = [[5, 6, 7], [8], [9, 10]]
    dyn, stat = (KVCache.for_model(model.config, 3, 40) for _ in range(2))
    prefix = [[1, 2, 3, 4], [11] * 9, [12]]
    forward_rows(model, dyn, prefix)
    forward_rows(model, stat, prefix)
    want = forward_rows(model, dyn, rows)
    got = forward_rows(model, stat, rows, StepGraphs(model, stat, capture=False))
    for b, row in enumerate(rows):
        assert torch.allclose(got[b, : len(row)], want[b, : len(row)], atol=1e-5)
    assert stat.lengths.tolist() == dyn.lengths.tolist() == [7, 10, 3]
    for b, n in enumerate(dyn.lengths.tolist()):  # the same keys were written
        assert torch.allclose(stat.k[:, b, :, :n], dyn.k[:, b, :, :n], atol=1e-5)


def test_capture_without_cuda_is_refused(model):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA"):
        StepGraphs(model, KVCache.for_model(model.config, 1, 8), capture=True)


@pytest.mark.parametrize("draft", [None, "self", "ngram"])
def test_generation_through_fixed_shape_steps_is_unchanged(model, draft):
    d = model if draft == "self" else draft
    prompts = [[1, 2, 3], [7] * 20, [9]]
    plain = sybil.generate(model, prompts, 12, draft=d, k=3, stop_at_eos=False, graphs=False)
    fixed = sybil.generate(model, prompts, 12, draft=d, k=3, stop_at_eos=False, graphs=True)
    assert [o.tokens for o in fixed] == [o.tokens for o in plain]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graphs_match_eager_on_gpu(hf_checkpoint, dtype):
    model = sybil.load_model(hf_checkpoint("small"), dtype=dtype, device="cuda")
    prompts = [[1, 2, 3], [7] * 20]
    eager = sybil.generate(model, prompts, 24, draft=model, k=4, stop_at_eos=False, graphs=False)
    graphed = sybil.generate(model, prompts, 24, draft=model, k=4, stop_at_eos=False, graphs=True)
    assert [o.tokens for o in graphed] == [o.tokens for o in eager]
    assert graphed[0].stats["capture_s"] > 0
