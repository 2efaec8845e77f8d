// MLA kernels (mla.h), AVX-512. bfloat16 runs mla_bf16.h's algorithms with both tile products
// on the VDPBF16PS engine (dpbf16_avx512.h): the key rows (or P rows) are the broadcast
// operand, read in place, and the query-side VNNI pairs the vector operand. fp32 and fp16 take
// mla_impl.h's tile product as an MR x (16 * NV) register block of fp32 FMAs, A broadcast one
// element at a time (any strides), B loaded as rows (masked at the right edge). MR is chosen so
// that every block keeps at least 12 independent accumulators (two FMA ports x four cycles of
// latency need 8 in flight).
#include <immintrin.h>

#include <array>
#include <utility>

#include "cpu/dpbf16_avx512.h"
#include "cpu/mla_bf16.h"

namespace r1x::cpu {
namespace {

template <int MR, int NV>
void micro(int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
           float* c, int64_t ldc, bool accumulate, __mmask16 last) {
  // (fully unrolled so that GCC keeps the accumulators in registers)
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : static_cast<__mmask16>(0xffff);
      acc[i][v] = accumulate ? _mm512_maskz_loadu_ps(mk, c + i * ldc + 16 * v) : _mm512_setzero_ps();
    }
  for (int64_t p = 0; p < k; ++p) {
    __m512 bv[NV];
    const float* brow = b + p * ldb;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, brow + 16 * v) : _mm512_loadu_ps(brow + 16 * v);
    const float* ap = a + p * acs;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(ap[i * ars]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (v == NV - 1) {
        _mm512_mask_storeu_ps(c + i * ldc + 16 * v, last, acc[i][v]);
      } else {
        _mm512_storeu_ps(c + i * ldc + 16 * v, acc[i][v]);
      }
    }
}

using MicroFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                         int64_t, bool, __mmask16);

template <int NV, int... MR>
constexpr std::array<MicroFn, sizeof...(MR)> micro_row(std::integer_sequence<int, MR...>) {
  return {micro<MR + 1, NV>...};
}

constexpr int kMaxMr = 8;
// kMicro[nv - 1][mr - 1]
const std::array<MicroFn, kMaxMr> kMicro[4] = {
    micro_row<1>(std::make_integer_sequence<int, kMaxMr>{}),
    micro_row<2>(std::make_integer_sequence<int, kMaxMr>{}),
    micro_row<3>(std::make_integer_sequence<int, kMaxMr>{}),
    micro_row<4>(std::make_integer_sequence<int, kMaxMr>{})};

struct GemmAvx512 {
  static void run(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs,
                  const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
    for (int64_t j0 = 0; j0 < n; j0 += 64) {
      const int64_t nn = std::min<int64_t>(64, n - j0);
      const int nv = static_cast<int>((nn + 15) / 16);
      const int rem = static_cast<int>(nn % 16);
      const __mmask16 last = rem == 0 ? static_cast<__mmask16>(0xffff)
                                      : static_cast<__mmask16>((1u << rem) - 1);
      const int mr = nv == 1 ? 8 : nv == 2 ? 6 : 4;
      for (int64_t i = 0; i < m; i += mr) {
        const int rows = static_cast<int>(std::min<int64_t>(mr, m - i));
        kMicro[nv - 1][rows - 1](k, a + i * ars, ars, acs, b + j0, ldb, c + i * ldc + j0, ldc,
                                 accumulate, last);
      }
    }
  }
};

struct DpOps {
  static void begin() {}
  static void end() {}
  static const MlaKernels& fallback() {
    static const MlaKernels k = Mla<GemmAvx512>::table(Isa::kAvx512);
    return k;
  }
  // s[64][lds] = kb[64][dp] . Q^T: the 64 key rows broadcast, Q^T's pairs the vectors
  static void st(const uint16_t* kb, int64_t dp, const uint32_t* qv, int64_t ldq, int64_t ncols,
                 float* s, int64_t lds) {
    dp_block<Epi::kStore>(qv, ldq, ncols, reinterpret_cast<const uint8_t*>(kb), dp * 2, 64, dp / 2, s, lds);
  }
  // o[rpad][dvp] += pb[rpad][64] . V: the P rows broadcast, V's key pairs the vectors
  static void pv(const uint16_t* pb, int64_t rpad, const uint32_t* vv, int64_t dvp, float* o) {
    dp_block<Epi::kAdd>(vv, dvp, dvp, reinterpret_cast<const uint8_t*>(pb), 64 * 2, rpad, 32, o, dvp);
  }
};

}  // namespace

const MlaKernels& mla_kernels_avx512() {
  static const MlaKernels k = MlaBf16<DpOps>::table(Isa::kAvx512);
  return k;
}

}  // namespace r1x::cpu
