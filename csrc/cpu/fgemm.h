// Float (bf16 / fp32) GEMM kernels with arbitrary operand strides: the per-group GEMM behind
// grouped_gemm and its two backward products. One table per ISA level, each in its own
// translation unit (fgemm_<isa>.cpp); the driver (grouped_gemm.cpp) owns the threading.
//
//   out[i, j] = sum_p x(i, p) * y(p, j),   x(i, p) = x.ptr[i * x.rs + p * x.cs] (elements)
//
// with fp32 accumulation and out row-major (leading dimension ldo) in the operands' dtype.
// Strides let one kernel serve a @ b.T (forward), grad @ b (grad of a) and grad.T @ a (grad
// of b) without materialising a transposed copy of any operand.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/kernels.h"

namespace r1x::cpu {

struct MatView {
  const void* ptr;
  int64_t rs, cs;  // element strides of the row and column index
  MatView t() const { return {ptr, cs, rs}; }
};

struct FGemmArgs {
  MatView x;  // [m, k]
  MatView y;  // [k, n]
  void* out;  // [m, ldo]
  int64_t ldo;
  DType dtype;  // kF32 or kBF16, for x, y and out
  int64_t m, n, k;  // m, n, k > 0
};

// The driver packs once per call (fgemm_pack over disjoint unit ranges [0, pack_units)), then
// runs fgemm_tile over tile_m x tile_n output tiles, each thread with its own scratch and
// TileCtx (kernels.h: next_args is then an FGemmArgs).
struct FGemmPlan {
  int64_t tile_m = 0, tile_n = 0;
  int64_t pack_units = 0;
  size_t packed_bytes = 0;
  size_t scratch_bytes = 0;
  int variant = 0;
};

struct FGemmKernels {
  Isa isa;
  FGemmPlan (*plan)(const FGemmArgs& args);
  void (*pack)(const FGemmArgs& args, const FGemmPlan& plan, int64_t u0, int64_t u1,
               void* packed);
  void (*tile)(const FGemmArgs& args, const FGemmPlan& plan, const void* packed, int64_t m0,
               int64_t m1, int64_t n0, int64_t n1, void* scratch, TileCtx& ctx);
};

// The next tile's broadcast rows where the engines read them in place (ctx.next_args an
// FGemmArgs, or null): y's columns [n0, n1) when contiguous (a @ b.T: the weights), else x's
// rows [m0, m1) when those are (grad @ b).
inline SpreadPrefetch next_fgemm_rows(const TileCtx& ctx, int64_t steps) {
  const FGemmArgs* na = static_cast<const FGemmArgs*>(ctx.next_args);
  if (na == nullptr) return {};
  const int64_t es = na->dtype == DType::kF32 ? 4 : 2;
  if (na->y.rs == 1) return {na->y.ptr, ctx.next_n0, ctx.next_n1, na->y.cs, na->k, es, steps};
  if (na->x.cs == 1) return {na->x.ptr, ctx.next_m0, ctx.next_m1, na->x.rs, na->k, es, steps};
  return {};
}

const FGemmKernels& fgemm_kernels_generic();
const FGemmKernels& fgemm_kernels_avx2();
const FGemmKernels& fgemm_kernels_avx512();
const FGemmKernels& fgemm_kernels_amx();
const FGemmKernels& fgemm_kernels_for(Isa isa);

}  // namespace r1x::cpu
