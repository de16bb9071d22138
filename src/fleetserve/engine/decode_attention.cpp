// Decode attention over the paged KV cache: one query token per sequence, its keys and values read from the
// cache slots its block table names. Built at run time by engine/decode_kernel.py and used by compiled decode
// steps, where the general path would first gather every sequence's context into a contiguous copy.
//
// q [B, Hkv, G, D] (G query heads share each KV head); kv_cache [S, 2, Hkv, D], float or bfloat16;
// slots [B, L] int64; mask [B, 1, 1, L] or [B, L] bool, true on a prefix of each row (the context), false after.
// Returns [B, Hkv, G, D] in q's dtype. Sums and the softmax are in float32.
//
// write_slots puts a step's keys and values into the cache before they are attended: k, v [T, Hkv, D] (float32
// or bfloat16, rows of any stride), row t into slot slots[t], converted to the cache's dtype as .to() rounds.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "shared_work.h"
#include "vector_loads.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float to_float(float x) { return x; }

inline float to_float(at::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

constexpr int64_t kChunk = 64;  // context tokens per task: a task reads whole slots, every head of each

#ifdef __AVX512F__
// e^x for 16 lanes: 2^(x log2 e) as 2^n (scalef) times a degree-6 polynomial for 2^f, |f| <= 1/2 (relative
// error about 1e-7, float32's own); lanes below -87 give 0, as expf's underflow does.
inline __m512 exp16(__m512 x) {
  const __m512 y = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

inline float dot(const float* a, const float* b, int64_t dim) {
#ifdef __AVX512F__
  if (dim % 16 == 0) {
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
    for (int64_t d = 16; d < dim; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < dim; ++d) s += a[d] * b[d];
  return s;
}

// sr[t] = exp(sr[t] - m) for t < n; returns their sum.
inline float exp_shifted(float* sr, int64_t n, float m) {
#ifdef __AVX512F__
  __m512 sum = _mm512_setzero_ps();
  const __m512 shift = _mm512_set1_ps(m);
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 lanes = n - t >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - t)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, sr + t), shift));
    _mm512_mask_storeu_ps(sr + t, lanes, e);
    sum = _mm512_mask_add_ps(sum, lanes, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    sr[t] = std::exp(sr[t] - m);
    sum += sr[t];
  }
  return sum;
#endif
}

// For each of ``rows`` rows of a chunk's scores (kChunk apart, n of them): their maximum into top, exp(score -
// maximum) in place, and the sum of those into total.
inline void softmax_pieces(float* scores, int64_t rows, int64_t n, float* top, float* total) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = scores + r * kChunk;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) m = std::max(m, sr[t]);
    top[r] = m;
    total[r] = exp_shifted(sr, n, m);
  }
}

// One task: the tokens [t0, t1) of sequence b, every KV head. Leaves, per (head, query head), the chunk's score
// maximum, its sum of exp(score - maximum) and the values weighted by those (softmax merged across chunks after).
template <typename T>
void attend_chunk(const float* qb, const T* cache, const int64_t* sl, int64_t t0, int64_t t1, int64_t heads,
                  int64_t group, int64_t dim, float scale, float* scores, float* row, float* top, float* total,
                  float* acc) {
  const int64_t slot_stride = 2 * heads * dim;  // one slot: the keys of every KV head, then the values
  const int64_t rows = heads * group, n = t1 - t0;
  for (int64_t t = 0; t < n; ++t) {
    const T* k = cache + sl[t0 + t] * slot_stride;
    for (int64_t d = 0; d < heads * dim; ++d) row[d] = to_float(k[d]);
    for (int64_t r = 0; r < rows; ++r) scores[r * kChunk + t] = dot(qb + r * dim, row + (r / group) * dim, dim) * scale;
  }
  softmax_pieces(scores, rows, n, top, total);
  std::fill(acc, acc + rows * dim, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const T* v = cache + sl[t0 + t] * slot_stride + heads * dim;
    for (int64_t d = 0; d < heads * dim; ++d) row[d] = to_float(v[d]);
    for (int64_t r = 0; r < rows; ++r) {
      const float p = scores[r * kChunk + t];
      const float* vr = row + (r / group) * dim;
      float* a = acc + r * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) a[d] += p * vr[d];
    }
  }
}

#ifdef __AVX512F__
using fleetserve::load16;

// R query rows of one KV head against the chunk's values, weighted by their scores: the value vector of each token
// is read into registers once for the R rows, and the R weighted sums stay in registers across the tokens.
template <typename T, int DV, int R>
inline void weigh_values(const T* cache, const int64_t* sl, int64_t n, int64_t slot_stride, int64_t offset,
                         const float* scores, float* acc) {
  __m512 o[R][DV];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < DV; ++i) o[r][i] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const T* v = cache + sl[t] * slot_stride + offset;
    __m512 vt[DV];
    for (int i = 0; i < DV; ++i) vt[i] = load16(v + 16 * i);
    for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(scores[r * kChunk + t]);
      for (int i = 0; i < DV; ++i) o[r][i] = _mm512_fmadd_ps(p, vt[i], o[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < DV; ++i) _mm512_storeu_ps(acc + r * DV * 16 + 16 * i, o[r][i]);
}

