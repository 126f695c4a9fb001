// Sybil's CPU kernels: a linear layer and a cached attention whose result for a
// row never depends on how many other rows are computed with it.
//
// Why hand-written: BLAS picks a different kernel (and so a different summation
// order) for 1 row than for 9, so a position's logits differed between a decode
// step and a verify forward, and in bfloat16 greedy speculative output differed
// from greedy plain output. Here every output element is one dot product summed
// in one fixed order (8 lanes over k, then a fixed horizontal sum), whatever the
// row count, the blocking or the thread split. Reading the weights once for all
// rows also makes a 9-row verify cost little more than a 1-row step while it
// stays memory-bound, and the weights may be float32, bfloat16 or int8 (with a
// float32 scale per output channel), always accumulated in float32.
//
// Needs AVX2 and FMA (sybil/native.py checks the CPU before building).

#include <ATen/ATen.h>
#include <torch/library.h>
#include <immintrin.h>

#include "pool.h"  // every parallel region here runs on Sybil's pool: pool.h says why
#include "simd.h"
#include "int_linear.h"  // int8 activations against int8 or 4-bit weights
#include "elementwise.h"  // exp and the tanh GELU

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using sybil::hsum;
using bf16 = c10::BFloat16;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 load8(const int8_t* p) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
inline float scalar(float v) { return v; }
inline float scalar(bf16 v) { return static_cast<float>(v); }
inline float scalar(int8_t v) { return static_cast<float>(v); }

namespace narrow {
#include "float_linear.h"
}  // namespace narrow

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl")
namespace wide {
#define SYBIL_FLOAT_WIDE
#include "float_linear.h"
#undef SYBIL_FLOAT_WIDE
}  // namespace wide
#pragma GCC pop_options

// Whether the float linear takes its wide form (float_linear.h); sybil.native sets it.
bool& float_wide() {
  static bool on = false;
  return on;
}

template <typename W>
void linear_impl(const float* x, int64_t M, int64_t K, const W* w, bool packed, int64_t N, const float* scale,
                 const float* bias, float* y) {
  if (float_wide())
    wide::linear_impl(x, M, K, w, packed, N, scale, bias, y);
  else
    narrow::linear_impl(x, M, K, w, packed, N, scale, bias, y);
}

// The integer linears (int_linear.h): q8 int8 [N/8, K/32, 8, 8, 4] with a scale [N],
// or q4 uint8 [N/8, K/32, 144] (no scale; N = 8 * N/8). xf [M, K] float32.
at::Tensor int_linear(const at::Tensor& xf, const at::Tensor& w, const at::Tensor& bs, const c10::optional<at::Tensor>& scale) {
  const bool q4 = w.scalar_type() == at::kByte;
  TORCH_CHECK(w.is_contiguous() && (q4 ? w.dim() == 3 && w.size(2) == sybil::Q4_GROUP : w.dim() == 5 && w.size(2) == 8 &&
              w.size(3) == 8 && w.size(4) == 4), "sybil::linear: not a q8 [N/8, K/32, 8, 8, 4] or q4 [N/8, K/32, 144] weight");
  TORCH_CHECK(q4 != scale.has_value(), "sybil::linear: q8 weights need a scale, q4 weights take none");
  const int64_t K = w.size(1) * sybil::QK, N = q4 ? w.size(0) * 8 : scale->numel(), M = xf.size(0);
  TORCH_CHECK(q4 || w.size(0) == (N + 7) / 8, "sybil::linear: q8 weight does not match scale");
  TORCH_CHECK(xf.size(1) == K, "sybil::linear: x has ", xf.size(1), " features, weight ", K);
  at::Tensor sc = q4 ? at::Tensor() : scale->to(at::kFloat).contiguous();
  auto y = at::empty({M, N}, xf.options());
  const float* bp = bs.defined() ? bs.data_ptr<float>() : nullptr;
  if (q4)
    sybil::int_linear<true>(xf.data_ptr<float>(), M, K, w.data_ptr<uint8_t>(), N, nullptr, bp, y.data_ptr<float>());
  else
    sybil::int_linear<false>(xf.data_ptr<float>(), M, K, w.data_ptr<int8_t>(), N, sc.data_ptr<float>(), bp,
                             y.data_ptr<float>());
  return y;
}

