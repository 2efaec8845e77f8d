// AVX-512 float GEMM (fp32 FMA; bf16 inputs are widened exactly to fp32).
//
// Dot-product form: out[i, j] = dot(x row i, y column j) over all of K with MR x NR zmm
// accumulators. The rows of x are packed once per call into contiguous fp32 [m][kp]
// (kp = K rounded up to 16, zero-padded). The columns of y are read straight from memory
// when they are contiguous (y.rs == 1: the weight rows of a @ b.T, the forward product),
// converting on the fly with a masked tail, so decode-sized batches stream the weights
// exactly once; otherwise they are packed like x.
#include "cpu/avx512_util.h"
#include "cpu/fgemm.h"

namespace r1x::cpu {
namespace {

constexpr int kVariantDirect = 1;
constexpr int kMr = 4;
constexpr int kNr = 4;

inline int64_t padded_k(int64_t k) { return (k + 15) / 16 * 16; }

FGemmPlan plan_avx512(const FGemmArgs& a) {
  FGemmPlan p;
  const bool direct = a.y.rs == 1;
  p.variant = direct ? kVariantDirect : 0;
  p.tile_m = a.m < 64 ? a.m : 64;
  p.tile_n = 32;
  p.pack_units = a.m + (direct ? 0 : a.n);
  p.packed_bytes = static_cast<size_t>(p.pack_units * padded_k(a.k)) * sizeof(float);
  p.scratch_bytes = static_cast<size_t>(p.tile_m * p.tile_n) * sizeof(float);
  return p;
}

// n values at src[0], src[stride], ... -> fp32 dst[0, kp), zero-padded.
void gather_f32(const void* src, int64_t stride, DType dt, int64_t n, int64_t kp, float* dst) {
  int64_t p = 0;
  if (stride == 1) {
    for (; p + 16 <= n; p += 16) _mm512_storeu_ps(dst + p, load16_f32(src, dt, p));
  }
  for (; p < n; ++p) dst[p] = load_as_f32(src, int(dt), p * stride);
  for (; p < kp; ++p) dst[p] = 0.0f;
}

void pack_avx512(const FGemmArgs& a, const FGemmPlan&, int64_t u0, int64_t u1, void* packed) {
  const int64_t kp = padded_k(a.k);
  const size_t esize = a.dtype == DType::kF32 ? 4 : 2;
  for (int64_t u = u0; u < u1; ++u) {
    float* dst = static_cast<float*>(packed) + u * kp;
    if (u < a.m) {
      gather_f32(static_cast<const char*>(a.x.ptr) + u * a.x.rs * esize, a.x.cs, a.dtype, a.k, kp, dst);
    } else {
      gather_f32(static_cast<const char*>(a.y.ptr) + (u - a.m) * a.y.cs * esize, a.y.rs, a.dtype,
                 a.k, kp, dst);
    }
  }
}

// Sources of the NR columns of y: 16 consecutive p of column j.
struct PackedCols {
  const float* base;
  int64_t kp;
  __m512 load(int64_t j, int64_t p) const { return _mm512_loadu_ps(base + j * kp + p); }
  __m512 load_tail(int64_t j, int64_t p, __mmask16) const { return load(j, p); }  // zero-padded
};
struct DirectF32 {
  const float* base;
  int64_t stride;
  __m512 load(int64_t j, int64_t p) const { return _mm512_loadu_ps(base + j * stride + p); }
  __m512 load_tail(int64_t j, int64_t p, __mmask16 m) const {
    return _mm512_maskz_loadu_ps(m, base + j * stride + p);
  }
};
struct DirectBF16 {
  const uint16_t* base;
  int64_t stride;
  static __m512 widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  __m512 load(int64_t j, int64_t p) const {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + j * stride + p)));
  }
  __m512 load_tail(int64_t j, int64_t p, __mmask16 m) const {
    return widen(_mm256_maskz_loadu_epi16(m, base + j * stride + p));
  }
};

