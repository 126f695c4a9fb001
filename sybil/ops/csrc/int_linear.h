// Integer linears: int8 activations against int8 (W8A8) or 4-bit weights, with
// integer dot products (AVX2 vpmaddubsw / vpmaddwd, or VNNI's vpdpbusd where the
// CPU has it), as llama.cpp's Q8_0 and Q4_0 do on a CPU.
//
// Why: converting every int8 weight to float32 and multiplying in float32 (the
// weight-only path of kernels.cpp) is compute-bound on 2 AVX2 cores: a step of
// int8 gpt2-medium took 26-32 ms against a memory floor of 10-16 ms, and a verify
// of 9 tokens about 3x a step. An integer multiply-add does 32 products per
// instruction pair instead of 8.
//
// Activations: each row is quantized at the input of every linear, per block of
// 32 columns (a float32 scale per block: blocks keep GPT-2's few huge activation
// channels from flattening the rest of the row, see the README's accuracy table).
//
// Bits: each block's dot product is an exact int32 sum; the blocks of a row are
// accumulated in float32 in a fixed order (one lane per weight row, the blocks one
// after another), and a row is quantized on its own. So a row's result is
// the same whatever the row count, blocking or thread split: a decode step and a
// verify give the same bits, as on every other path.
//
// VNNI: vpdpbusd adds the four u8 x s8 products of each int32 lane in one
// instruction, where AVX2 needs vpmaddubsw (pairs, int16) then vpmaddwd (pairs of
// pairs). Both give each block the same exact integer (the operands differ, see
// q8_dots), so the VNNI path gives the same bits as the AVX2 path
// (tests/test_matmul.py checks it). It is
// written as inline assembly: no function needs a target attribute, and the
// library builds with -mavx2 on any machine; sybil.native picks the path from the
// CPU's flags and sets it here (set_int_dot), never assuming it.
//
// Layouts (made by sybil/quant.py), for each block of 8 output rows, per group of
// 32 columns, one sequential stream:
//   q8: [N/8, K/32, 8 quads, 8 rows, 4 int8]   (w ~ q * scale[n]; quad j: columns 4j..4j+3)
//   q4: [N/8, K/32, 4 quads x 8 rows x 4 bytes of nibbles, 8 float16 scales]
//       (w ~ (nib - 8) * s; quad j's byte c holds column 4j + c in its low nibble
//       and 16 + 4j + c in its high one, llama.cpp's Q4_0 pairing)
// so that one 32-byte load holds 8 weight rows' 4 (q8) or 8 (q4) columns.

#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include "pool.h"
#include "simd.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sybil {

constexpr int64_t QK = 32;         // columns per quantization block
constexpr int64_t Q4_GROUP = 144;  // bytes of one q4 group of 8 rows: 8 x 16 nibble bytes + 8 float16 scales

// One row quantized: q[k] = round(x[k] / s[b]) with s[b] = max |x| over block b / 127
// (0 for an all-zero block), and c[b] = -128 * (sum of block b's q), the VNNI q8
// dots' correction (q8_dots).
inline void quantize_row(const float* x, int64_t K, int8_t* q, float* s, int32_t* c) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t b = 0; b < K / QK; ++b) {
    const float* xb = x + b * QK;
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < QK; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    s[b] = amax / 127.f;
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i v[4];
    for (int i = 0; i < 4; ++i)
      v[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * i), inv),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i v4 = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(v4), _mm256_extracti128_si256(v4, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    c[b] = -128 * _mm_cvtsi128_si32(t);
    // int32 x 32 -> int8 x 32; the packs interleave 128-bit lanes, the permute restores the order
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK), p);
  }
}

