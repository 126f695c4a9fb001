// Causal attention over Sybil's preallocated KV cache: each query at position p
// reads keys 0..p of its row in a fixed order, so a query's output is the same bits
// in a one-token step and inside a verify forward, whatever else the forward holds.
// Included by kernels.cpp inside its namespace (it uses load8, scalar and hsum from
// there), as float_linear.h is.

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
