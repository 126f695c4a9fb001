"""sybil.quant: the quantized formats hold what they claim, and the quantized models
stay exact in their own sense (the same bits for a row in a step and a verify)."""

import pytest
import torch

from sybil.quant import formats as quant

torch.set_grad_enabled(False)


def _data(n, k, seed):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_int8_quantization_error_is_half_a_step():
    w = _data(600, 64, seed=3)  # rows past quant.ROW_CHUNK: the chunks keep their own scales
    w[-3] *= 30
    q, scale = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (600,)
    assert q.abs().max() <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    # the largest weight of each row is exactly representable
    assert torch.allclose((q.float() * scale[:, None]).abs().amax(1), w.abs().amax(1))


@pytest.mark.parametrize("n", [8, 21, 64])
def test_packing_round_trips(n):
    q = torch.randint(-127, 128, (n, 48), generator=torch.Generator().manual_seed(n), dtype=torch.int8)
    packed = quant.pack_int8(q)
    assert packed.shape == ((n + 7) // 8, 6, 64)
    assert torch.equal(quant.unpack_rows(packed, torch.arange(n)), q)
    rows = torch.tensor([n - 1, 0, n // 2, n - 1])
    assert torch.equal(quant.unpack_rows(packed, rows), q[rows])



@pytest.mark.parametrize("n", [8, 21, 64])
def test_q8_packing_round_trips(n):
    q = torch.randint(-127, 128, (n, 96), generator=torch.Generator().manual_seed(n), dtype=torch.int8)
    packed = quant.pack_q8(q)
    assert packed.shape == ((n + 7) // 8, 3, 8, 8, 4)
    # the kernels' reading: block b, group g, quad j, row r, byte c is q[8b + r, 32g + 4j + c]
    assert packed[n // 8 - 1, 2, 5, 7, 3] == q[8 * (n // 8 - 1) + 7, 64 + 20 + 3]
    assert packed[0, 1, 2, 3, 1] == q[3, 32 + 8 + 1]
    assert torch.equal(quant.unpack_rows(packed, torch.arange(n)), q)
    rows = torch.tensor([n - 1, 0, n // 2])
    assert torch.equal(quant.unpack_rows(packed, rows), q[rows])


def test_q4_keeps_each_group_within_one_step():
    w = _data(272, 128, seed=4)  # rows past quant.ROW_CHUNK
    loud = 259
    w[loud, :32] *= 40  # one loud group must not cost the others their resolution
    packed = quant.quantize_q4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (34, 4, 144)
    q, d = quant.dequantize_q4(packed)
    assert q.min() >= -8 and q.max() <= 7
    err = (q.float() * d[..., None] - w.view(272, 4, 32)).abs()
    # round to nearest inside [-8, 7] d; the top of the range clips at 7 d (Q4_0's rule)
    assert (err <= d.abs()[..., None] * 1.0 + 1e-4).all()
    assert (err[q.abs() < 7] <= d.abs()[..., None].expand_as(err)[q.abs() < 7] / 2 + 1e-4).all()
    assert d[loud, 0].abs() > 10 * d[loud, 1:].abs().max()  # the loud group's scale is its own: neighbours keep theirs


@pytest.mark.parametrize("bad", [(16, 48), (12, 64)])
def test_q4_refuses_shapes_it_cannot_hold(bad):
    with pytest.raises(ValueError, match="int4"):
        quant.quantize_q4(_data(*bad, seed=5))
