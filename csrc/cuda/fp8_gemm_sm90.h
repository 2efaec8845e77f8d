// Internal interface between the FP8 GEMM dispatcher (fp8_gemm.cu) and the per-output-dtype
// CUTLASS instantiations (fp8_gemm_sm90_{bf16,f32}.cu). CUTLASS-free on purpose, so that only
// the instantiation translation units pay for the CUTLASS headers.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace r1x::cuda::sm90 {

// Scale-factor granularity the kernels are built for: A 1x128 (per row, per 128 of k),
// B 128x128.
constexpr int kFp8ScaleBlock = 128;

// Operands in the layouts the CUTLASS kernel consumes directly.
//   a   [m, k] e4m3, row-major (K-major), 16-byte aligned, k % 128 == 0
//   b   [n, k] e4m3, row-major (K-major), 16-byte aligned
//   sfa [k / 128, sfa_ld] fp32: M-major, sfa[kb * sfa_ld + i] scales row i of a for k-block kb.
//       sfa_ld >= m, sfa_ld % 4 == 0, 16-byte aligned (it is read with TMA); entries
//       [m, sfa_ld) of each k-block are padding (their value only reaches output rows >= m,
//       which are never written).
//   sfb [k / 128, ceil(n / 128)] fp32: N-major, sfb[kb * ceil(n / 128) + j] scales rows
//       [128 j, 128 j + 128) of b for k-block kb (read with cp.async, 4-byte aligned is enough).
//   out [m, ldo] row-major, columns [0, n) written; 16-byte aligned, ldo * sizeof(out) % 16 == 0.
struct Fp8GemmSm90Problem {
  const uint8_t* a = nullptr;
  const uint8_t* b = nullptr;
  const float* sfa = nullptr;
  int64_t sfa_ld = 0;
  const float* sfb = nullptr;
  void* out = nullptr;
  int64_t ldo = 0;
  int m = 0;
  int n = 0;
  int k = 0;
};

// CUTLASS scratch (tile scheduler / epilogue workspace) for the problem; may be 0.
size_t fp8_gemm_sm90_bf16_workspace_bytes(int m, int n, int k);
size_t fp8_gemm_sm90_f32_workspace_bytes(int m, int n, int k);

// Launch on `stream`. `workspace` must hold the bytes above (16-byte aligned; may be null when
// they are 0). Returns cudaErrorInvalidValue when CUTLASS rejects the problem, the CUDA error
// of the launch otherwise. Built only for sm_90a; elsewhere cudaErrorNotSupported.
cudaError_t fp8_gemm_sm90_bf16(const Fp8GemmSm90Problem& p, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream);
cudaError_t fp8_gemm_sm90_f32(const Fp8GemmSm90Problem& p, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream);

}  // namespace r1x::cuda::sm90
