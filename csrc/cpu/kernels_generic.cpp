// Portable kernels: plain C++ that the compiler vectorises for the baseline x86-64 (SSE2)
// target. The fallback on CPUs without AVX2, and a cross-check for the vector kernels.
#include <algorithm>
#include <cstring>

#include "cpu/fp8_scalar.h"
#include "cpu/kernels.h"

namespace r1x::cpu {
namespace {

float amax_generic(const void* x, DType dtype, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, abs_bits(load_as_f32(x, int(dtype), i)));
  return bits_f32(m);
}

void quantize_generic(const void* x, DType dtype, int64_t n, float scale, uint8_t* q) {
  for (int64_t i = 0; i < n; ++i) q[i] = f32_to_e4m3(load_as_f32(x, int(dtype), i) / scale);
}

struct DecodeTable {
  float v[256];
  DecodeTable() {
    for (int i = 0; i < 256; ++i) v[i] = e4m3_to_f32(static_cast<uint8_t>(i));
  }
};
const DecodeTable& decode_table() {
  static const DecodeTable t;
  return t;
}

void dequantize_generic(const uint8_t* q, int64_t n, float scale, float* out) {
  const float* t = decode_table().v;
  for (int64_t i = 0; i < n; ++i) out[i] = t[q[i]] * scale;
}

// GEMM: A is decoded once to fp32 ([m, k]); each tile decodes 128-wide chunks of B rows and
// takes fp32 dot products with 8 independent partial sums (vectorisable without reassociation).
GemmPlan plan_generic(int64_t m, int64_t n, int64_t k) {
  GemmPlan p;
  p.tile_m = std::min<int64_t>(m, 64);
  p.tile_n = 32;
  p.pack_rows = 1;
  p.packed_a_bytes = static_cast<size_t>(m * k) * sizeof(float);
  p.scratch_bytes = static_cast<size_t>(p.tile_m * p.tile_n + kGemmBlock) * sizeof(float);
  return p;
}

void pack_a_generic(const GemmArgs& args, const GemmPlan&, int64_t m0, int64_t m1, void* packed) {
  const float* t = decode_table().v;
  float* dst = static_cast<float*>(packed);
  for (int64_t i = m0 * args.k; i < m1 * args.k; ++i) dst[i] = t[args.a[i]];
}

float dot128(const float* a, const float* b) {
  float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < kGemmBlock; i += 8)
    for (int j = 0; j < 8; ++j) p[j] += a[i + j] * b[i + j];
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

void tile_generic(const GemmArgs& args, const GemmPlan& plan, const void* packed, int64_t m0,
                  int64_t m1, int64_t n0, int64_t n1, void* scratch, TileCtx&) {
  const float* a = static_cast<const float*>(packed);
  const float* t = decode_table().v;
  const int64_t k = args.k, kblocks = k / kGemmBlock, tn = n1 - n0;
  float* acc = static_cast<float*>(scratch);  // [tile_m, tile_n]
  float* brow = acc + plan.tile_m * plan.tile_n;
  std::fill(acc, acc + (m1 - m0) * tn, 0.0f);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* b = args.b + n * k;
    const float* sb = args.b_scale + (n / kGemmBlock) * kblocks;
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      for (int64_t i = 0; i < kGemmBlock; ++i) brow[i] = t[b[kb * kGemmBlock + i]];
      for (int64_t m = m0; m < m1; ++m) {
        const float s = args.a_scale[m * kblocks + kb] * sb[kb];
        acc[(m - m0) * tn + (n - n0)] += s * dot128(a + m * k + kb * kGemmBlock, brow);
      }
    }
  }
  const size_t esize = args.out_dtype == DType::kF32 ? 4 : 2;
  for (int64_t m = m0; m < m1; ++m)
    store_row_scalar(acc + (m - m0) * tn, tn, int(args.out_dtype),
                     static_cast<char*>(args.out) + (m * args.n + n0) * esize);
}

}  // namespace

const Kernels& kernels_generic() {
  static const Kernels k{Isa::kGeneric, amax_generic, quantize_generic, dequantize_generic,
                         plan_generic,  pack_a_generic, tile_generic};
  return k;
}

}  // namespace r1x::cpu
