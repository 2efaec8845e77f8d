// Torch-free launch API of r1x's Mixture-of-Experts CUDA kernels (DESIGN.md 3.3).
//
// Same conventions as launch.h: raw device pointers, sizes and a stream; dense row-major
// tensors unless a leading dimension says otherwise; every function returns cudaSuccess or the
// first CUDA error (cudaErrorInvalidValue for arguments it cannot take) and never aborts. No
// function reads device memory on the host or synchronises: group offsets stay on the device.
//
// Group offsets (`offs`, int32 [groups]) are cumulative END offsets, torch._grouped_mm's layout:
// group g owns rows [offs[g-1], offs[g]) (offs[-1] = 0). They must be nondecreasing and within
// [0, m]; offsets that are not get clamped into range on the device (the result is then
// unspecified, but nothing is read or written out of bounds).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/launch.h"

namespace r1x::cuda {

// ---- routing ----------------------------------------------------------------------------
struct MoeRouteParams {
  int64_t top_k = 1;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  bool softmax = false;  // score function: softmax over the experts, else sigmoid
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
};

// logits [tokens, experts] (fp32/bf16/fp16), bias [experts] or null ->
// weights [tokens, top_k] fp32, ids [tokens, top_k] int32 (python/r1x/reference.py's
// moe_topk_route): scores = sigmoid/softmax(logits) in fp32, choice = scores + bias; with
// n_group > 1 only the topk_group groups with the largest sum of their top-2 choices stay
// eligible (the others become -inf); ids = the top_k choices in descending order (ties: lower
// index first; NaN ranks above everything, as torch.sort does); weights = the unbiased scores,
// divided by (their sum + 1e-20) if norm_topk_prob, times routed_scaling_factor.
// Requirements: 1 <= top_k <= topk_group * experts / n_group, experts % n_group == 0,
// experts <= moe_route_max_experts(). tokens == 0 launches nothing.
int64_t moe_route_max_experts();
cudaError_t moe_topk_route(const void* logits, DType logits_dtype, const void* bias,
                           DType bias_dtype, int64_t tokens, int64_t experts,
                           const MoeRouteParams& params, float* weights, int32_t* ids,
                           cudaStream_t stream);

// ---- dispatch -----------------------------------------------------------------------------
// ids [tokens, top_k] (int32, or int64 if ids_int64), x [tokens, row_bytes / element size] ->
//   perm     int32 [tokens * top_k]: the flat indices t * top_k + j sorted by expert, stable
//   offs     int32 [experts]: cumulative end offsets (offs[e] = rows of experts <= e)
//   x_sorted [tokens * top_k] rows of row_bytes: x_sorted[r] = x[perm[r] / top_k]
// A stable radix sort of the expert ids (deterministic). An id outside [0, experts) sorts after
// every expert and is counted by none of them: its rows land past offs[experts - 1], where the
// grouped GEMMs treat them as padding.
// x / x_sorted may be null when row_bytes == 0.
size_t moe_dispatch_workspace_bytes(int64_t tokens, int64_t top_k, int64_t experts);
cudaError_t moe_dispatch(const void* x, int64_t row_bytes, const void* ids, bool ids_int64,
                         int64_t tokens, int64_t top_k, int64_t experts, void* x_sorted,
                         int32_t* offs, int32_t* perm, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream);

// ---- combine ------------------------------------------------------------------------------
// y_sorted [tokens * top_k, cols] (fp32/bf16/fp16), weights [tokens, top_k] (fp32/bf16/fp16),
// perm [tokens * top_k] int32 (as moe_dispatch returns it) -> out [tokens, cols], y's dtype:
// out[t] = sum_j weights[t, j] * y_sorted[inv[t * top_k + j]], accumulated in fp32 in slot
// order j = 0 .. top_k - 1 (deterministic, no atomics), inv the inverse of perm. A slot that
// perm does not reach (perm not a permutation) contributes nothing.
size_t moe_combine_workspace_bytes(int64_t tokens, int64_t top_k);
cudaError_t moe_combine(const void* y_sorted, DType y_dtype, const void* weights, DType w_dtype,
                        const int32_t* perm, int64_t tokens, int64_t top_k, int64_t cols,
                        void* out, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// The backward of moe_combine: grad_out [tokens, cols] (y's dtype) -> grad_y [tokens * top_k,
// cols] (y's dtype) and grad_w [tokens, top_k] fp32: grad_y[inv[s]] = w[s] * grad_out[s / top_k]
// and grad_w[s] = dot(grad_out[s / top_k], y_sorted[inv[s]]) in fp32. Rows of grad_y that perm
// does not reach are zero. Workspace: moe_combine_workspace_bytes(tokens, top_k).
cudaError_t moe_combine_backward(const void* grad_out, const void* y_sorted, DType y_dtype,
                                 const void* weights, DType w_dtype, const int32_t* perm,
                                 int64_t tokens, int64_t top_k, int64_t cols, void* grad_y,
                                 float* grad_w, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream);

// ---- grouped GEMMs ------------------------------------------------------------------------
// grouped_gemm: a [m, k], b [groups, n, k] (both kFloat32 or kBFloat16), offs [groups] ->
// out [m, ldo] (columns [0, n) written): out[rows of g] = a[rows of g] @ b[g].T with fp32
// accumulation; rows >= offs[groups - 1] are zero. bf16 with k % 8 == 0, ldo % 8 == 0 and
// 16-byte aligned pointers runs the sm_90a CUTLASS grouped kernel; everything else a tiled
// CUDA-core kernel. m, n, k, groups >= 1 (the glue handles empty shapes), ldo >= n.
size_t grouped_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, int64_t groups,
                                    DType dtype);
cudaError_t grouped_gemm(const void* a, const void* b, const int32_t* offs, void* out,
                         DType dtype, int64_t m, int64_t n, int64_t k, int64_t groups,
                         int64_t ldo, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream);

// fp8_grouped_gemm: fp8_gemm (launch.h) per group. a [m, k] e4m3, a_scale [m, k / 128] fp32,
// b [groups, n, k] e4m3, b_scale [groups, ceil(n / 128), k / 128] fp32 -> out [m, ldo] of
// out_dtype (kBFloat16 or kFloat32); rows >= offs[groups - 1] are zero. Requirements:
// k % 128 == 0, m, n, k, groups >= 1, ldo >= n, ldo * sizeof(out) % 16 == 0, a, b, out 16-byte
// aligned, scales 4-byte aligned, workspace 256-byte aligned.
size_t fp8_grouped_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, int64_t groups,
                                        DType out_dtype);
