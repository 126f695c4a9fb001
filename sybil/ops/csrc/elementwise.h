// Element-wise kernels: exp (and the softmax's sums) and GPT-2's tanh GELU on 8
// floats at a time.
//
// Why: torch's tanh GELU took 3.1 ms of a 9-token int8 gpt2-medium forward
// (24 calls on [9, 4096], 2-core Zen 3), about 10 cycles an element; this one is
// a few instructions per 8. The result of an element depends on that element
// alone, so a row's bits never depend on the others in the forward.

#pragma once

#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace sybil {

// e^x, within about 2 ulp over the float range (Cody-Waite reduction by ln 2 in
// two parts, then a degree-6 polynomial for e^r on |r| <= ln2 / 2). Below -87.3
// it gives 0 (not denormals), above 88.7 infinity.
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.7228f), lo = _mm256_set1_ps(-87.3365f);
  const __m256 big = _mm256_cmp_ps(x, hi, _CMP_GT_OQ), small = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 = 0.693359375 - 2.12194440e-4
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // times 2^n, n in [-126, 128]: 2^n as (n + 127) << 23 would overflow at 128, so two halves
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i h1 = _mm256_srai_epi32(ni, 1), h2 = _mm256_sub_epi32(ni, h1);
  const __m256i bias = _mm256_set1_epi32(127);
  p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, bias), 23)));
  p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, bias), 23)));
  p = _mm256_blendv_ps(p, _mm256_set1_ps(INFINITY), big);
  return _mm256_andnot_ps(small, p);
}

// GPT-2's GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), written
// as x / (1 + e^(-2u)) (the same function: 1 + tanh(u) = 2 / (1 + e^(-2u))).
inline __m256 gelu8(__m256 x) {
  const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
  const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                 _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
  const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.f), u));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e));
}

// f of one float through the 8-lane form: a vector tail gets the body's bits.
template <__m256 (*F)(__m256)>
inline float one(float x) {
  alignas(32) float v[8] = {x};
  _mm256_store_ps(v, F(_mm256_load_ps(v)));
  return v[0];
}

// s[i] = e^(s[i] - mx) for i < n; returns their sum, 8 lanes then a fixed horizontal
// sum then the tail in order: an order set by n alone.
inline float exp_sum(float* s, int64_t n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), m));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (; i < n; ++i) sum += (s[i] = one<exp8>(s[i] - mx));
  return sum;
}

// max of s[0 .. n) (exact: a max does not depend on the order)
inline float max_of(const float* s, int64_t n) {
  __m256 acc = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(s + i));
  alignas(32) float v[8];
  _mm256_store_ps(v, acc);
  float mx = v[0];
  for (int k = 1; k < 8; ++k) mx = std::max(mx, v[k]);
  for (; i < n; ++i) mx = std::max(mx, s[i]);
  return mx;
}

// y[i] = gelu(x[i]) for i < n (y may be x).
inline void gelu(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, gelu8(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) y[i] = one<gelu8>(x[i]);
}

}  // namespace sybil
