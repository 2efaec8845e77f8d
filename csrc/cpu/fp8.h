// CPU entry points of the FP8 op family (threaded drivers over the active ISA's kernels).
// Raw pointers and sizes, the same shape as the CUDA launch API (csrc/cuda/launch.h).
#pragma once

#include <cstdint>

#include "cpu/kernels.h"

namespace r1x::cpu {

// scale = max(amax, 1e-4) / 448 (NaN stays NaN), rounded up to a power of two if ue8m0.
float fp8_scale_from_amax(float amax, bool ue8m0);

void quant_fp8_per_token_group(const void* x, DType dtype, int64_t rows, int64_t k,
                               int64_t group_size, bool ue8m0, uint8_t* q, float* scale);
void quant_fp8_per_block(const void* w, DType dtype, int64_t n, int64_t k, int64_t block_size,
                         bool ue8m0, uint8_t* q, float* scale);
void dequant_fp8(const uint8_t* q, const float* scale, int64_t batch, int64_t rows,
                 int64_t cols, int64_t block_r, int64_t block_c, float* out);
// args.m, args.n > 0, args.k > 0 and a multiple of 128.
void fp8_gemm(const GemmArgs& args);

}  // namespace r1x::cpu