cudaError_t fp8_grouped_gemm(const uint8_t* a, const float* a_scale, const uint8_t* b,
                             const float* b_scale, const int32_t* offs, void* out,
                             DType out_dtype, int64_t m, int64_t n, int64_t k, int64_t groups,
                             int64_t ldo, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);

// grouped_gemm's backward, fp32 accumulation:
//   grad_a: grad [m, n], b [groups, n, k] -> out [m, k], out[rows of g] = grad[rows of g] @ b[g];
//           rows >= offs[groups - 1] are zero.
//   grad_b: grad [m, n], a [m, k] -> out [groups, n, k], out[g] = grad[rows of g].T @ a[rows
//           of g]; empty groups are zero.
// bf16 with n % 8 == 0, k % 8 == 0 and 16-byte aligned pointers runs CUTLASS grouped kernels
// on sm_90a (with MN-major operands where the product needs them), everything else a tiled
// CUDA-core kernel. m, n, k, groups >= 1; the workspace must be 256-byte aligned.
size_t grouped_gemm_grad_workspace_bytes(int64_t m, int64_t n, int64_t k, int64_t groups,
                                         DType dtype);
cudaError_t grouped_gemm_grad_a(const void* grad, const void* b, const int32_t* offs, void* out,
                                DType dtype, int64_t m, int64_t n, int64_t k, int64_t groups,
                                void* workspace, size_t workspace_bytes, cudaStream_t stream);
cudaError_t grouped_gemm_grad_b(const void* grad, const void* a, const int32_t* offs, void* out,
                                DType dtype, int64_t m, int64_t n, int64_t k, int64_t groups,
                                void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace r1x::cuda
