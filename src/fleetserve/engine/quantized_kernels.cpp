// Kernels for layers kept as integer codes, built at run time by engine/quantized_kernels.py.
//
// int4_dequant_mm de-quantizes a layer's 4-bit codes, packed for PyTorch's CPU int4 kernel, into a bfloat16
// weight, so that a step of many rows (a prompt chunk, a wide batch) can run a bfloat16 GEMM instead of that
// kernel, which slows in proportion to the rows.
// packed: uint8 [N / 64, K, 32] (as _convert_weight_to_int4pack_for_cpu lays out [N, K] codes: byte j of row k
// in block b holds row b*64 + j's code in its low nibble and row b*64 + 32 + j's in its high nibble);
// scales_and_zeros: bfloat16 [K / 32, N, 2]. The weight, W transposed ([K, N] bfloat16), is
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

#include "shared_work.h"
#include "vector_loads.h"

#include <cstdint>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

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

void check_int4(const at::Tensor& packed, const at::Tensor& scales_and_zeros, int64_t n_out, int64_t k_in) {
  TORCH_CHECK(n_out % 64 == 0 && k_in % 32 == 0, "N must be a multiple of 64 and K of 32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == n_out * k_in / 2,
              "packed must be the int4 kernel's contiguous uint8 codes of an [N, K] weight");
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.numel() == (k_in / 32) * n_out * 2,
              "scales_and_zeros must be contiguous bfloat16 [K / 32, N, 2]");
}

void dequant_into(const at::Tensor& packed, const at::Tensor& scales_and_zeros, int64_t n_out, int64_t k_in,
                  uint16_t* out) {
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const uint16_t* sz = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>());
  at::parallel_for(0, k_in, 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) dequant_row(p, sz, out, k, n_out, k_in);
  });
}

// x [M, K] (cast to bfloat16) times the de-quantized weight, which lives in a buffer the calling thread keeps:
// a fresh allocation of a layer's size each call came back from the system as new pages (the allocator returns
// large freed blocks to it), and faulting them in cost as much as the GEMM.
at::Tensor int4_dequant_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                           int64_t n_out) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  const int64_t k_in = x.size(1);
  check_int4(packed, scales_and_zeros, n_out, k_in);
  thread_local std::vector<uint16_t> weight;
  if (weight.size() < static_cast<size_t>(k_in * n_out)) weight.resize(k_in * n_out);
  dequant_into(packed, scales_and_zeros, n_out, k_in, weight.data());
  at::Tensor w_t = at::from_blob(weight.data(), {k_in, n_out}, x.options().dtype(at::kBFloat16));
  return at::mm(x.to(at::kBFloat16), w_t);
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


#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
// int4_vnni_mm: rows against an int4 layer in the int4 kernel's own packing, with integer dot products: each
// row's activations are quantized to int8 per group of 32 (one float scale per group, as the group's weights
// have), so a group's dot product is exact in int32 (vpdpbusd: unsigned 4-bit codes times signed 8-bit
// activations, four products a lane) and one multiply by both scales makes it float. The group's zero term needs
// no integer work: zero' = zero - 8 * scale multiplies the sum of the group's quantized activations. Every
// weight register serves all the rows.

using fleetserve::load16;

// Per row and group of 32: int8 codes, their scale, and the sum of the values the codes stand for. The zero term
// takes that sum, not the exact one, so that each activation's rounding error meets the weight it has (code * scale
// + zero') rather than the codes' offset (code * scale, codes 0..15): with the exact sum the error was 14 times
// bfloat16's on the model's layers, with this one it is what int8 rounding gives.
template <typename T>
inline void quantize_group(const T* x, int64_t i, int8_t* xq, float* scale, float* sum, int32_t* offset) {
  const __m512 v0 = load16(x + i * 32), v1 = load16(x + i * 32 + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  scale[i] = amax / 127.f;
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
  const int32_t total = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  sum[i] = scale[i] * static_cast<float>(total);
  offset[i] = 128 * total;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + i * 32), _mm512_cvtsepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + i * 32 + 16), _mm512_cvtsepi32_epi8(q1));
}