// y = x @ w.T (* scale) (+ bias), x [..., K] float32 or bfloat16. w is a float32 or
// bfloat16 [N, K]; an int8 [N, K] or weight-only packed [N/8, K/8, 64] with a scale
// [N] (converted to float32 and accumulated in float32); or a q8 / q4 integer
// weight (int_linear above). The result has x's dtype.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "sybil::linear runs on the CPU");
  at::Tensor bs;
  if (bias.has_value()) bs = bias->to(at::kFloat).contiguous();
  if (w.scalar_type() == at::kByte || w.dim() == 5) {
    const int64_t K = w.size(1) * sybil::QK;
    TORCH_CHECK(x.size(-1) == K, "sybil::linear: x has ", x.size(-1), " features, weight ", K);
    auto y = int_linear(x.to(at::kFloat).contiguous().view({-1, K}), w, bs, scale);
    auto shape = x.sizes().vec();
    shape.back() = y.size(1);
    return y.view(shape).to(x.scalar_type());
  }
  // A 3-d int8 weight [ceil(N / 8), K / 8, 64] is the packed layout (see dots); N is then scale's length.
  const bool packed = w.dim() == 3;
  TORCH_CHECK((w.dim() == 2 || packed) && w.is_contiguous(), "sybil::linear: weight must be [N, K] or packed");
  TORCH_CHECK(!packed || (scale.has_value() && w.size(2) == 64), "sybil::linear: packed weights need a scale");
  const int64_t K = packed ? w.size(1) * 8 : w.size(1), N = packed ? scale->numel() : w.size(0);
  TORCH_CHECK(!packed || w.size(0) == (N + 7) / 8, "sybil::linear: packed weight does not match scale");
  TORCH_CHECK(x.size(-1) == K, "sybil::linear: x has ", x.size(-1), " features, weight ", K);
  auto xf = x.to(at::kFloat).contiguous().view({-1, K});
  const int64_t M = xf.size(0);
  auto y = at::empty({M, N}, xf.options());
  at::Tensor sc;
  if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(scale.has_value(), "sybil::linear: int8 weights need a scale");
    sc = scale->to(at::kFloat).contiguous();
  }
  const float* sp = sc.defined() ? sc.data_ptr<float>() : nullptr;
  const float* bp = bs.defined() ? bs.data_ptr<float>() : nullptr;
  switch (w.scalar_type()) {
    case at::kFloat:
      linear_impl(xf.data_ptr<float>(), M, K, w.data_ptr<float>(), packed, N, sp, bp, y.data_ptr<float>());
      break;
    case at::kBFloat16:
      linear_impl(xf.data_ptr<float>(), M, K, w.data_ptr<bf16>(), packed, N, sp, bp, y.data_ptr<float>());
      break;
    case at::kChar:
      linear_impl(xf.data_ptr<float>(), M, K, w.data_ptr<int8_t>(), packed, N, sp, bp, y.data_ptr<float>());
      break;
    default:
      TORCH_CHECK(false, "sybil::linear: unsupported weight dtype ", w.scalar_type());
  }
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape).to(x.scalar_type());
}

#include "attention.h"  // the cached attention (sybil::attend)

// GPT-2's tanh GELU (elementwise.h), float32 or bfloat16 (computed in float32 and
// rounded once, as torch does). Chunks of 16K elements go to the pool: an element's
// value never depends on the split.
at::Tensor gelu_tanh(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "sybil::gelu: a CPU float32 or bfloat16 tensor, got ", x.scalar_type());
  if (x.scalar_type() == at::kBFloat16) return gelu_tanh(x.to(at::kFloat)).to(at::kBFloat16);
  const auto xc = x.contiguous();
  auto y = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t n = xc.numel();
  constexpr int64_t CHUNK = 16384;
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  if (chunks <= 1) {
    sybil::gelu(xp, yp, n);
    return y;
  }
  sybil::Pool::get().run(chunks, 1, [&](int64_t c0, int64_t c1) {
    sybil::gelu(xp + c0 * CHUNK, yp + c0 * CHUNK, std::min(n, c1 * CHUNK) - c0 * CHUNK);
  });
  return y;
}

