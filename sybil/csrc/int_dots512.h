// The q4 integer linear's inner loop on 512-bit registers (AVX512-BW + VNNI), for
// int_linear.h's Dot::Avx512 path.
//
// Why: on a core with full-width AVX-512 (Zen 5) a verify of 5 or 9 tokens is bound
// by the instructions per block, not by memory: vpdpbusd on ymm saved almost
// nothing over vpmaddubsw + vpmaddwd, because each 32-column block of each row pair
// still costs a dot, a conversion and an FMA. A zmm holds four rows of a q4 block,
// so each of those instructions does four times the work.
//
// (q8 has no zmm loop since its layout interleaves 8 weight rows per load: its ymm
// loop converts and scales once per block for all 8 rows, which the old zmm loop
// did for 2, so it does no more instructions per product than that loop did.)
//
// Bits: each 8-float group of a zmm is exactly one of the ymm path's accumulators:
// the same four columns per int32 lane, the same integers, converted and scaled by
// the same float, and added in the same order. So this path gives the AVX2 bits
// (tests/test_matmul.py compares them).

#pragma once

#include <immintrin.h>

#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni")

namespace sybil {

// MB rows against all 8 rows of one q4 block (acc as in int_linear.h's q4_dots: pair p's 8 lanes at
// (m * 8 + p) * 8, lanes 0-3 row 2p, 4-7 row 2p + 1; pairs 2h, 2h + 1 are one zmm).
// One 64-byte load holds four rows' nibbles; x's 16 low (high) columns go to all four
// 128-bit quarters.
template <int MB>
void q4_dots512(const int8_t* xq_all, const float* xs_all, int64_t K, const uint8_t* wblock, int64_t g0, int64_t g1,
                int64_t group_bytes, float* acc) {
  const int64_t G = K / 32;
  const __m512i low = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  const __m512i pick0 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i pick1 = _mm512_add_epi32(pick0, _mm512_set1_epi32(4));
  __m512 a[MB][2];
  for (int m = 0; m < MB; ++m)
    for (int h = 0; h < 2; ++h) a[m][h] = _mm512_loadu_ps(acc + (m * 8 + 2 * h) * 8);
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* grp = wblock + g * group_bytes;
    _mm_prefetch(reinterpret_cast<const char*>(grp) + 1024, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(grp) + 1024 + 64, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(grp) + 1024 + 128, _MM_HINT_T0);
    const __m256 ws8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(grp + 128)));
    __m512i xlo[MB], xhi[MB], corr[MB];
    __m512 sc[MB][2];
    for (int m = 0; m < MB; ++m) {
      const int8_t* xq = xq_all + m * K + g * 32;
      xlo[m] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq)));
      xhi[m] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + 16)));
      corr[m] = _mm512_sub_epi32(_mm512_setzero_si512(),
                                 _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, xlo[m]), eight,
                                                     xhi[m]));
      const __m512 s = _mm512_castps256_ps512(_mm256_mul_ps(ws8, _mm256_broadcast_ss(&xs_all[m * G + g])));
      sc[m][0] = _mm512_permutexvar_ps(pick0, s);  // rows 0-3, four lanes each
      sc[m][1] = _mm512_permutexvar_ps(pick1, s);  // rows 4-7
    }
    for (int h = 0; h < 2; ++h) {
      const __m512i v = _mm512_loadu_si512(grp + h * 64);  // rows 4h .. 4h + 3
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int m = 0; m < MB; ++m) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(corr[m], lo, xlo[m]), hi, xhi[m]);
        a[m][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc[m][h], a[m][h]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int h = 0; h < 2; ++h) _mm512_storeu_ps(acc + (m * 8 + 2 * h) * 8, a[m][h]);
}

}  // namespace sybil

#pragma GCC pop_options