template <typename T>
void quantize_activations(const T* x, int64_t m, int64_t k, int8_t* xq, float* scale, float* sum, int32_t* offset) {
  const int64_t groups = k / 32;
  at::parallel_for(0, m * groups, 64 * groups, [&](int64_t begin, int64_t end) {  // one thread below 64 rows
    for (int64_t i = begin; i < end; ++i) quantize_group(x, i, xq, scale, sum, offset);
  });
}

// A step's activations, quantized: int8 codes [M, K], then per row and group of 32 their scale, the sum of the
// values the codes stand for, and 128 times the codes' sum (for a weight offset to unsigned), in one allocation.
struct QuantizedRows {
  at::Tensor storage;
  int8_t* codes;
  float* scale;
  float* sum;
  int32_t* offset;
};

QuantizedRows quantize_rows(const at::Tensor& xc) {
  const int64_t m = xc.size(0), k = xc.size(1), groups = k / 32;
  QuantizedRows q;
  q.storage = at::empty({m * k + 12 * m * groups}, xc.options().dtype(at::kChar));
  q.codes = q.storage.data_ptr<int8_t>();
  q.scale = reinterpret_cast<float*>(q.codes + m * k);
  q.sum = q.scale + m * groups;
  q.offset = reinterpret_cast<int32_t*>(q.sum + m * groups);
  if (xc.scalar_type() == at::kFloat) {
    quantize_activations(xc.data_ptr<float>(), m, k, q.codes, q.scale, q.sum, q.offset);
  } else {
    quantize_activations(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), m, k, q.codes, q.scale,
                         q.sum, q.offset);
  }
  return q;
}

// One tile of R rows against one block of 16 outputs, summed over the groups in float registers: per group, the
// rows' int32 dot products with the group's codes (w: 8 registers of 4 columns each), times both scales, plus
// the zero term. The results are stored once, at the end.
template <int R>
struct RowTile {
  __m512 out[R];

  RowTile() {
    for (int r = 0; r < R; ++r) out[r] = _mm512_setzero_ps();
  }

  // xq, a and xs point at the tile's first row and this group.
  inline void add_group(const __m512i* w, __m512 s, __m512 zero, const int8_t* xq, int64_t k, const float* a,
                        const float* xs, int64_t groups) {
    __m512i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
    for (int c = 0; c < 8; ++c) {
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, xq + r * k + c * 4, sizeof(four));
        acc[r] = _mm512_dpbusd_epi32(acc[r], w[c], _mm512_set1_epi32(four));
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 prior = _mm512_fmadd_ps(zero, _mm512_set1_ps(xs[r * groups]), out[r]);
      out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), _mm512_mul_ps(s, _mm512_set1_ps(a[r * groups])), prior);
    }
  }

  inline void store(float* y, int64_t n) const {
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * n, out[r]);
  }
};

// A group's scales and zeros' (zero - 8 * scale) of the 16 outputs from n0: bfloat16 pairs, one per 32-bit lane.
inline void group_scales(const uint16_t* sz, int64_t g, int64_t n, int64_t n0, __m512* s, __m512* zero) {
  const __m512i pairs = _mm512_loadu_si512(sz + (g * n + n0) * 2);
  *s = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  const __m512i hi_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  *zero = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), *s, _mm512_castsi512_ps(_mm512_and_si512(pairs, hi_half)));
}

// The byte permute that gathers, from the 128 packed bytes of four columns of a block (32 bytes a column, byte j
// holding outputs j and 32 + j), the bytes of the 16 outputs from half * 16: four columns of one output to a lane.
inline __m512i gather_index(int64_t half) {
  alignas(64) uint8_t order[64];
  for (int o = 0; o < 16; ++o) {
    for (int j = 0; j < 4; ++j) order[4 * o + j] = static_cast<uint8_t>(32 * j + half * 16 + o);
  }
  return _mm512_load_si512(order);
}

// The codes of 16 outputs (a quarter of a packed block of 64) in one group, as 8 registers of 4 columns each,
// and the group's scales and zeros' (zero - 8 * scale) of those outputs.
struct BlockCodes {
  __m512i idx;
  bool high;  // outputs 32..63 of a block sit in the high nibbles
  const uint8_t* packed;
  const uint16_t* sz;
  int64_t n0, n;

