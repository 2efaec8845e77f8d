// The f32-output instantiation of the sm_90a FP8 block-scaled grouped GEMM (see
// grouped_gemm_sm90.cuh). Its own translation unit so that the CUTLASS instantiations compile
// in parallel.

#include "cuda/grouped_gemm_sm90.cuh"

namespace r1x::cuda::sm90 {

#if defined(R1X_GROUPED_SM90)

using Fp8GroupedF32 = GroupedGemmRunner<Fp8GroupedKernel<float, Fp8GroupedConfig>>;

size_t fp8_grouped_gemm_sm90_f32_workspace_bytes(int groups) {
  return Fp8GroupedF32::workspace_bytes(groups);
}

cudaError_t fp8_grouped_gemm_sm90_f32(const GroupedGemmSm90Problem& p, void* workspace,
                                      size_t workspace_bytes, cudaStream_t stream) {
  return Fp8GroupedF32::run(p, workspace, workspace_bytes, stream);
}

#else

size_t fp8_grouped_gemm_sm90_f32_workspace_bytes(int) { return 0; }

cudaError_t fp8_grouped_gemm_sm90_f32(const GroupedGemmSm90Problem&, void*, size_t,
                                      cudaStream_t) {
  return cudaErrorNotSupported;
}

#endif  // R1X_GROUPED_SM90

}  // namespace r1x::cuda::sm90
