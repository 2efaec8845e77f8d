// The CPU kernel table. One table per ISA level, each defined in its own translation unit
// (kernels_<isa>.cpp, compiled with that ISA's flags); the drivers (fp8_quant.cpp,
// fp8_gemm.cpp) own threading and call through active_kernels(). Kernel TUs include no torch
// header, so no inline torch code is ever emitted with instructions the CPU may lack.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/isa.h"

namespace r1x::cpu {

enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// IEEE binary16 as a C++ arithmetic type (conversions round to nearest even): GCC and Clang
// spell it _Float16 on x86-64 and __fp16 on aarch64 (where GCC 12 has no _Float16 in C++).
#if defined(__aarch64__)
using Float16 = __fp16;
#else
using Float16 = _Float16;
#endif

// out[m, n] = sum_kb a_scale[m, kb] * b_scale[n / 128, kb] * sum_{k in kb} a[m, k] * b[n, k]
struct GemmArgs {
  const uint8_t* a;      // [m, k] e4m3, row-major
  const float* a_scale;  // [m, k / 128]
  const uint8_t* b;      // [n, k] e4m3, row-major
  const float* b_scale;  // [ceil(n / 128), k / 128]
  void* out;             // [m, n], kF32 or kBF16
  DType out_dtype;
  int64_t m, n, k;       // k % 128 == 0, k > 0
};

// How the driver splits a GEMM: it packs A once (gemm_pack_a over disjoint row ranges that
// start at multiples of pack_rows), then runs gemm_tile over a grid of tile_m x tile_n
// output tiles, each thread with its own scratch and TileCtx.
struct GemmPlan {
  int64_t tile_m, tile_n;
  int64_t pack_rows;
  size_t packed_a_bytes;
  size_t scratch_bytes;
  int variant = 0;  // kernel-specific choice made by gemm_plan (e.g. another ISA's path)
};

// What one thread's tile calls share (gemm_tile here, FGemmKernels::tile in fgemm.h). Before
// every call the driver names the tile this thread computes next: its arguments (a GemmArgs or
// an FGemmArgs, as the call's own; null: none) and output range, so that a kernel can bring
// that tile's weights into cache while it computes this one.
struct TileCtx {
  const void* next_args = nullptr;
  int64_t next_m0 = 0, next_m1 = 0, next_n0 = 0, next_n1 = 0;
};

// Brings rows [r0, r1) of a matrix (row stride rs, rows of len elements of es bytes) into L2 a
// slice per step, over the `steps` steps of a tile's work: a kernel requests the next tile's
// weights while it computes this one, so they arrive without stalling either tile.
struct SpreadPrefetch {
  const uint8_t* p = nullptr;
  int64_t lines = 0, steps = 1;
  SpreadPrefetch() = default;
  SpreadPrefetch(const void* base, int64_t r0, int64_t r1, int64_t rs, int64_t len, int64_t es, int64_t n)
      : p(static_cast<const uint8_t*>(base) + r0 * rs * es),
        lines(r1 > r0 ? (((r1 - 1 - r0) * rs + len) * es + 63) / 64 : 0),
        steps(n > 0 ? n : 1) {}
  void step(int64_t i) const {
    for (int64_t l = lines * i / steps; l < lines * (i + 1) / steps; ++l) __builtin_prefetch(p + l * 64, 0, 2);
  }
};

// The next tile's weight rows of an FP8 GEMM (ctx.next_args a GemmArgs, or null).
inline SpreadPrefetch next_fp8_weights(const TileCtx& ctx, int64_t steps) {
  const GemmArgs* na = static_cast<const GemmArgs*>(ctx.next_args);
  return na ? SpreadPrefetch(na->b, ctx.next_n0, ctx.next_n1, na->k, na->k, 1, steps) : SpreadPrefetch();
}

struct Kernels {
  Isa isa;
  // max |x[i]| over n contiguous elements; NaN if any element is NaN.
  float (*amax)(const void* x, DType dtype, int64_t n);
  // q[i] = e4m3(clamp(x[i] / scale, -448, 448)), IEEE division, round to nearest even.
  void (*quantize)(const void* x, DType dtype, int64_t n, float scale, uint8_t* q);
  // out[i] = float(q[i]) * scale.
  void (*dequantize)(const uint8_t* q, int64_t n, float scale, float* out);
  GemmPlan (*gemm_plan)(int64_t m, int64_t n, int64_t k);
  void (*gemm_pack_a)(const GemmArgs& args, const GemmPlan& plan, int64_t m0, int64_t m1,
                      void* packed);
  void (*gemm_tile)(const GemmArgs& args, const GemmPlan& plan, const void* packed, int64_t m0,
                    int64_t m1, int64_t n0, int64_t n1, void* scratch, TileCtx& ctx);
  // Runs `iters` rounds of the ISA's densest GEMM instruction on independent accumulators (the
  // one its GEMM kernels are built on) and returns the flops done: the machine's peak, measured
  // (peak.cpp times it on every thread at once). Null where there is none (generic).
  double (*peak_probe)(int64_t iters) = nullptr;
  const char* peak_unit = "";
};

// GFLOP/s of kern.peak_probe on every thread at once, over about `seconds` (0 without a probe).
double peak_gflops(const Kernels& kern, double seconds = 0.05);

const Kernels& kernels_generic();
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
const Kernels& kernels_amx();
const Kernels& kernels_for(Isa isa);
inline const Kernels& active_kernels() { return kernels_for(active_isa()); }

}  // namespace r1x::cpu