  BlockCodes(const uint8_t* p, const uint16_t* scales_and_zeros, int64_t u, int64_t n_out, int64_t k)
      : idx(gather_index(u % 2)), high(u % 4 >= 2), packed(p + (u / 4) * k * 32), sz(scales_and_zeros), n0(u * 16),
        n(n_out) {}

  inline void unpack(int64_t g, __m512i* w, __m512* s, __m512* zero) const {
    const __m512i nibble = _mm512_set1_epi8(15);
    const uint8_t* src = packed + g * 32 * 32;
    for (int c = 0; c < 8; ++c) {  // columns 4c..4c+3: 128 bytes, 64 outputs' codes each
      const __m512i z0 = _mm512_loadu_si512(src + c * 128), z1 = _mm512_loadu_si512(src + c * 128 + 64);
      __m512i four = _mm512_permutex2var_epi8(z0, idx, z1);
      if (high) four = _mm512_srli_epi16(four, 4);
      w[c] = _mm512_and_si512(four, nibble);
    }
    group_scales(sz, g, n, n0, s, zero);
  }
};

// R rows (a few) against the 32 outputs that share their packed bytes: 16 in the low nibbles of half h of block b
// and the 16 in the high nibbles, 32 outputs on. One permute gathers both sets' codes four columns at a time, and
// one broadcast of the rows' activations serves both. The high set is taken unshifted (16 x its codes, masked in
// place) and its exact int32 sum divided by 16 once per group, which saves a shift per register.
template <int R>
inline void vnni_few_rows(const uint8_t* packed, const uint16_t* sz, int64_t b, int64_t h, int64_t n,
                          const int8_t* xq, const float* a, const float* xs, float* y, int64_t groups, int64_t k) {
  const __m512i idx = gather_index(h);
  const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8(static_cast<char>(0xF0));
  const int64_t n_lo = b * 64 + h * 16, n_hi = n_lo + 32;
  const uint8_t* block = packed + b * k * 32;
  __m512 out_lo[R], out_hi[R];
  for (int r = 0; r < R; ++r) out_lo[r] = out_hi[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* src = block + g * 32 * 32;
    __m512i acc_lo[R], acc_hi[R];
    for (int r = 0; r < R; ++r) acc_lo[r] = acc_hi[r] = _mm512_setzero_si512();
    for (int c = 0; c < 8; ++c) {  // columns 4c..4c+3: 128 bytes, 64 outputs' codes each
      const __m512i z0 = _mm512_loadu_si512(src + c * 128), z1 = _mm512_loadu_si512(src + c * 128 + 64);
      const __m512i four = _mm512_permutex2var_epi8(z0, idx, z1);
      const __m512i w_lo = _mm512_and_si512(four, low), w_hi = _mm512_and_si512(four, high);
      for (int r = 0; r < R; ++r) {
        int32_t x4;
        std::memcpy(&x4, xq + r * k + g * 32 + c * 4, sizeof(x4));
        const __m512i xb = _mm512_set1_epi32(x4);
        acc_lo[r] = _mm512_dpbusd_epi32(acc_lo[r], w_lo, xb);
        acc_hi[r] = _mm512_dpbusd_epi32(acc_hi[r], w_hi, xb);
      }
    }
    __m512 s_lo, zero_lo, s_hi, zero_hi;
    group_scales(sz, g, n, n_lo, &s_lo, &zero_lo);
    group_scales(sz, g, n, n_hi, &s_hi, &zero_hi);
    for (int r = 0; r < R; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r * groups + g]), sum = _mm512_set1_ps(xs[r * groups + g]);
      const __m512 dot_lo = _mm512_cvtepi32_ps(acc_lo[r]), dot_hi = _mm512_cvtepi32_ps(_mm512_srai_epi32(acc_hi[r], 4));
      out_lo[r] = _mm512_fmadd_ps(dot_lo, _mm512_mul_ps(s_lo, ar), _mm512_fmadd_ps(zero_lo, sum, out_lo[r]));
      out_hi[r] = _mm512_fmadd_ps(dot_hi, _mm512_mul_ps(s_hi, ar), _mm512_fmadd_ps(zero_hi, sum, out_hi[r]));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(y + r * n + n_lo, out_lo[r]);
    _mm512_storeu_ps(y + r * n + n_hi, out_hi[r]);
  }
}

