"""sybil.ops.dispatch (and sybil.quant.linears) and the C++ kernels behind it: right answers, and the same bits for a
row whatever else is computed with it (what makes speculative decoding lossless)."""

import pytest
import torch
import torch.nn.functional as F

from sybil.ops import dispatch
from sybil.ops import native
from sybil.quant import formats as quant
from sybil.quant import linears

torch.set_grad_enabled(False)
PATHS = ["kernels", "torch"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run a test through the C++ kernels and through the torch fallback."""
    if request.param == "kernels":
        if not native.available():
            pytest.skip(f"CPU kernels unavailable: {native.why_unavailable()}")
    else:
        monkeypatch.setattr(dispatch, "use_kernels", lambda x: False)
    return request.param


def _data(n, k, m, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g)
    return w.to(dtype), b.to(dtype), x.to(dtype)


@pytest.mark.parametrize("n, k", [(64, 128), (67, 96), (13, 77)])  # N and K tails included
@pytest.mark.parametrize("m", [1, 2, 3, 5, 9, 17, 40])
def test_float32_linear_matches_float64(path, n, k, m):
    w, b, x = _data(n, k, m, seed=n + k + m)
    want = x.double() @ w.double().T + b.double()
    got = dispatch.linear(x, w, b)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_bitwise_independent_of_the_row_count(path, dtype):
    w, b, x = _data(200, 256, 9, seed=1, dtype=dtype)
    alone = torch.cat([dispatch.linear(x[i : i + 1], w, b) for i in range(9)])
    for m in (2, 3, 5, 9):
        assert torch.equal(dispatch.linear(x[:m], w, b), alone[:m]), f"{m} rows differ from one-row calls"


def test_bfloat16_linear_rounds_a_float32_accumulation():
    if not native.available():
        pytest.skip(f"CPU kernels unavailable: {native.why_unavailable()}")
    w, b, x = _data(64, 512, 4, seed=2, dtype=torch.bfloat16)
    want = (x.float() @ w.float().T + b.float())
    got = dispatch.linear(x, w, b)
    assert got.dtype == torch.bfloat16
    # one bfloat16 rounding of the result: relative error at most 2^-8
    assert ((got.float() - want).abs() <= want.abs() * 2**-8 + 1e-3).all()


@pytest.mark.parametrize("m", [1, 3, 9])
def test_int8_linear_matches_dequantized_float(path, m):
    w, b, x = _data(67, 128, m, seed=4)
    q, scale = quant.quantize_int8(w)
    want = x.double() @ (q.double() * scale.double()[:, None]).T + b.double()
    got = linears.linear_int8(x, quant.pack_int8(q), scale, b)
    assert (got.double() - want).abs().max().item() < 1e-4
    alone = torch.cat([linears.linear_int8(x[i : i + 1], quant.pack_int8(q), scale, b) for i in range(m)])
    assert torch.equal(got, alone)


def _integer_reference(x, q, wscale, b):
    """An integer linear in float64: x's blocks quantized as the kernels do, exact block
    dot products, then sum over blocks of dot * x scale * weight scale, plus bias."""
    xq, xs = quant.quantize_activations(x)
    dots = torch.einsum("mgk,ngk->mng", xq.double(), q.double())
    return (dots * xs.double()[:, None, :] * wscale.double()[None]).sum(-1) + b.double()


@pytest.mark.parametrize("n, k", [(64, 128), (67, 96), (13, 64), (256, 1024)])  # N tails, a long K
@pytest.mark.parametrize("m", [1, 2, 4, 9, 17, 50])  # one pass, two, the 48-row chunk and beyond
def test_q8_linear_is_the_integer_dot_product(path, n, k, m):
    w, b, x = _data(n, k, m, seed=n * k + m)
    q, scale = quant.quantize_int8(w)
    packed = quant.pack_q8(q)
    got = linears.linear_q8(x, packed, scale, b)
    want = _integer_reference(x, q.view(n, -1, 32), scale[:, None], b)
    assert (got.double() - want).abs().max().item() < 1e-5 * (1 + want.abs().max().item())
    alone = torch.cat([linears.linear_q8(x[i : i + 1], packed, scale, b) for i in range(m)])
    assert torch.equal(got, alone), "a row's bits depend on the other rows"


@pytest.mark.parametrize("n, k", [(64, 128), (16, 64), (256, 1024)])
@pytest.mark.parametrize("m", [1, 2, 4, 9, 17, 50])
def test_q4_linear_is_the_integer_dot_product(path, n, k, m):
    w, b, x = _data(n, k, m, seed=n * k + m + 1)
    packed = quant.quantize_q4(w)
    q, d = quant.dequantize_q4(packed)
    got = linears.linear_q4(x, packed, b)
    want = _integer_reference(x, q, d, b)
    assert (got.double() - want).abs().max().item() < 1e-5 * (1 + want.abs().max().item())
    alone = torch.cat([linears.linear_q4(x[i : i + 1], packed, b) for i in range(m)])
    assert torch.equal(got, alone), "a row's bits depend on the other rows"


def test_activation_blocks_are_quantized_apart():
    """A huge value in one block sets only that block's scale."""
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(9))
    x[0, 5] = 300.0
    q, s = quant.quantize_activations(x)
    assert q.shape == (2, 3, 32) and s.shape == (2, 3)
    assert q[0, 0, 5] == 127 and s[0, 0] == 300.0 / 127
    err = (q.float() * s[..., None] - x.view(2, 3, 32)).abs()
    assert (err <= s[..., None] / 2 + 1e-6).all()
    assert err[0, 1:].max() < 0.05  # the other blocks keep their resolution