// Activations [M, K] quantized once per linear, row by row.
struct QRows {
  std::vector<int8_t> q;
  std::vector<float> s;
  std::vector<int32_t> c;
  int64_t M = 0, K = 0;
  QRows(const float* x, int64_t M_, int64_t K_) : q(M_ * K_), s(M_ * (K_ / QK)), c(M_ * (K_ / QK)), M(M_), K(K_) {
    Pool::get().run(M, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        quantize_row(x + m * K, K, q.data() + m * K, s.data() + m * (K / QK), c.data() + m * (K / QK));
    });
  }
};

// How a block's products are summed: which instructions, same integers.
enum class Dot { Avx2 = 0, AvxVnni = 1, Avx512Vnni = 2 };

// acc + in each int32 lane the sum of its four u8 (u) x s8 (s) byte products. The
// AVX2 form is exact where no pair of products passes int16 (every use here).
template <Dot D>
inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {
  if constexpr (D == Dot::AvxVnni) {
    asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));  // AVX-VNNI (VEX)
  } else if constexpr (D == Dot::Avx512Vnni) {
    asm("vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));  // AVX512-VNNI + VL (EVEX)
  } else {
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
  return acc;
}

// acc + in each int32 lane the sum of u's four u8 bytes times the four s8 bytes at
// p (the same four for every lane): VNNI only. AVX512-VNNI reads and broadcasts
// them in the multiply-add itself.
template <Dot D>
inline __m256i dot4_bcast(__m256i acc, __m256i u, const int8_t* p) {
  if constexpr (D == Dot::Avx512Vnni) {
    asm("vpdpbusd %2%{1to8%}, %1, %0" : "+x"(acc) : "x"(u), "m"(*reinterpret_cast<const int32_t*>(p)));
  } else {
    int32_t four;
    std::memcpy(&four, p, 4);
    acc = dot4<D>(acc, u, _mm256_set1_epi32(four));
  }
  return acc;
}

// MB rows against one 8-row q8 block over groups g0..g1, adding into 8-lane float
// sums acc[m] (row m's 8 floats; lane n is weight row n). A group is 8 loads, each
// of the 8 weight rows' next 4 columns; the row's 4 activation bytes go to every
// lane, so each lane accumulates its weight row's exact int32 block sum, and the
// block costs one conversion and one FMA for all 8 weight rows, where a layout of
// whole rows needs them per weight row (and a horizontal sum at the end).
// AVX2, the sign trick: |w| is the unsigned operand (once per load, for every row),
// x with w's sign the signed one; |w|, |x| <= 127, so vpmaddubsw's pairwise int16
// sums cannot saturate. VNNI has no int16 step to saturate: w + 128 (w xor 0x80,
// once per load) is the unsigned operand and x itself the signed one, so a row
// costs one instruction per load instead of three; the lane starts from
// -128 * sum(x) of the block (QRows::c), which leaves sum w * x: the same integers.
template <Dot D, int MB>
inline void q8_dots(const QRows& x, int64_t m0, const int8_t* wblock, int64_t g0, int64_t g1, float* acc) {
  const int64_t K = x.K, G = K / QK;
  __m256 a[MB];
  for (int m = 0; m < MB; ++m) a[m] = _mm256_loadu_ps(acc + m * 8);
  for (int64_t g = g0; g < g1; ++g) {
    const int8_t* wg = wblock + g * 8 * QK;
    // Ask for the stream 2 KiB ahead: a block's groups are short runs that the
    // hardware prefetcher alone does not keep ahead of.
    for (int line = 0; line < 4; ++line) _mm_prefetch(reinterpret_cast<const char*>(wg) + 2048 + 64 * line, _MM_HINT_T0);
    const int8_t* xq = x.q.data() + m0 * K + g * QK;
    __m256i d[MB];
    if constexpr (D == Dot::Avx2) {
      for (int m = 0; m < MB; ++m) d[m] = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + j * 32));  // rows 0-7, columns 4j..4j+3
        const __m256i aw = _mm256_abs_epi8(w);
        for (int m = 0; m < MB; ++m) {
          int32_t four;
          std::memcpy(&four, xq + m * K + 4 * j, 4);
          d[m] = dot4<D>(d[m], aw, _mm256_sign_epi8(_mm256_set1_epi32(four), w));
        }
      }
    } else {
      const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
      for (int m = 0; m < MB; ++m) d[m] = _mm256_set1_epi32(x.c[(m0 + m) * G + g]);
      for (int j = 0; j < 8; ++j) {
        const __m256i wu = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + j * 32)), flip);
        for (int m = 0; m < MB; ++m) d[m] = dot4_bcast<D>(d[m], wu, xq + m * K + 4 * j);
      }
    }
    for (int m = 0; m < MB; ++m)
      a[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[m]), _mm256_broadcast_ss(&x.s[(m0 + m) * G + g]), a[m]);
  }
  for (int m = 0; m < MB; ++m) _mm256_storeu_ps(acc + m * 8, a[m]);
}

