// Internal interface between the grouped-GEMM dispatcher (grouped_gemm.cu) and the CUTLASS
// grouped (pointer-array) instantiations (grouped_gemm_sm90_bf16{,_grad_a,_grad_b}.cu,
// fp8_grouped_gemm_sm90_{bf16,f32}.cu). CUTLASS-free on purpose, so that only the instantiation
// translation units pay for the CUTLASS headers.
//
// The groups' row ranges never reach the host: every instantiation launches a small kernel that
// reads `offs` on the device and writes CUTLASS's per-group arguments (problem shapes, operand
// pointers, strides) into the workspace, and then runs CUTLASS's grouped kernel with
// host_problem_shapes = nullptr, so that its persistent tile scheduler reads the problem shapes
// from device memory. Empty groups have no tiles; rows past offs[groups - 1] are not written.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace r1x::cuda::sm90 {

// Group g owns rows [start_g, end_g) of the m-row operands, with start_g = clamp(offs[g - 1],
// 0, m) and end_g = clamp(offs[g], start_g, m) (offs[-1] = 0).
//
// bf16 grouped GEMM, forward: out[rows of g] = a[rows of g] @ b[g].T
//   a   [m, k] bf16 row-major, b [groups, n, k] bf16 row-major, out [m, ldo] bf16 row-major.
//   Requirements: k % 8 == 0, ldo % 8 == 0, a, b, out 16-byte aligned.
// bf16 grad_a: out[rows of g] = grad[rows of g] @ b[g]
//   a = grad [m, n], b = b [groups, n, k], out [m, ldo]; n % 8 == 0, k % 8 == 0, ldo % 8 == 0.
// bf16 grad_b: out[g] = grad[rows of g].T @ a[rows of g]
//   a = grad [m, n], b = a [m, k], out [groups, n, ldo]; n % 8 == 0, k % 8 == 0, ldo % 8 == 0.
//   Empty groups are not written.
// FP8 block-scaled grouped GEMM: fp8_gemm per group
//   a   [m, k] e4m3, b [groups, n, k] e4m3, k % 128 == 0, out [m, ldo] bf16 or fp32 with
//       ldo * sizeof(out) % 16 == 0; a, b, out 16-byte aligned.
//   sfa the A scales regrouped per group, M-major (what the CUTLASS mainloop reads): group g's
//       block starts at sfa + start_g * (k / 128) and holds (k / 128) x rows_g floats,
//       element (kb, i) at kb * rows_g + i, i.e. the scale of row start_g + i for k-block kb.
//   sfb [groups, k / 128, ceil(n / 128)] fp32: each expert's B scales, N-major.
struct GroupedGemmSm90Problem {
  const void* a = nullptr;
  const void* b = nullptr;
  void* out = nullptr;
  const int32_t* offs = nullptr;
  const float* sfa = nullptr;  // FP8 only
  const float* sfb = nullptr;  // FP8 only
  int64_t ldo = 0;
  int m = 0;
  int n = 0;
  int k = 0;
  int groups = 0;
};

// Workspace: the per-group argument arrays plus CUTLASS's own scratch (one TMA descriptor set
// per SM). Depends only on the group count and the current device. Must be 256-byte aligned.
size_t grouped_gemm_sm90_bf16_workspace_bytes(int groups);
size_t grouped_gemm_sm90_bf16_grad_a_workspace_bytes(int groups);
size_t grouped_gemm_sm90_bf16_grad_b_workspace_bytes(int groups);
size_t fp8_grouped_gemm_sm90_bf16_workspace_bytes(int groups);
size_t fp8_grouped_gemm_sm90_f32_workspace_bytes(int groups);

// Launch on `stream`. Returns cudaErrorInvalidValue when the problem breaks the requirements
// above or CUTLASS rejects it, the CUDA error of a launch otherwise. Built only for sm_90a;
// elsewhere cudaErrorNotSupported.
cudaError_t grouped_gemm_sm90_bf16(const GroupedGemmSm90Problem& p, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream);
cudaError_t grouped_gemm_sm90_bf16_grad_a(const GroupedGemmSm90Problem& p, void* workspace,
                                          size_t workspace_bytes, cudaStream_t stream);
cudaError_t grouped_gemm_sm90_bf16_grad_b(const GroupedGemmSm90Problem& p, void* workspace,
                                          size_t workspace_bytes, cudaStream_t stream);
cudaError_t fp8_grouped_gemm_sm90_bf16(const GroupedGemmSm90Problem& p, void* workspace,
                                       size_t workspace_bytes, cudaStream_t stream);
cudaError_t fp8_grouped_gemm_sm90_f32(const GroupedGemmSm90Problem& p, void* workspace,
                                      size_t workspace_bytes, cudaStream_t stream);

}  // namespace r1x::cuda::sm90
