// The bf16 CUTLASS grouped GEMM of grouped_gemm's backward, grad_b: out[g] = grad[rows of g].T @ a[rows of g]
// (see grouped_gemm_sm90.cuh). Its own translation unit so that the CUTLASS instantiations
// compile in parallel.

#include "cuda/grouped_gemm_sm90.cuh"

namespace r1x::cuda::sm90 {

#if defined(R1X_GROUPED_SM90)

using Bf16GroupedGradB =
    GroupedGemmRunner<Bf16GroupedKernel<Bf16GroupedConfig, GroupedProduct::kGradB>>;

size_t grouped_gemm_sm90_bf16_grad_b_workspace_bytes(int groups) {
  return Bf16GroupedGradB::workspace_bytes(groups);
}

cudaError_t grouped_gemm_sm90_bf16_grad_b(const GroupedGemmSm90Problem& p, void* workspace,
                                          size_t workspace_bytes, cudaStream_t stream) {
  return Bf16GroupedGradB::run(p, workspace, workspace_bytes, stream);
}

#else

size_t grouped_gemm_sm90_bf16_grad_b_workspace_bytes(int) { return 0; }

cudaError_t grouped_gemm_sm90_bf16_grad_b(const GroupedGemmSm90Problem&, void*, size_t,
                                          cudaStream_t) {
  return cudaErrorNotSupported;
}

#endif  // R1X_GROUPED_SM90

}  // namespace r1x::cuda::sm90