// R rows against 16 outputs whose codes, scales and zeros were unpacked for every group into ``w``.
template <int R>
inline void vnni_tile(const __m512i* w, const int8_t* xq, const float* a, const float* xs, float* y, int64_t groups,
                      int64_t k, int64_t n) {
  RowTile<R> tile;
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i* wg = w + g * 10;
    tile.add_group(wg, _mm512_castsi512_ps(wg[8]), _mm512_castsi512_ps(wg[9]), xq + g * 32, k, a + g, xs + g, groups);
  }
  tile.store(y, n);
}

constexpr int kTileRows = 8;
constexpr int kFewRows = 4;  // steps of this many rows or fewer take vnni_few_rows

// The 16 outputs u * 16 .. u * 16 + 15 for every row of a step of more than kFewRows rows: their codes unpacked
// once into a buffer the thread keeps (10 registers a group: codes, scales, zeros) and every tile of rows run over
// it, each tile's sums staying in registers across the groups.
void vnni_outputs(const uint8_t* packed, const uint16_t* sz, const int8_t* xq, const float* a, const float* xs,
                  float* y, int64_t u, int64_t m, int64_t n, int64_t k) {
  const int64_t groups = k / 32;
  const BlockCodes codes(packed, sz, u, n, k);
  thread_local std::vector<__m512i> buffer;
  if (buffer.size() < static_cast<size_t>(groups * 10)) buffer.resize(groups * 10);
  __m512i* w = buffer.data();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 s, zero;
    codes.unpack(g, w + g * 10, &s, &zero);
    w[g * 10 + 8] = _mm512_castps_si512(s);
    w[g * 10 + 9] = _mm512_castps_si512(zero);
  }
  y += codes.n0;
  int64_t r = 0;
  for (; r + kTileRows <= m; r += kTileRows)
    vnni_tile<kTileRows>(w, xq + r * k, a + r * groups, xs + r * groups, y + r * n, groups, k, n);
  switch (m - r) {
#define FLEETSERVE_TAIL(R) \
  case R: vnni_tile<R>(w, xq + r * k, a + r * groups, xs + r * groups, y + r * n, groups, k, n); break;
    FLEETSERVE_TAIL(1) FLEETSERVE_TAIL(2) FLEETSERVE_TAIL(3) FLEETSERVE_TAIL(4)
    FLEETSERVE_TAIL(5) FLEETSERVE_TAIL(6) FLEETSERVE_TAIL(7)
#undef FLEETSERVE_TAIL
    default: break;
  }
}
#endif

at::Tensor int4_vnni_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                        int64_t n_out) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  const int64_t m = x.size(0), k = x.size(1);
  check_int4(packed, scales_and_zeros, n_out, k);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({m, n_out}, xc.options().dtype(at::kFloat));
#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
  const QuantizedRows q = quantize_rows(xc);
  int8_t* xq = q.codes;
  float* a = q.scale;
  float* xs = q.sum;
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const uint16_t* sz = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  const int64_t groups = k / 32;
  if (m <= kFewRows) {
    fleetserve::share_work(n_out / 32, [&](int64_t u) {
      const int64_t b = u / 2, h = u % 2;
      switch (m) {
#define FLEETSERVE_FEW(R) \
  case R: vnni_few_rows<R>(p, sz, b, h, n_out, xq, a, xs, yp, groups, k); break;
        FLEETSERVE_FEW(1) FLEETSERVE_FEW(2) FLEETSERVE_FEW(3) FLEETSERVE_FEW(4)
#undef FLEETSERVE_FEW
        default: break;
      }
    });
  } else {
    fleetserve::share_work(n_out / 16,
                           [&](int64_t u) { vnni_outputs(p, sz, xq, a, xs, yp, u, m, n_out, k); });
  }
#else
  TORCH_CHECK(false, "int4_vnni_mm was built without AVX-512 VNNI and VBMI");
#endif
  return y;
}


