// The fp32-output instantiation of the sm_90a FP8 block-scaled GEMM (see fp8_gemm_sm90.cuh).
// Its own translation unit so that the two CUTLASS instantiations compile in parallel.

#include "cuda/fp8_gemm_sm90.cuh"

namespace r1x::cuda::sm90 {

#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)

template struct Fp8BlockwiseGemm<float, Fp8GemmDefaultConfig>;
using Fp8GemmF32 = Fp8BlockwiseGemm<float, Fp8GemmDefaultConfig>;

size_t fp8_gemm_sm90_f32_workspace_bytes(int m, int n, int k) {
  return Fp8GemmF32::workspace_bytes(m, n, k);
}

cudaError_t fp8_gemm_sm90_f32(const Fp8GemmSm90Problem& p, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
  return Fp8GemmF32::run(p, workspace, workspace_bytes, stream);
}

#else

size_t fp8_gemm_sm90_f32_workspace_bytes(int, int, int) { return 0; }

cudaError_t fp8_gemm_sm90_f32(const Fp8GemmSm90Problem&, void*, size_t, cudaStream_t) {
  return cudaErrorNotSupported;
}

#endif  // CUTLASS_ARCH_MMA_SM90_SUPPORTED

}  // namespace r1x::cuda::sm90
