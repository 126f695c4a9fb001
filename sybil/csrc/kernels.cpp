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

// The score of one key: lanes summed over d in order, one horizontal sum, then the
// scalar tail. Every key is computed this way, alone or four at a time.
template <typename T>
inline float key_dot(const T* kj, const float* q, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(load8(kj + d), _mm256_loadu_ps(q + d), acc);
  float s = hsum(acc);
  for (; d < D; ++d) s += scalar(kj[d]) * q[d];
  return s;
}

// Sum over j of scores[j] * v[j, d0 .. d0 + 8 NV) in key order, times inv: NV
// independent accumulators, so the adds of one lane keep their order while the
// core overlaps the lanes' latencies.
template <int NV, typename T>
inline void weighted_sum(const float* scores, const T* vc, int64_t p, int64_t D, int64_t d0, float inv, float* out) {
  __m256 acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
  for (int64_t j = 0; j <= p; ++j) {
    const __m256 s = _mm256_set1_ps(scores[j]);
    const T* vj = vc + j * D + d0;
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(s, load8(vj + 8 * v), acc[v]);
  }
  const __m256 iv = _mm256_set1_ps(inv);
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + d0 + 8 * v, _mm256_mul_ps(acc[v], iv));
}

// One query against keys 0..p of its row and head: scores in float32 with the
// fixed dot order above, softmax, then the weighted sum of values in key order.
// The order of every sum is fixed by the query alone, never by how many queries
// share the forward.
template <typename T>
void attend_one(const float* q, const T* kc, const T* vc, int64_t p, int64_t D, float scale, float* scores,
                float* out) {
  int64_t j = 0;
  if (D % 8 == 0) {
    for (; j + 4 <= p + 1; j += 4) {  // four keys at once: four independent chains
      const T *k0 = kc + j * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(load8(k0 + d), qv, a0);
        a1 = _mm256_fmadd_ps(load8(k1 + d), qv, a1);
        a2 = _mm256_fmadd_ps(load8(k2 + d), qv, a2);
        a3 = _mm256_fmadd_ps(load8(k3 + d), qv, a3);
      }
      scores[j] = hsum(a0) * scale;
      scores[j + 1] = hsum(a1) * scale;
      scores[j + 2] = hsum(a2) * scale;
      scores[j + 3] = hsum(a3) * scale;
    }
  }
  for (; j <= p; ++j) scores[j] = key_dot(kc + j * D, q, D) * scale;
  const float inv = 1.f / sybil::exp_sum(scores, p + 1, sybil::max_of(scores, p + 1));
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) weighted_sum<8>(scores, vc, p, D, d0, inv, out);
  switch ((D - d0) / 8) {
    case 7: weighted_sum<7>(scores, vc, p, D, d0, inv, out); break;
    case 6: weighted_sum<6>(scores, vc, p, D, d0, inv, out); break;
    case 5: weighted_sum<5>(scores, vc, p, D, d0, inv, out); break;
    case 4: weighted_sum<4>(scores, vc, p, D, d0, inv, out); break;
    case 3: weighted_sum<3>(scores, vc, p, D, d0, inv, out); break;
    case 2: weighted_sum<2>(scores, vc, p, D, d0, inv, out); break;
    case 1: weighted_sum<1>(scores, vc, p, D, d0, inv, out); break;
    default: break;
  }
  for (int64_t d = d0 + (D - d0) / 8 * 8; d < D; ++d) {
    float a = 0.f;
    for (int64_t i = 0; i <= p; ++i) a += scores[i] * scalar(vc[i * D + d]);
    out[d] = a * inv;
  }
}

template <typename T>
void attend_impl(const at::Tensor& qkv, at::Tensor& kc, at::Tensor& vc, const at::Tensor& pos, const int64_t* rows,
                 int64_t H, float* y) {
  const int64_t B = qkv.size(0), Tn = qkv.size(1), C = qkv.size(2) / 3, D = C / H, L = kc.size(2);
  // the cache row of token (b, t): b itself, or rows[t] in a packed forward (B == 1)
  auto cache_row = [&](int64_t b, int64_t t) { return rows ? rows[t] : b; };
  auto qkv_f = qkv.to(at::kFloat).contiguous();
  const float* src = qkv_f.data_ptr<float>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  T* kp = kc.data_ptr<T>();
  T* vp = vc.data_ptr<T>();
  // Write this forward's keys and values at their positions first: a query sees
  // the tokens before it in the same forward, exactly as if they had been cached.
  auto qkv_c = qkv.contiguous();
  const T* raw = qkv_c.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < Tn; ++t) {
      const int64_t p = pp[b * Tn + t], cb = cache_row(b, t);
      const T* row = raw + (b * Tn + t) * 3 * C;
      for (int64_t h = 0; h < H; ++h) {
        std::copy(row + C + h * D, row + C + (h + 1) * D, kp + ((cb * H + h) * L + p) * D);
        std::copy(row + 2 * C + h * D, row + 2 * C + (h + 1) * D, vp + ((cb * H + h) * L + p) * D);
      }
    }
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  // Queries ordered (row, head, token): the tokens of one forward that share a
  // row and head run one after another, so that head's keys and values are read
  // from memory once and from cache by the rest (a verify's queries cost little
  // more than a step's). Each query's sums are the same whatever the order.
  sybil::Pool::get().run(B * Tn * H, 1, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> scores;
    scores.resize(L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i % Tn, bh = i / Tn, h = bh % H, b = bh / H, bt = b * Tn + t;
      const int64_t p = pp[bt];
      const int64_t off = ((cache_row(b, t) * H + h) * L) * D;
      attend_one(src + bt * 3 * C + h * D, kp + off, vp + off, p, D, scale, scores.data(), y + bt * C + h * D);
    }
  });
}

