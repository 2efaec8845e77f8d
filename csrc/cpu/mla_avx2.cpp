// MLA kernels (mla.h), AVX2: mla_impl.h's algorithms (bf16 and fp16 widened to fp32 a tile at
// a time) with the tile product as an MR x 16 register block of fp32 FMAs: A broadcast one
// element at a time (any strides), B loaded as two 8-wide row vectors (masked at the right
// edge); 6 rows keep 12 accumulators, the two B vectors and a broadcast in 15 ymm registers.
#include <immintrin.h>

#include <array>
#include <utility>

#include "cpu/mla_impl.h"

namespace r1x::cpu {
namespace {

constexpr int kMaxMr = 6;

inline __m256i lane_mask(int n) {  // the first n of 8 lanes
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// c[i][0 .. 16) (+)= sum_p a(i, p) * b[p][0 .. 16) for i < MR; n0, n1: valid columns of the
// two 8-wide halves.
template <int MR>
void micro(int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
           float* c, int64_t ldc, bool accumulate, int n0, int n1) {
  const __m256i m0 = lane_mask(n0), m1 = lane_mask(n1);
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = accumulate ? _mm256_maskload_ps(c + i * ldc, m0) : _mm256_setzero_ps();
    acc[i][1] = accumulate && n1 > 0 ? _mm256_maskload_ps(c + i * ldc + 8, m1) : _mm256_setzero_ps();
  }
  for (int64_t p = 0; p < k; ++p) {
    const float* brow = b + p * ldb;
    const __m256 b0 = _mm256_maskload_ps(brow, m0);
    const __m256 b1 = n1 > 0 ? _mm256_maskload_ps(brow + 8, m1) : _mm256_setzero_ps();
    const float* ap = a + p * acs;
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(ap + i * ars);
      acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    _mm256_maskstore_ps(c + i * ldc, m0, acc[i][0]);
    if (n1 > 0) _mm256_maskstore_ps(c + i * ldc + 8, m1, acc[i][1]);
  }
}

using MicroFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                         int64_t, bool, int, int);

template <int... MR>
constexpr std::array<MicroFn, sizeof...(MR)> micros(std::integer_sequence<int, MR...>) {
  return {micro<MR + 1>...};
}
constexpr std::array<MicroFn, kMaxMr> kMicro = micros(std::make_integer_sequence<int, kMaxMr>{});

struct GemmAvx2 {
  static void run(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs,
                  const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const int nn = static_cast<int>(std::min<int64_t>(16, n - j0));
      const int n0 = std::min(nn, 8), n1 = nn - n0;
      for (int64_t i = 0; i < m; i += kMaxMr) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxMr, m - i));
        kMicro[rows - 1](k, a + i * ars, ars, acs, b + j0, ldb, c + i * ldc + j0, ldc, accumulate, n0, n1);
      }
    }
  }
};

}  // namespace

const MlaKernels& mla_kernels_avx2() {
  static const MlaKernels k = Mla<GemmAvx2>::table(Isa::kAvx2);
  return k;
}

}  // namespace r1x::cpu
