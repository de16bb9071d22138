// Kernels for layers kept as integer codes, built at run time by engine/quantized_kernels.py.
//
// int4_dequant de-quantizes a layer's 4-bit codes, packed for PyTorch's CPU int4 kernel, into a bfloat16 weight,
// so that a step of many rows (a prompt chunk, a wide batch) can run a bfloat16 GEMM instead of that kernel,
// which slows in proportion to the rows.
// packed: uint8 [N / 64, K, 32] (as _convert_weight_to_int4pack_for_cpu lays out [N, K] codes: byte j of row k
// in block b holds row b*64 + j's code in its low nibble and row b*64 + 32 + j's in its high nibble);
// scales_and_zeros: bfloat16 [K / 32, N, 2]. Returns W transposed, [K, N] bfloat16, where
// W[n, k] = (code - 8) * scale + zero, computed in float32 and rounded to nearest even, the arithmetic of the
// int4 kernel.
//
// int8_gemv multiplies a few rows by an int8 weight with one scale per output row (the LM head), reading the
// weight once for all of them: codes interleaved by 16 output rows, [N / 16, K, 16], so that 16 outputs
// accumulate in one vector register with no horizontal sums. x [M, K] float32; returns [M, N] float32.
// AVX-512 only (the Python side asks for it only where the CPU has it).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace {

inline float bf16_to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even (no NaNs arise here)
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// One row k of the output: every block of 64 columns from its 32 packed bytes.
void dequant_row(const uint8_t* packed, const uint16_t* sz, uint16_t* out, int64_t k, int64_t n_out,
                 int64_t k_in) {
  const uint16_t* group = sz + (k / 32) * n_out * 2;
  for (int64_t b = 0; b < n_out / 64; ++b) {
    const uint8_t* src = packed + (b * k_in + k) * 32;
    const uint16_t* pair = group + b * 64 * 2;
    uint16_t* dst = out + k * n_out + b * 64;
    float lo[32], hi[32];
#pragma omp simd
    for (int j = 0; j < 32; ++j) {
      lo[j] = static_cast<float>(src[j] & 15) - 8.f;
      hi[j] = static_cast<float>(src[j] >> 4) - 8.f;
    }
#pragma omp simd
    for (int j = 0; j < 32; ++j) {
      dst[j] = float_to_bf16(lo[j] * bf16_to_float(pair[2 * j]) + bf16_to_float(pair[2 * j + 1]));
      dst[32 + j] = float_to_bf16(hi[j] * bf16_to_float(pair[64 + 2 * j]) + bf16_to_float(pair[64 + 2 * j + 1]));
    }
  }
}

at::Tensor int4_dequant(const at::Tensor& packed, const at::Tensor& scales_and_zeros, int64_t n_out,
                        int64_t k_in) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous(),
              "scales_and_zeros must be contiguous bfloat16");
  TORCH_CHECK(n_out % 64 == 0 && k_in % 32 == 0, "N must be a multiple of 64 and K of 32");
  TORCH_CHECK(packed.numel() == n_out * k_in / 2, "packed holds ", packed.numel(), " bytes, not N * K / 2");
  TORCH_CHECK(scales_and_zeros.numel() == (k_in / 32) * n_out * 2, "scales_and_zeros must be [K / 32, N, 2]");
  at::Tensor out = at::empty({k_in, n_out}, packed.options().dtype(at::kBFloat16));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const uint16_t* sz = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>());
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, k_in, 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) dequant_row(p, sz, o, k, n_out, k_in);
  });
  return out;
}

#ifdef __AVX512F__
// Rows [r0, r0 + rows) of x (rows <= 4) against one block of 16 output rows.
inline void gemv_block(const float* x, int64_t rows, int64_t k, const int8_t* block, const float* scale,
                       float* y, int64_t n) {
  __m512 even[4], odd[4];
  for (int r = 0; r < 4; ++r) even[r] = odd[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 2) {  // two columns a turn: two independent chains of FMAs per row
    const __m512 w0 = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + c * 16))));
    const __m512 w1 = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + c * 16 + 16))));
    for (int64_t r = 0; r < rows; ++r) {
      even[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[r * k + c]), even[r]);
      odd[r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[r * k + c + 1]), odd[r]);
    }
  }
  const __m512 s = _mm512_loadu_ps(scale);
  for (int64_t r = 0; r < rows; ++r) _mm512_storeu_ps(y + r * n, _mm512_mul_ps(_mm512_add_ps(even[r], odd[r]), s));
}
#endif

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& codes16, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && codes16.dim() == 3 && codes16.size(2) == 16, "x [M, K] and codes [N / 16, K, 16]");
  TORCH_CHECK(codes16.scalar_type() == at::kChar && codes16.is_contiguous(), "codes must be contiguous int8");
  const int64_t m = x.size(0), k = x.size(1), n = codes16.size(0) * 16;
  TORCH_CHECK(codes16.size(1) == k && k % 2 == 0, "codes must be [N / 16, K, 16] with K even, K = x's columns");
  TORCH_CHECK(scales.numel() == n, "one scale per output row");
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor sf = scales.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, n}, xf.options());
#ifdef __AVX512F__
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = codes16.data_ptr<int8_t>();
  const float* sp = sf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n / 16, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t r0 = 0; r0 < m; r0 += 4) {
        gemv_block(xp + r0 * k, std::min<int64_t>(4, m - r0), k, wp + b * k * 16, sp + b * 16, yp + r0 * n + b * 16, n);
      }
    }
  });
#else
  TORCH_CHECK(false, "int8_gemv was built without AVX-512");
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fleetserve, m) {
  m.def("int4_dequant(Tensor packed, Tensor scales_and_zeros, int n_out, int k_in) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor codes16, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(fleetserve, CPU, m) {
  m.impl("int4_dequant", &int4_dequant);
  m.impl("int8_gemv", &int8_gemv);
}