// attend_chunk for a head size of 16 * DV on AVX-512, with the same arithmetic in the same order: each token's
// key is read into registers once for its head's query rows, and the values' weighted sums stay in registers
// (the general path keeps them in memory and converts every key and value row into a buffer first).
template <typename T, int DV>
void attend_chunk_vec(const float* qb, const T* cache, const int64_t* sl, int64_t t0, int64_t t1, int64_t heads,
                      int64_t group, float scale, float* scores, float* top, float* total, float* acc) {
  constexpr int64_t dim = 16 * DV;
  constexpr int kRows = 16 / DV;  // rows whose value sums fit in registers at once
  const int64_t slot_stride = 2 * heads * dim, n = t1 - t0;
  sl += t0;
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t t = 0; t < n; ++t) {
      const T* k = cache + sl[t] * slot_stride + h * dim;
      __m512 kt[DV];
      for (int i = 0; i < DV; ++i) kt[i] = load16(k + 16 * i);
      for (int64_t g = 0; g < group; ++g) {
        const float* q = qb + (h * group + g) * dim;
        __m512 s = _mm512_mul_ps(_mm512_loadu_ps(q), kt[0]);
        for (int i = 1; i < DV; ++i) s = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * i), kt[i], s);
        scores[(h * group + g) * kChunk + t] = _mm512_reduce_add_ps(s) * scale;
      }
    }
  }
  softmax_pieces(scores, heads * group, n, top, total);
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t offset = (heads + h) * dim;
    for (int64_t g = 0; g < group; g += kRows) {
      const int64_t r = h * group + g;
      switch (std::min<int64_t>(kRows, group - g)) {
#define FLEETSERVE_ROWS(R)                                                                                  \
  case R:                                                                                                  \
    if constexpr (R <= kRows) weigh_values<T, DV, R>(cache, sl, n, slot_stride, offset, scores + r * kChunk, \
                                                     acc + r * dim);                                      \
    break;
        FLEETSERVE_ROWS(1) FLEETSERVE_ROWS(2) FLEETSERVE_ROWS(3) FLEETSERVE_ROWS(4)
#undef FLEETSERVE_ROWS
        default: break;
      }
    }
  }
}
#endif

template <typename T>
void attend(const float* q, const T* cache, const int64_t* slots, const bool* mask, float* out, int64_t batch,
            int64_t heads, int64_t group, int64_t dim, int64_t width, float scale) {
  const int64_t rows = heads * group;
  const int64_t chunks = (width + kChunk - 1) / kChunk;
  std::vector<int64_t> lengths(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const bool* valid = mask + b * width;
    int64_t n = 0;
    while (n < width && valid[n]) ++n;  // the context is a prefix of the row
    lengths[b] = n;
  }
  std::vector<float> top(batch * chunks * rows), total(batch * chunks * rows), acc(batch * chunks * rows * dim);
  fleetserve::share_work(batch * chunks, [&](int64_t task) {
    thread_local std::vector<float> scores, row;
    scores.resize(rows * kChunk);
    row.resize(heads * dim);
    const int64_t b = task / chunks, t0 = (task % chunks) * kChunk;
    const int64_t t1 = std::min(lengths[b], t0 + kChunk);
    if (t0 >= t1) return;
    const float* qb = q + b * rows * dim;
    const int64_t* sl = slots + b * width;
    float *tp = top.data() + task * rows, *tt = total.data() + task * rows, *ta = acc.data() + task * rows * dim;
#ifdef __AVX512F__
    if (dim == 64) return attend_chunk_vec<T, 4>(qb, cache, sl, t0, t1, heads, group, scale, scores.data(), tp, tt,
                                                 ta);
    if (dim == 128) return attend_chunk_vec<T, 8>(qb, cache, sl, t0, t1, heads, group, scale, scores.data(), tp, tt,
                                                  ta);
#endif
    attend_chunk(qb, cache, sl, t0, t1, heads, group, dim, scale, scores.data(), row.data(), tp, tt, ta);
  });
  for (int64_t b = 0; b < batch; ++b) {  // merge the chunks' softmax pieces
    const int64_t used = (lengths[b] + kChunk - 1) / kChunk;
    for (int64_t r = 0; r < rows; ++r) {
      float* o = out + (b * rows + r) * dim;
      std::fill(o, o + dim, 0.f);
      if (used == 0) continue;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < used; ++c) m = std::max(m, top[(b * chunks + c) * rows + r]);
      float sum = 0.f;
      for (int64_t c = 0; c < used; ++c) {
        const int64_t i = (b * chunks + c) * rows + r;
        const float w = std::exp(top[i] - m);
        sum += w * total[i];
        const float* a = acc.data() + i * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] += w * a[d];
      }
      const float inv = 1.f / sum;
      for (int64_t d = 0; d < dim; ++d) o[d] *= inv;
    }
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& slots,
                            const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, Hkv, G, D]");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(1) == 2, "kv_cache must be [S, 2, Hkv, D]");
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  const int64_t batch = q.size(0), heads = q.size(1), group = q.size(2), dim = q.size(3);
  TORCH_CHECK(kv_cache.size(2) == heads && kv_cache.size(3) == dim, "kv_cache's heads and head size must match q's");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == batch && slots.scalar_type() == at::kLong,
              "slots must be int64 [B, L]");
  const int64_t width = slots.size(1);
  TORCH_CHECK(mask.numel() == batch * width && mask.scalar_type() == at::kBool, "mask must be bool [B, 1, 1, L]");
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const at::Tensor sl = slots.contiguous();
  const at::Tensor valid = mask.reshape({batch, width}).contiguous();
  at::Tensor out = at::empty_like(qf);
  if (kv_cache.scalar_type() == at::kBFloat16) {
    attend(qf.data_ptr<float>(), kv_cache.data_ptr<at::BFloat16>(), sl.data_ptr<int64_t>(), valid.data_ptr<bool>(),
           out.data_ptr<float>(), batch, heads, group, dim, width, static_cast<float>(scale));
  } else {
    TORCH_CHECK(kv_cache.scalar_type() == at::kFloat, "kv_cache must be float32 or bfloat16");
    attend(qf.data_ptr<float>(), kv_cache.data_ptr<float>(), sl.data_ptr<int64_t>(), valid.data_ptr<bool>(),
           out.data_ptr<float>(), batch, heads, group, dim, width, static_cast<float>(scale));
  }
  return out.to(q.scalar_type());
}

