// The float linear (float32, bfloat16 and int8 weight-only weights, float32
// accumulation), included twice by kernels.cpp: as is, and inside a
// `#pragma GCC target("avx512f,avx512vl")` region with SYBIL_FLOAT_WIDE defined,
// where the same ymm instructions may use 32 registers instead of 16. Only the
// number of weight rows sharing a pass changes, never the order of a sum, so both
// give the same bits (tests/test_matmul.py); sybil.native picks the wide one where
// the flags show AVX512F and AVX512VL (`python -m bench.forms` on a 2-core Zen 5,
// float32 gpt2-medium with 256 tokens cached: a 9-token forward 57.9 ms against 60.3,
// 5 tokens 46.1 against 46.5, one token alike: a few percent, from the x loads saved).
//
// No #pragma once: each inclusion defines its own copy, in the namespace around it.

#ifdef SYBIL_FLOAT_WIDE
constexpr bool kWide = true;
#else
constexpr bool kWide = false;
#endif

constexpr int64_t NBLOCK = 8;   // output channels per task: the unit of the thread split
constexpr int MAX_MB = 3;       // rows per pass: 3 rows x 4 channels = 12 running sums in 16 registers (x 8 in 32)
constexpr int64_t KC = 512;     // columns per chunk: the block's chunk stays in L1 for every pass
constexpr int64_t M_CHUNK = 48; // rows whose running sums a task keeps in memory

// MB rows of x against NB rows of w over columns k0..k1 (multiples of 8), adding
// into 8-lane running sums acc[m][n] (rows NBLOCK * 8 floats apart). Every dot
// product is accumulated lane-wise over k in order, chunk after chunk, then
// reduced by one fixed hsum: MB, NB, the chunking and the thread split decide
// only which sums share a pass over the weights, never the order inside a sum.
// Weights are addressed as w[n * rs + (k / 8) * ks + k % 8]: a plain [N, K]
// matrix has rs = K, ks = 8; the packed layout (8 rows interleaved in groups of
// 8 columns, so a block of 8 rows is one sequential stream) has rs = 8, ks = 64.
template <typename W, int MB, int NB>
inline void dots(const float* x, int64_t K, const W* w, int64_t rs, int64_t ks, int64_t k0, int64_t k1, float* acc) {
  __m256 a[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) a[m][n] = _mm256_loadu_ps(acc + (m * NBLOCK + n) * 8);
  for (int64_t k = k0; k < k1; k += 8) {
    for (int n = 0; n < NB; ++n) {
      // int8: ask for the packed stream 1 KiB ahead (measured: 0.36 -> 0.31 of the
      // time to sum the same float32 layer; for float32 the same hint cost 10%).
      if (sizeof(W) == 1 && n == 0)
        _mm_prefetch(reinterpret_cast<const char*>(w + (k >> 3) * ks) + 1024, _MM_HINT_T0);
      const __m256 wv = load8(w + n * rs + (k >> 3) * ks);
      for (int m = 0; m < MB; ++m) a[m][n] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), a[m][n]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) _mm256_storeu_ps(acc + (m * NBLOCK + n) * 8, a[m][n]);
}

// MB rows against nb <= NBLOCK weight rows. One row shares a pass with 8 weight
// rows, more rows with 4, so that 8 to 12 independent sums are in flight; with 32
// registers (kWide) every pass takes all 8, and each x load serves 8 weight rows.
template <typename W, int MB>
inline void pass(const float* x, int64_t K, const W* w, int64_t rs, int64_t ks, int64_t nb, int64_t k0, int64_t k1,
                 float* acc) {
  constexpr int NB = MB == 1 || kWide ? 8 : 4;
  int64_t n = 0;
  for (; n + NB <= nb; n += NB) dots<W, MB, NB>(x, K, w + n * rs, rs, ks, k0, k1, acc + n * 8);
  for (; n < nb; ++n) dots<W, MB, 1>(x, K, w + n * rs, rs, ks, k0, k1, acc + n * 8);
}

template <typename W>
inline void pass_any(int mb, const float* x, int64_t K, const W* w, int64_t rs, int64_t ks, int64_t nb, int64_t k0,
                     int64_t k1, float* acc) {
  switch (mb) {
    case 1: pass<W, 1>(x, K, w, rs, ks, nb, k0, k1, acc); break;
    case 2: pass<W, 2>(x, K, w, rs, ks, nb, k0, k1, acc); break;
    default: pass<W, 3>(x, K, w, rs, ks, nb, k0, k1, acc); break;
  }
}

template <typename W>
void linear_impl(const float* x, int64_t M, int64_t K, const W* w, bool packed, int64_t N, const float* scale,
                 const float* bias, float* y) {
  const int64_t rs = packed ? 8 : K, ks = packed ? 64 : 8;  // a block of 8 rows is 8 * K elements either way
  const int64_t kv = K & ~int64_t(7);
  const int64_t blocks = (N + NBLOCK - 1) / NBLOCK;
  // Enough weights per task that thread start-up stays small next to the reads.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / (NBLOCK * std::max<int64_t>(K, 1)));
  sybil::Pool::get().run(blocks, grain, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> acc;
    acc.resize(M_CHUNK * NBLOCK * 8);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NBLOCK, nb = std::min(NBLOCK, N - n0);
      const W* wb = w + b * NBLOCK * K;
      for (int64_t m0 = 0; m0 < M; m0 += M_CHUNK) {
        const int64_t mc = std::min(M_CHUNK, M - m0), passes = (mc + MAX_MB - 1) / MAX_MB;
        std::fill(acc.begin(), acc.begin() + mc * NBLOCK * 8, 0.f);
        // Every pass uses a chunk of the block while it is in L1: the first pass
        // streams it from memory, the others compute, so the two overlap.
        for (int64_t k0 = 0; k0 < kv; k0 += KC) {
          const int64_t k1 = std::min(k0 + KC, kv);
          int64_t mm = 0;
          for (int64_t p = 0; p < passes; ++p) {
            const int64_t mb = (mc - mm) / (passes - p);  // near-equal passes of at most MAX_MB rows
            pass_any<W>(static_cast<int>(mb), x + (m0 + mm) * K, K, wb, rs, ks, nb, k0, k1,
                        acc.data() + mm * NBLOCK * 8);
            mm += mb;
          }
        }
        for (int64_t m = 0; m < mc; ++m)
          for (int64_t n = 0; n < nb; ++n) {
            float v = hsum(_mm256_loadu_ps(acc.data() + (m * NBLOCK + n) * 8));
            for (int64_t k = kv; k < K; ++k) v += scalar(wb[n * rs + (k >> 3) * ks + (k & 7)]) * x[(m0 + m) * K + k];
            if (scale) v *= scale[n0 + n];
            if (bias) v += bias[n0 + n];
            y[(m0 + m) * N + n0 + n] = v;
          }
      }
    }
  });
}