// out[i * ldo + j] = dot(x row i, column j) for i < MR, j < NR.
template <int MR, int NR, class Src>
void micro(const float* x, int64_t kp, const Src& src, int64_t j0, int64_t k, float* out,
           int64_t ldo) {
  __m512 acc[MR][NR];
  _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t kfull = k / 16 * 16;
  for (int64_t p = 0; p < kfull; p += 16) {
    __m512 yv[NR];
    _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) yv[j] = src.load(j0 + j, p);
    _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * kp + p);
      _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, yv[j], acc[i][j]);
    }
  }
  if (kfull < k) {
    const __mmask16 m = static_cast<__mmask16>((1u << (k - kfull)) - 1);
    __m512 yv[NR];
    _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) yv[j] = src.load_tail(j0 + j, kfull, m);
    _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * kp + kfull);  // zero-padded
      _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, yv[j], acc[i][j]);
    }
  }
  _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int NR, class Src>
void rows(const float* x, int64_t kp, int64_t tm, const Src& src, int64_t j0, int64_t k,
          float* out, int64_t ldo) {
  int64_t i = 0;
  for (; i + kMr <= tm; i += kMr) micro<kMr, NR>(x + i * kp, kp, src, j0, k, out + i * ldo, ldo);
  switch (tm - i) {
    case 3: micro<3, NR>(x + i * kp, kp, src, j0, k, out + i * ldo, ldo); break;
    case 2: micro<2, NR>(x + i * kp, kp, src, j0, k, out + i * ldo, ldo); break;
    case 1: micro<1, NR>(x + i * kp, kp, src, j0, k, out + i * ldo, ldo); break;
    default: break;
  }
}

template <class Src>
void tile_with(const FGemmArgs& a, const float* x, int64_t tm, const Src& src, int64_t n0,
               int64_t n1, float* acc) {
  const int64_t kp = padded_k(a.k), tn = n1 - n0;
  for (int64_t j = n0; j < n1; j += kNr) {
    float* out = acc + (j - n0);
    switch (n1 - j < kNr ? n1 - j : kNr) {
      case 4: rows<4>(x, kp, tm, src, j, a.k, out, tn); break;
      case 3: rows<3>(x, kp, tm, src, j, a.k, out, tn); break;
      case 2: rows<2>(x, kp, tm, src, j, a.k, out, tn); break;
      default: rows<1>(x, kp, tm, src, j, a.k, out, tn); break;
    }
  }
}

void tile_avx512(const FGemmArgs& a, const FGemmPlan& plan, const void* packed, int64_t m0,
                 int64_t m1, int64_t n0, int64_t n1, void* scratch) {
  const int64_t kp = padded_k(a.k), tm = m1 - m0, tn = n1 - n0;
  const float* x = static_cast<const float*>(packed) + m0 * kp;
  float* acc = static_cast<float*>(scratch);  // [tm][tn]
  if (plan.variant != kVariantDirect) {
    tile_with(a, x, tm, PackedCols{static_cast<const float*>(packed) + a.m * kp, kp}, n0, n1, acc);
  } else if (a.dtype == DType::kF32) {
    tile_with(a, x, tm, DirectF32{static_cast<const float*>(a.y.ptr), a.y.cs}, n0, n1, acc);
  } else {
    tile_with(a, x, tm, DirectBF16{static_cast<const uint16_t*>(a.y.ptr), a.y.cs}, n0, n1, acc);
  }
  const size_t esize = a.dtype == DType::kF32 ? 4 : 2;
  for (int64_t i = 0; i < tm; ++i)
    store_f32_row(acc + i * tn, tn, a.dtype, static_cast<char*>(a.out) + ((m0 + i) * a.ldo + n0) * esize);
}

}  // namespace

const FGemmKernels& fgemm_kernels_avx512() {
  static const FGemmKernels k{Isa::kAvx512, plan_avx512, pack_avx512, tile_avx512};
  return k;
}

}  // namespace r1x::cpu