def _cache(b, h, length, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, length, d, generator=g).to(dtype), torch.randn(b, h, length, d, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_attention_matches_sdpa_and_writes_the_cache(path, dtype):
    B, H, D, L, T = 2, 4, 16, 32, 5
    kc, vc = _cache(B, H, L, D, dtype, seed=5)
    qkv = torch.randn(B, T, 3 * H * D, generator=torch.Generator().manual_seed(6)).to(dtype)
    pos = torch.tensor([[10, 11, 12, 13, 14], [3, 4, 5, 6, 7]])
    y = dispatch.attend_cached(qkv, kc, vc, pos, H)
    q, k, v = qkv.view(B, T, 3, H, D).unbind(2)
    for b in range(B):
        assert torch.equal(kc[b, :, pos[b]], k[b].transpose(0, 1)) and torch.equal(vc[b, :, pos[b]], v[b].transpose(0, 1))
        for t in range(T):
            p = int(pos[b, t]) + 1
            want = F.scaled_dot_product_attention(
                q[b, t, :, None].double(), kc[b, :, :p].double(), vc[b, :, :p].double()
            )[:, 0].reshape(-1)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert (y[b, t].double() - want).abs().max().item() < tol


def test_cached_attention_query_bits_do_not_depend_on_the_forward(path):
    """A query at position p gives the same bits alone as inside a 5-token forward."""
    B, H, D, L = 1, 4, 16, 32
    qkv = torch.randn(1, 5, 3 * H * D, generator=torch.Generator().manual_seed(7))
    kc1, vc1 = _cache(B, H, L, D, torch.float32, seed=8)
    kc2, vc2 = kc1.clone(), vc1.clone()
    together = dispatch.attend_cached(qkv, kc1, vc1, torch.arange(20, 25)[None], H)
    alone = torch.cat([dispatch.attend_cached(qkv[:, t : t + 1], kc2, vc2, torch.tensor([[20 + t]]), H) for t in range(5)], 1)
    assert torch.equal(together, alone)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)


@pytest.mark.parametrize("dtype, quantize", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "int8")])
def test_fused_blocks_equal_block_by_block(monkeypatch, dtype, quantize):
    """torch.ops.sybil.blocks runs the same ops as Block.forward: same logits, same cache
    entries, bit for bit, for ragged rows at different positions."""
    if not native.available():
        pytest.skip(f"CPU kernels unavailable: {native.why_unavailable()}")
    from sybil.model.config import GPTConfig
    from sybil.model.gpt import GPT
    from sybil.model.kv_cache import KVCache
    from sybil.weights.loader import quantize_weights

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, n_positions=64, n_embd=64, n_layer=3, n_head=4)
    model = GPT(config).to(dtype).eval()
    if quantize:
        quantize_weights(model, "int8")
    idx, first = torch.randint(0, 300, (2, 5)), torch.randint(0, 300, (2, 3))
    pos = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 63, 63]])  # row 1: 3 tokens, then padding at the last slot
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(dispatch, "blocks", lambda *a: None)
        cache = KVCache.for_model(config, batch=2, max_len=64, dtype=dtype)
        model(first, cache)  # rows' first entries (row 1 overwrites them)
        runs.append((model(idx, cache, input_pos=pos), cache.k.clone(), cache.v.clone()))
    for got, want in zip(*runs):
        assert torch.equal(got, want)
    assert not torch.equal(runs[0][0][0, 0], runs[0][0][0, 1])  # a forward that computed something


@pytest.fixture
def int_dot():
    """Switch the integer dot products for a test, and back."""
    if not native.available():
        pytest.skip(f"CPU kernels unavailable: {native.why_unavailable()}")
    before = native.int_dot()
    yield native.set_int_dot
    native.set_int_dot(before)


