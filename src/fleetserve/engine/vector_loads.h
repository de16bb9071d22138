// Sixteen floats into an AVX-512 register from float32 or bfloat16 memory, for our kernels (included by
// quantized_kernels.cpp and decode_attention.cpp).

#pragma once

#ifdef __AVX512F__
#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>

namespace fleetserve {

inline __m512 load16(const float* v) { return _mm512_loadu_ps(v); }

inline __m512 load16(const uint16_t* v) {  // bfloat16 to float32: the bits moved to the high half
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v))), 16));
}

inline __m512 load16(const at::BFloat16* v) { return load16(reinterpret_cast<const uint16_t*>(v)); }

}  // namespace fleetserve
#endif
