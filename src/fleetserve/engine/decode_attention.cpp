// Decode attention over the paged KV cache: one query token per sequence, its keys and values read from the
// cache slots its block table names. Built at run time by engine/decode_kernel.py and used by compiled decode
// steps of a few sequences, where the general attention kernel's fixed costs outweigh the arithmetic.
//
// q [B, Hkv, G, D] (G query heads share each KV head); kv_cache [S, 2, Hkv, D], float or bfloat16;
// slots [B, L] int64; mask [B, 1, 1, L] or [B, L] bool, true on a prefix of each row (the context), false after.
// Returns [B, Hkv, G, D] in q's dtype. Sums and the softmax are in float32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

template <typename T>
void attend(const float* q, const T* cache, const int64_t* slots, const bool* mask, float* out, int64_t batch,
            int64_t heads, int64_t group, int64_t dim, int64_t width, float scale) {
  const int64_t slot_stride = 2 * heads * dim;  // one slot: the keys of every KV head, then the values
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * width);
    std::vector<float> row(dim);
    std::vector<float> acc(group * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads;
      const int64_t h = task % heads;
      const float* qb = q + task * group * dim;
      const int64_t* sl = slots + b * width;
      const bool* valid = mask + b * width;
      int64_t n = 0;
      while (n < width && valid[n]) ++n;
      float* o = out + task * group * dim;
      if (n == 0) {
        std::fill(o, o + group * dim, 0.f);
        continue;
      }
      for (int64_t t = 0; t < n; ++t) {
        const T* k = cache + sl[t] * slot_stride + h * dim;
        for (int64_t d = 0; d < dim; ++d) row[d] = to_float(k[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qb + g * dim;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qg[d] * row[d];
          scores[g * width + t] = s * scale;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * width;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n; ++t) top = std::max(top, sg[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) {
          sg[t] = std::exp(sg[t] - top);
          sum += sg[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < n; ++t) sg[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const T* v = cache + sl[t] * slot_stride + heads * dim + h * dim;
        for (int64_t d = 0; d < dim; ++d) row[d] = to_float(v[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * width + t];
          float* a = acc.data() + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) a[d] += p * row[d];
        }
      }
      std::memcpy(o, acc.data(), group * dim * sizeof(float));
    }
  });
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(fleetserve, m) {
  m.def("decode_attention(Tensor q, Tensor kv_cache, Tensor slots, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fleetserve, CPU, m) { m.impl("decode_attention", &decode_attention); }