#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
// int8_vnni_mm: rows against an int8 weight with one scale per output row (the LM head), on integer dot products
// like int4_vnni_mm. The codes are stored offset to unsigned (code + 128), four columns by 16 outputs to a
// register ([N / 16, K / 4, 16, 4]), so they are vpdpbusd's unsigned side and the quantized activations its
// signed side; the offset adds 128 * (sum of a group's activation codes) to every output of the row, which is
// one number per row and group, taken off before the group's scale applies.
template <int R>
inline void head_rows(const __m512i* w, const int8_t* xq, int64_t k, const float* a, int64_t groups,
                      const int32_t* offset, __m512* y) {
  __m512i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_set1_epi32(-offset[r * groups]);
  for (int c = 0; c < 8; ++c) {
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, xq + r * k + c * 4, sizeof(four));
      acc[r] = _mm512_dpbusd_epi32(acc[r], w[c], _mm512_set1_epi32(four));
    }
  }
  for (int r = 0; r < R; ++r) y[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), _mm512_set1_ps(a[r * groups]), y[r]);
}

// Rows [r0, r0 + R) against the 16 outputs of block u.
template <int R>
void head_block(const uint8_t* codes, const float* scales, const int8_t* xq, const float* a, const int32_t* offset,
                float* y, int64_t u, int64_t r0, int64_t n, int64_t k) {
  const int64_t groups = k / 32;
  __m512 out[R];
  for (int r = 0; r < R; ++r) out[r] = _mm512_setzero_ps();
  const uint8_t* block = codes + u * 16 * k;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i w[8];
    for (int c = 0; c < 8; ++c) w[c] = _mm512_loadu_si512(block + (g * 8 + c) * 64);
    const int64_t at = r0 * groups + g;
    head_rows<R>(w, xq + r0 * k + g * 32, k, a + at, groups, offset + at, out);
  }
  const __m512 s = _mm512_loadu_ps(scales + u * 16);
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (r0 + r) * n + u * 16, _mm512_mul_ps(out[r], s));
}
#endif

at::Tensor int8_vnni_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 4 && codes.size(2) == 16 && codes.size(3) == 4,
              "x [M, K] and codes [N / 16, K / 4, 16, 4]");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "codes must be contiguous uint8");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0) * 16;
  TORCH_CHECK(codes.size(1) * 4 == k && k % 32 == 0, "codes must be [N / 16, K / 4, 16, 4], K a multiple of 32");
  TORCH_CHECK(scales.numel() == n && scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "one float32 scale per output row");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({m, n}, xc.options().dtype(at::kFloat));
#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
  const QuantizedRows q = quantize_rows(xc);
  const int8_t* xq = q.codes;
  const float* a = q.scale;
  const int32_t* offset = q.offset;
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  fleetserve::share_work(n / 16, [&](int64_t u) {
    int64_t r = 0;
    for (; r + 8 <= m; r += 8) head_block<8>(cp, sp, xq, a, offset, yp, u, r, n, k);
    switch (m - r) {
#define FLEETSERVE_ROWS(R) \
  case R: head_block<R>(cp, sp, xq, a, offset, yp, u, r, n, k); break;
      FLEETSERVE_ROWS(1) FLEETSERVE_ROWS(2) FLEETSERVE_ROWS(3) FLEETSERVE_ROWS(4)
      FLEETSERVE_ROWS(5) FLEETSERVE_ROWS(6) FLEETSERVE_ROWS(7)
#undef FLEETSERVE_ROWS
      default: break;
    }
  });
#else
  TORCH_CHECK(false, "int8_vnni_mm was built without AVX-512 VNNI and VBMI");
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fleetserve, m) {
  m.def("int8_gemv(Tensor x, Tensor codes16, Tensor scales) -> Tensor");
  m.def("int4_dequant_mm(Tensor x, Tensor packed, Tensor scales_and_zeros, int n_out) -> Tensor");
  m.def("int8_vnni_mm(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  m.def("int4_vnni_mm(Tensor x, Tensor packed, Tensor scales_and_zeros, int n_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(fleetserve, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_dequant_mm", &int4_dequant_mm);
  m.impl("int8_vnni_mm", &int8_vnni_mm);
  m.impl("int4_vnni_mm", &int4_vnni_mm);
}