inline void store(float x, float* dst) { *dst = x; }
inline void store(float x, at::BFloat16* dst) { *dst = at::BFloat16(x); }  // round to nearest even, as .to()

// A [T, Hkv, D] tensor's data and its strides along T and Hkv.
template <typename S>
struct Rows {
  const S* data;
  int64_t row, head;
  Rows(const at::Tensor& x) : data(x.data_ptr<S>()), row(x.stride(0)), head(x.stride(1)) {}
  const S* at(int64_t t, int64_t h) const { return data + t * row + h * head; }
};

template <typename S, typename C>
void write_rows(C* cache, const int64_t* slots, const Rows<S>& k, const Rows<S>& v, int64_t rows, int64_t heads,
                int64_t dim) {
  for (int64_t t = 0; t < rows; ++t) {
    C* slot = cache + slots[t] * 2 * heads * dim;
    for (int64_t h = 0; h < heads; ++h) {
      const S* kh = k.at(t, h);
      const S* vh = v.at(t, h);
      for (int64_t d = 0; d < dim; ++d) {
        store(to_float(kh[d]), slot + h * dim + d);
        store(to_float(vh[d]), slot + (heads + h) * dim + d);
      }
    }
  }
}

template <typename C>
void write_as(at::Tensor& kv_cache, const int64_t* slots, const at::Tensor& k, const at::Tensor& v) {
  const int64_t rows = k.size(0), heads = k.size(1), dim = k.size(2);
  C* cache = kv_cache.data_ptr<C>();
  if (k.scalar_type() == at::kFloat) {
    write_rows(cache, slots, Rows<float>(k), Rows<float>(v), rows, heads, dim);
  } else {
    write_rows(cache, slots, Rows<at::BFloat16>(k), Rows<at::BFloat16>(v), rows, heads, dim);
  }
}

void write_slots(at::Tensor kv_cache, const at::Tensor& slots, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(1) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous [S, 2, Hkv, D]");
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(),
              "k and v must be [T, Hkv, D] alike");
  TORCH_CHECK(k.size(1) == kv_cache.size(2) && k.size(2) == kv_cache.size(3),
              "k's heads and head size must match the cache's");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "k and v must be contiguous along the head size");
  TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16,
              "k and v must be float32 or bfloat16");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0) && slots.scalar_type() == at::kLong,
              "slots must be int64 [T]");
  const at::Tensor sl = slots.contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t t = 0; t < sl.size(0); ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < kv_cache.size(0), "slot out of range");
  if (kv_cache.scalar_type() == at::kBFloat16) {
    write_as<at::BFloat16>(kv_cache, sp, k, v);
  } else {
    TORCH_CHECK(kv_cache.scalar_type() == at::kFloat, "kv_cache must be float32 or bfloat16");
    write_as<float>(kv_cache, sp, k, v);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fleetserve, m) {
  m.def("decode_attention(Tensor q, Tensor kv_cache, Tensor slots, Tensor mask, float scale) -> Tensor");
  m.def("write_slots(Tensor(a!) kv_cache, Tensor slots, Tensor k, Tensor v) -> ()");
}

TORCH_LIBRARY_IMPL(fleetserve, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("write_slots", &write_slots);
}