// MB rows against one 8-row q4 block over groups g0..g1, as q8_dots: one lane per
// weight row. A group is 4 loads, each holding the 8 rows' columns 4j..4j+3 in its
// low nibbles and 16+4j..16+4j+3 in its high ones; the nibbles are used unsigned
// (0..15) and the lane starts from -8 * sum(x) of the block (QRows::c / 16), which
// leaves sum (u - 8) * x: exact in int32. Then times (row's d) * (x's block scale):
// one conversion and one FMA per block for all 8 rows.
// AVX2: vpmaddubsw's int16 pairs of u <= 15 against |x| <= 127 sum to at most 3810,
// so a row's 16 products per lane of the whole block stay within int16 (30480) and
// one vpmaddwd widens them per block.
template <Dot D, int MB>
inline void q4_dots(const QRows& x, int64_t m0, const uint8_t* wblock, int64_t g0, int64_t g1, float* acc) {
  const int64_t K = x.K, G = K / QK;
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 a[MB];
  for (int m = 0; m < MB; ++m) a[m] = _mm256_loadu_ps(acc + m * 8);
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* grp = wblock + g * Q4_GROUP;
    for (int line = 0; line < 3; ++line) _mm_prefetch(reinterpret_cast<const char*>(grp) + 1024 + 64 * line, _MM_HINT_T0);
    const __m256 ws8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(grp + 128)));
    const int8_t* xq = x.q.data() + m0 * K + g * QK;
    __m256i d[MB];
    if constexpr (D == Dot::Avx2) {
      for (int m = 0; m < MB; ++m) d[m] = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + j * 32));
        const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int m = 0; m < MB; ++m) {
          int32_t xl, xh;
          std::memcpy(&xl, xq + m * K + 4 * j, 4);
          std::memcpy(&xh, xq + m * K + 16 + 4 * j, 4);
          d[m] = _mm256_add_epi16(d[m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(xl)),
                                                         _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xh))));
        }
      }
      for (int m = 0; m < MB; ++m)
        d[m] = _mm256_add_epi32(_mm256_madd_epi16(d[m], _mm256_set1_epi16(1)),
                                _mm256_set1_epi32(x.c[(m0 + m) * G + g] / 16));
    } else {
      for (int m = 0; m < MB; ++m) d[m] = _mm256_set1_epi32(x.c[(m0 + m) * G + g] / 16);
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + j * 32));
        const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int m = 0; m < MB; ++m) {
          d[m] = dot4_bcast<D>(d[m], lo, xq + m * K + 4 * j);
          d[m] = dot4_bcast<D>(d[m], hi, xq + m * K + 16 + 4 * j);
        }
      }
    }
    for (int m = 0; m < MB; ++m)
      a[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[m]), _mm256_mul_ps(ws8, _mm256_broadcast_ss(&x.s[(m0 + m) * G + g])),
                             a[m]);
  }
  for (int m = 0; m < MB; ++m) _mm256_storeu_ps(acc + m * 8, a[m]);
}