// Causal attention over a preallocated cache. qkv [B, T, 3C] is c_attn's output;
// its keys and values are written into kc, vc [B, H, L, D] (one layer's cache) at
// pos [B, T], then each query at position p attends to keys 0..p of its row.
// Returns [B, T, C] in qkv's dtype. pos must already be int64, contiguous and
// inside the cache (check_positions). A packed forward (B == 1: the real tokens of
// several rows one after another, no padding) gives rows [T], token t's cache row
// (check_rows); its queries still see only their own row's keys.
at::Tensor attend_checked(const at::Tensor& qkv, at::Tensor kc, at::Tensor vc, const at::Tensor& p, int64_t n_head,
                          const int64_t* rows = nullptr) {
  TORCH_CHECK(qkv.dim() == 3 && kc.dim() == 4 && vc.dim() == 4, "sybil::attend: bad ranks");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous(), "sybil::attend: cache must be contiguous");
  TORCH_CHECK(qkv.scalar_type() == kc.scalar_type(), "sybil::attend: cache dtype differs from activations");
  const int64_t B = qkv.size(0), Tn = qkv.size(1), C = qkv.size(2) / 3;
  TORCH_CHECK((rows ? B == 1 : kc.size(0) == B) && kc.size(1) == n_head && kc.size(3) * n_head == C,
              "sybil::attend: cache shape");
  TORCH_CHECK(p.numel() == B * Tn, "sybil::attend: pos must be [B, T]");
  auto y = at::empty({B, Tn, C}, qkv.options().dtype(at::kFloat));
  switch (qkv.scalar_type()) {
    case at::kFloat: attend_impl<float>(qkv, kc, vc, p, rows, n_head, y.data_ptr<float>()); break;
    case at::kBFloat16: attend_impl<bf16>(qkv, kc, vc, p, rows, n_head, y.data_ptr<float>()); break;
    default: TORCH_CHECK(false, "sybil::attend: unsupported dtype ", qkv.scalar_type());
  }
  return y.to(qkv.scalar_type());
}

// Positions as int64, contiguous, every one inside a cache of length L: a custom
// op must not write out of bounds, whatever its caller did.
at::Tensor check_positions(const at::Tensor& pos, int64_t L) {
  auto p = pos.to(at::kLong).contiguous();
  TORCH_CHECK(p.numel() == 0 || (p.min().item<int64_t>() >= 0 && p.max().item<int64_t>() < L),
              "sybil: position outside the cache");
  return p;
}

// A packed forward's cache rows as int64, one per token, each a row of a cache of
// batch Bc (nullopt: not packed).
std::optional<at::Tensor> check_rows(const std::optional<at::Tensor>& rows, int64_t tokens, int64_t Bc) {
  if (!rows) return std::nullopt;
  auto r = rows->to(at::kLong).contiguous();
  TORCH_CHECK(r.numel() == tokens, "sybil: rows must give one cache row per token");
  TORCH_CHECK(r.numel() == 0 || (r.min().item<int64_t>() >= 0 && r.max().item<int64_t>() < Bc),
              "sybil: row outside the cache");
  return r;
}

at::Tensor attend(const at::Tensor& qkv, at::Tensor kc, at::Tensor vc, const at::Tensor& pos, int64_t n_head,
                  const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(kc.dim() == 4 && qkv.dim() == 3, "sybil::attend: bad ranks");
  const auto r = check_rows(rows, qkv.size(0) * qkv.size(1), kc.size(0));
  return attend_checked(qkv, kc, vc, check_positions(pos, kc.size(2)), n_head, r ? r->data_ptr<int64_t>() : nullptr);
}

// Every transformer block of a forward in one call: the same operations, in the
// same order, as sybil.model.Block (torch's layer_norm, add and tanh GELU, the
// linear and attention above), so the bits are the same as block by block. Why:
// from Python each block is about a dozen ops, each paying the interpreter and the
// dispatcher; 24 blocks of them cost a few ms a step, as much as reading 100 MB.
// params holds 16 entries per layer: ln_1 weight, bias; c_attn weight, bias,
// scale; attn c_proj weight, bias, scale; ln_2 weight, bias; c_fc weight, bias,
// scale; mlp c_proj weight, bias, scale (scale None for float weights, the
// weight then [N, K]; packed int8 otherwise). kc, vc [layers, B, H, L, D].
constexpr int64_t PARAMS_PER_LAYER = 16;

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