// Every transformer block of a forward in one call: the same operations, in the
// same order, as sybil.model.Block (torch's layer_norm and add; the linear,
// attention and tanh GELU above), so the bits are the same as block by block. Why:
// from Python each block is about a dozen ops, each paying the interpreter and the
// dispatcher; 24 blocks of them cost a few ms a step, as much as reading 100 MB.
// params holds 16 entries per layer: ln_1 weight, bias; c_attn weight, bias,
// scale; attn c_proj weight, bias, scale; ln_2 weight, bias; c_fc weight, bias,
// scale; mlp c_proj weight, bias, scale (scale None for float weights, the
// weight then [N, K]; packed int8 otherwise). kc, vc [layers, B, H, L, D].
constexpr int64_t PARAMS_PER_LAYER = 16;

at::Tensor blocks(const at::Tensor& x_in, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& pos,
                  int64_t n_head, double eps, const c10::List<std::optional<at::Tensor>>& params,
                  const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(x_in.dim() == 3 && kc.dim() == 5 && vc.dim() == 5, "sybil::blocks: bad ranks");
  const int64_t layers = kc.size(0), C = x_in.size(2);
  TORCH_CHECK(static_cast<int64_t>(params.size()) == layers * PARAMS_PER_LAYER,
              "sybil::blocks: expected ", layers * PARAMS_PER_LAYER, " parameters, got ", params.size());
  const auto p = check_positions(pos, kc.size(3));
  const auto r = check_rows(rows, x_in.size(0) * x_in.size(1), kc.size(1));
  const int64_t* rp = r ? r->data_ptr<int64_t>() : nullptr;
  auto get = [&](int64_t l, int64_t i) -> std::optional<at::Tensor> { return params.get(l * PARAMS_PER_LAYER + i); };
  auto lin = [&](const at::Tensor& h, int64_t l, int64_t i) {
    return linear(h, *get(l, i), get(l, i + 1), get(l, i + 2));
  };
  at::Tensor x = x_in;
  for (int64_t l = 0; l < layers; ++l) {
    auto h = at::layer_norm(x, {C}, get(l, 0), get(l, 1), eps);
    auto a = attend_checked(lin(h, l, 2), kc.select(0, l), vc.select(0, l), p, n_head, rp);
    x = x + lin(a, l, 5);
    h = at::layer_norm(x, {C}, get(l, 8), get(l, 9), eps);
    x = x + lin(gelu_tanh(lin(h, l, 10)), l, 13);
  }
  return x;
}

}  // namespace

// The pool's size: what --threads / SYBIL_THREADS ask for (sybil.native sets it at load).
int64_t set_threads(int64_t n) {
  sybil::Pool::get().set_threads(static_cast<int>(n));
  return sybil::Pool::get().threads();
}

// [regions, serial regions, fallbacks, seconds in parallel regions, seconds the caller waited in them]
at::Tensor pool_stats() {
  const auto st = sybil::Pool::get().stats();
  return at::tensor(std::vector<double>{double(st.regions), double(st.serial), double(st.fallbacks), st.run_s,
                                        st.wait_s}, at::kDouble);
}

// The integer linears' dot products (int_linear.h): 0 AVX2, 1 AVX-VNNI, 2 AVX512-VNNI
// (on ymm); sybil.native chooses from the CPU's flags. Returns the one in use.
int64_t set_int_dot(int64_t d) {
  TORCH_CHECK(0 <= d && d <= 2, "sybil::set_int_dot: 0 to 2, got ", d);
  sybil::int_dot() = static_cast<sybil::Dot>(d);
  return d;
}

// The float linear's wide form (float_linear.h), where sybil.native finds AVX512F + VL.
bool set_float_wide(bool on) {
  float_wide() = on;
  return on;
}

TORCH_LIBRARY(sybil, m) {
  m.def("set_threads(int n) -> int", &set_threads);
  m.def("set_int_dot(int d) -> int", &set_int_dot);
  m.def("set_float_wide(bool on) -> bool", &set_float_wide);
  m.def("pool_stats() -> Tensor", &pool_stats);
  m.def("linear(Tensor x, Tensor w, Tensor? bias, Tensor? scale) -> Tensor", &linear);
  m.def("gelu(Tensor x) -> Tensor", &gelu_tanh);
  m.def("attend(Tensor qkv, Tensor(a!) kc, Tensor(b!) vc, Tensor pos, int n_head, Tensor? rows=None) -> Tensor",
        &attend);
  m.def("blocks(Tensor x, Tensor(a!) kc, Tensor(b!) vc, Tensor pos, int n_head, float eps, Tensor?[] params, "
        "Tensor? rows=None) -> Tensor", &blocks);
}