template <bool Q4, Dot D, int MB>
inline void int_pass(const QRows& x, int64_t m0, const void* wb, int64_t g0, int64_t g1, float* acc) {
  if constexpr (Q4)
    q4_dots<D, MB>(x, m0, static_cast<const uint8_t*>(wb), g0, g1, acc);
  else
    q8_dots<D, MB>(x, m0, static_cast<const int8_t*>(wb), g0, g1, acc);
}

// y [M, N] = x [M, K] against an integer weight (layouts above), times scale[n]
// (q8) and plus bias[n]; float32 out.
template <bool Q4, Dot D>
void int_linear_with(const float* x, int64_t M, int64_t K, const void* w, int64_t N, const float* scale,
                const float* bias, float* y) {
  const QRows xq(x, M, K);
  const int64_t G = K / QK, blocks = (N + 7) / 8;
  const int64_t block_bytes = Q4 ? G * Q4_GROUP : G * 8 * QK;
  constexpr int64_t GC = 16;      // groups per chunk: a block's chunk (4 KiB q8) stays in L1 for every pass
  constexpr int64_t M_CHUNK = 48;
  // Rows per pass: each row holds 2 registers (its block sums and its float sums).
  constexpr int MAX_MB = 5;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(block_bytes, 1));
  Pool::get().run(blocks, grain, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> acc;
    acc.resize(M_CHUNK * 8);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 8, nb = std::min<int64_t>(8, N - n0);
      const uint8_t* wb = static_cast<const uint8_t*>(w) + b * block_bytes;
      for (int64_t m0 = 0; m0 < M; m0 += M_CHUNK) {
        const int64_t mc = std::min(M_CHUNK, M - m0), passes = (mc + MAX_MB - 1) / MAX_MB;
        std::fill(acc.begin(), acc.begin() + mc * 8, 0.f);
        for (int64_t g0 = 0; g0 < G; g0 += GC) {
          const int64_t g1 = std::min(g0 + GC, G);
          int64_t mm = 0;
          for (int64_t p = 0; p < passes; ++p) {
            const int64_t mb = (mc - mm) / (passes - p);
            float* ap = acc.data() + mm * 8;
            switch (mb) {
              case 1: int_pass<Q4, D, 1>(xq, m0 + mm, wb, g0, g1, ap); break;
              case 2: int_pass<Q4, D, 2>(xq, m0 + mm, wb, g0, g1, ap); break;
              case 3: int_pass<Q4, D, 3>(xq, m0 + mm, wb, g0, g1, ap); break;
              case 4: int_pass<Q4, D, 4>(xq, m0 + mm, wb, g0, g1, ap); break;
              default: int_pass<Q4, D, 5>(xq, m0 + mm, wb, g0, g1, ap); break;
            }
            mm += mb;
          }
        }
        for (int64_t m = 0; m < mc; ++m)
          for (int64_t n = 0; n < nb; ++n) {
            float v = acc[m * 8 + n];
            if (scale) v *= scale[n0 + n];
            if (bias) v += bias[n0 + n];
            y[(m0 + m) * N + n0 + n] = v;
          }
      }
    }
  });
}

// The dot products in use: sybil.native sets them from the CPU's flags at load.
inline Dot& int_dot() {
  static Dot d = Dot::Avx2;
  return d;
}

template <bool Q4>
void int_linear(const float* x, int64_t M, int64_t K, const void* w, int64_t N, const float* scale,
                const float* bias, float* y) {
  switch (int_dot()) {
    case Dot::AvxVnni: return int_linear_with<Q4, Dot::AvxVnni>(x, M, K, w, N, scale, bias, y);
    case Dot::Avx512Vnni: return int_linear_with<Q4, Dot::Avx512Vnni>(x, M, K, w, N, scale, bias, y);
    default: return int_linear_with<Q4, Dot::Avx2>(x, M, K, w, N, scale, bias, y);
  }
}

}  // namespace sybil
