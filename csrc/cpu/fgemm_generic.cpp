// Portable float GEMM (any strides): the fallback below AVX-512 and a cross-check for the
// vector kernels. Each tile gathers its rows of x and columns of y into contiguous fp32
// panels once, then takes dot products with 8 independent partial sums, which the compiler
// vectorises without reassociating anything.
#include <algorithm>

#include "cpu/fgemm.h"
#include "cpu/fp8_scalar.h"

namespace r1x::cpu {
namespace {

inline float load(const MatView& v, DType dt, int64_t r, int64_t c) {
  return load_as_f32(v.ptr, int(dt), r * v.rs + c * v.cs);
}

FGemmPlan plan_generic(const FGemmArgs& a) {
  FGemmPlan p;
  p.tile_m = std::min<int64_t>(a.m, 32);
  p.tile_n = std::min<int64_t>(a.n, 32);
  p.scratch_bytes = static_cast<size_t>((p.tile_m + p.tile_n) * a.k + p.tile_n) * sizeof(float);
  return p;
}

void pack_generic(const FGemmArgs&, const FGemmPlan&, int64_t, int64_t, void*) {}

float dot(const float* a, const float* b, int64_t k) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t p = 0;
  for (; p + 8 <= k; p += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[p + j] * b[p + j];
  for (; p < k; ++p) s[0] += a[p] * b[p];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

void tile_generic(const FGemmArgs& a, const FGemmPlan&, const void*, int64_t m0, int64_t m1,
                  int64_t n0, int64_t n1, void* scratch, TileCtx&) {
  const int64_t k = a.k, tm = m1 - m0, tn = n1 - n0;
  float* xs = static_cast<float*>(scratch);  // [tm][k]
  float* ys = xs + tm * k;                   // [tn][k]: columns of y
  float* row = ys + tn * k;                  // [tn]
  for (int64_t i = 0; i < tm; ++i)
    for (int64_t p = 0; p < k; ++p) xs[i * k + p] = load(a.x, a.dtype, m0 + i, p);
  for (int64_t j = 0; j < tn; ++j)
    for (int64_t p = 0; p < k; ++p) ys[j * k + p] = load(a.y, a.dtype, p, n0 + j);
  const size_t esize = a.dtype == DType::kF32 ? 4 : 2;
  for (int64_t i = 0; i < tm; ++i) {
    for (int64_t j = 0; j < tn; ++j) row[j] = dot(xs + i * k, ys + j * k, k);
    store_row_scalar(row, tn, int(a.dtype),
                     static_cast<char*>(a.out) + ((m0 + i) * a.ldo + n0) * esize);
  }
}

}  // namespace

const FGemmKernels& fgemm_kernels_generic() {
  static const FGemmKernels k{Isa::kGeneric, plan_generic, pack_generic, tile_generic};
  return k;
}

const FGemmKernels& fgemm_kernels_for(Isa isa) {
#if R1X_X86_KERNELS  // the ISA translation units are only built for x86-64 (CMakeLists.txt)
  switch (isa) {
    case Isa::kAmx: return fgemm_kernels_amx();
    case Isa::kAvx512: return fgemm_kernels_avx512();
    case Isa::kAvx2: return fgemm_kernels_avx2();
    default: return fgemm_kernels_generic();
  }
#else
  (void)isa;
  return fgemm_kernels_generic();
#endif
}

}  // namespace r1x::cpu
