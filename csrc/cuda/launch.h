// Torch-free launch API of r1x's CUDA kernels.
//
// Everything here takes raw device pointers, sizes and a stream; the torch-facing glue
// (csrc/*_cuda.cpp) validates tensors, allocates outputs and workspaces with the caching
// allocator and calls these. All tensors are dense row-major unless a leading dimension says
// otherwise. Functions return cudaSuccess or the first CUDA error; they never abort.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace r1x::cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// ---- FP8 (e4m3) quantization ------------------------------------------------------------
// x [rows, k] (k % group_size == 0) -> q [rows, k] e4m3 bytes, scale [rows, k / group_size] fp32.
// scale = max(amax(|x| over the group), 1e-4) / 448, rounded up to a power of two if ue8m0;
// q = e4m3(x / scale), round to nearest even, saturating to +-448 (NaN stays NaN).
cudaError_t quant_fp8_per_token_group(const void* x, DType x_dtype, int64_t rows, int64_t k,
                                      int64_t group_size, bool ue8m0, uint8_t* q, float* scale,
                                      cudaStream_t stream);

// w [n, k] -> q [n, k], scale [ceil(n / block), ceil(k / block)]; the same rule per block
// (edge blocks may be partial).
cudaError_t quant_fp8_per_block(const void* w, DType w_dtype, int64_t n, int64_t k,
                                int64_t block_size, bool ue8m0, uint8_t* q, float* scale,
                                cudaStream_t stream);

// q [batch, rows, cols] e4m3, scale [batch, ceil(rows / block_r), ceil(cols / block_c)] ->
// out [batch, rows, cols] fp32, out = q * scale of its block.
cudaError_t dequant_fp8(const uint8_t* q, const float* scale, int64_t batch, int64_t rows,
                        int64_t cols, int64_t block_r, int64_t block_c, float* out,
                        cudaStream_t stream);

// ---- FP8 block-scaled GEMM (sm_90a, CUTLASS warp-specialised blockwise-scaled mainloop) ----
// out[m, n] = sum_kb a_scale[m, kb] * b_scale[n / 128, kb] * sum_{k in kb} a[m, k] * b[n, k]
// a [m, k] e4m3 row-major, a_scale [m, k / 128] fp32 row-major,
// b [n, k] e4m3 row-major, b_scale [ceil(n / 128), k / 128] fp32 row-major,
// out [m, ldo] of out_dtype (kBFloat16 or kFloat32), columns [0, n) written.
// Requirements: k % 128 == 0, k > 0, m > 0, n > 0, ldo >= n, ldo * sizeof(out) % 16 == 0,
// all pointers 16-byte aligned. The workspace (fp8_gemm_workspace_bytes) holds whatever scale
// layout transform and CUTLASS scratch the kernel needs; it must be 256-byte aligned.
size_t fp8_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, DType out_dtype);
cudaError_t fp8_gemm(const uint8_t* a, const float* a_scale, const uint8_t* b,
                     const float* b_scale, void* out, DType out_dtype, int64_t m, int64_t n,
                     int64_t k, int64_t ldo, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream);

}  // namespace r1x::cuda