@pytest.mark.parametrize("dot", ["avxvnni", "avx512vnni"])
def test_every_integer_dot_product_gives_the_avx2_bits(int_dot, dot):
    """vpdpbusd sums the same four columns per lane as vpmaddubsw + vpmaddwd: the same
    integers, so the same floats, in a step and in a verify (where the CPU has it)."""
    if dot not in native.int_dot_choices():
        pytest.skip(f"this CPU has no {dot} (flags: it can run {', '.join(native.int_dot_choices())})")
    for n, k, m in [(64, 128, 1), (67, 96, 5), (256, 1024, 9), (256, 1024, 50)]:
        w, b, x = _data(n, k, m, seed=n + k + m)
        q, scale = quant.quantize_int8(w)
        q8 = quant.pack_q8(q)
        q4 = quant.quantize_q4(w) if n % 8 == 0 else None
        runs = {}
        for name in ("avx2", dot):
            int_dot(name)
            runs[name] = (linears.linear_q8(x, q8, scale, b), None if q4 is None else linears.linear_q4(x, q4, b))
        assert torch.equal(runs["avx2"][0], runs[dot][0]), (n, k, m)
        if q4 is not None:
            assert torch.equal(runs["avx2"][1], runs[dot][1]), (n, k, m)
        want = _integer_reference(x, q.view(n, -1, 32), scale[:, None], b)
        assert (runs[dot][0].double() - want).abs().max().item() < 1e-5 * (1 + want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_wide_float_linear_gives_the_same_bits(dtype):
    """32 registers change how many weight rows share a pass, never a sum's order."""
    if not native.available():
        pytest.skip(f"CPU kernels unavailable: {native.why_unavailable()}")
    if not native.can_float_wide():
        pytest.skip("this CPU has no AVX512F + AVX512VL")
    before = native.float_wide()
    try:
        for n, k, m in [(64, 128, 1), (67, 96, 5), (13, 77, 3), (256, 1024, 9), (256, 1024, 50)]:  # a K tail too
            w, b, x = _data(n, k, m, seed=3 * n + k + m, dtype=dtype)
            q, scale = quant.quantize_int8(w.float())
            packed = quant.pack_int8(q) if k % 8 == 0 else None
            got = {}
            for on in (False, True):
                native.set_float_wide(on)
                got[on] = (dispatch.linear(x, w, b), None if packed is None else linears.linear_int8(x, packed, scale, b))
            assert torch.equal(got[False][0], got[True][0]), (n, k, m)
            assert packed is None or torch.equal(got[False][1], got[True][1]), (n, k, m)
            want = F.linear(x.double(), w.double(), b.double())
            assert (got[True][0].double() - want).abs().max() < (1e-4 if dtype == torch.float32 else 0.1)
    finally:
        native.set_float_wide(before)


def _gelu64(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh u) as x / (1 + e^-2u): in float64 the tanh form is 0 below x = -8."""
    x = x.double()
    return x / (1 + torch.exp(-2 * 0.7978845608028654 * (x + 0.044715 * x**3)))


def test_gelu_matches_float64():
    """The kernel's tanh GELU within float32 rounding of the float64 function, from -100
    to 100: its e^x (csrc/elementwise.h) has no range where it drifts. (torch's, the
    fallback, is off by up to 7e-4 of the value between -4 and -1.)"""
    if not native.available():
        pytest.skip(f"CPU kernels unavailable: {native.why_unavailable()}")
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.linspace(-100, 100, 40001), torch.randn(5000, generator=g) * 3,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-8, -3.4e38, 3.4e38])])
    got, want = dispatch.gelu(x), _gelu64(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert ((got.double() - want).abs() <= 1e-6 * want.abs() + 1e-9).all()
    assert torch.isnan(dispatch.gelu(torch.tensor([float("nan")]))).all()


def test_gelu_of_an_element_depends_on_that_element_alone():
    """The kernel gives an element the same bits whatever the tensor's length, shape or
    chunking over threads (a vector tail, a pool split), and bfloat16 rounds the float32
    result. (torch's does not: its scalar tail differs from its vector body.)"""
    if not native.available():
        pytest.skip(f"CPU kernels unavailable: {native.why_unavailable()}")
    x = torch.randn(3, 40001, generator=torch.Generator().manual_seed(4)) * 4
    whole = dispatch.gelu(x)
    assert torch.equal(whole[1, 5:12], dispatch.gelu(x[1, 5:12]))  # 7 elements: the tail only
    assert torch.equal(whole[2, 16380:16400], dispatch.gelu(x[2, 16380:16400]))
    assert torch.equal(whole.T, dispatch.gelu(x.T))  # not contiguous
    assert torch.equal(dispatch.gelu(x.bfloat16()), dispatch.gelu(x.bfloat16().float()).bfloat16())
