// FP8 block-scaled GEMM dispatcher (launch.h's fp8_gemm / fp8_gemm_workspace_bytes).
//
// No CUTLASS here: this translation unit validates the problem, rewrites the caller's
// row-major (K-major) scale tensors into the MN-major layouts the sm90 CUTLASS collective
// reads, inside the caller's workspace, and calls the instantiation for the output dtype.
//
// Workspace layout (every section starts at a multiple of 256 bytes):
//   [sfa] (k / 128) x sfa_ld fp32, M-major A scales; sfa_ld = m rounded up to 4 so that the
//         TMA row stride is a multiple of 16 bytes; rows [m, sfa_ld) are zero.
//   [sfb] (k / 128) x ceil(n / 128) fp32, N-major B scales.
//   [cutlass] the kernel's own scratch (0 bytes for the default persistent scheduler).

#include "cuda/launch.h"

#include "cuda/fp8_gemm_sm90.h"

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace r1x::cuda {
namespace {

constexpr int64_t kBlock = sm90::kFp8ScaleBlock;
constexpr size_t kSectionAlign = 256;

inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

inline bool aligned(const void* p, uintptr_t a) {
  return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0;
}

inline size_t out_elem_bytes(DType t) {
  return t == DType::kBFloat16 ? 2 : (t == DType::kFloat32 ? 4 : 0);
}

struct WorkspacePlan {
  int64_t sfa_ld = 0;  // padded M extent of the M-major A scales
  int64_t kb = 0;      // k / 128
  int64_t nb = 0;      // ceil(n / 128)
  size_t sfb_offset = 0;
  size_t cutlass_offset = 0;
  size_t cutlass_bytes = 0;
  size_t total = 0;
};

// False for shapes the kernel cannot take (independent of pointers, ldo and alignment).
bool shape_supported(int64_t m, int64_t n, int64_t k, DType out_dtype) {
  if (m <= 0 || n <= 0 || k <= 0 || k % kBlock != 0) return false;
  if (out_elem_bytes(out_dtype) == 0) return false;
  // CUTLASS's problem shape is 32-bit, and so are the strides of its scale layouts.
  if (m > INT_MAX || n > INT_MAX || k > INT_MAX) return false;
  const int64_t sfa_ld = (m + 3) / 4 * 4;
  return sfa_ld * (k / kBlock) <= INT_MAX;
}

WorkspacePlan plan_workspace(int64_t m, int64_t n, int64_t k, DType out_dtype) {
  WorkspacePlan w;
  w.sfa_ld = (m + 3) / 4 * 4;
  w.kb = k / kBlock;
  w.nb = (n + kBlock - 1) / kBlock;
  w.sfb_offset = align_up(static_cast<size_t>(w.sfa_ld * w.kb) * sizeof(float), kSectionAlign);
  w.cutlass_offset =
      w.sfb_offset + align_up(static_cast<size_t>(w.nb * w.kb) * sizeof(float), kSectionAlign);
  w.cutlass_bytes = out_dtype == DType::kBFloat16
                        ? sm90::fp8_gemm_sm90_bf16_workspace_bytes(static_cast<int>(m),
                                                                   static_cast<int>(n),
                                                                   static_cast<int>(k))
                        : sm90::fp8_gemm_sm90_f32_workspace_bytes(static_cast<int>(m),
                                                                  static_cast<int>(n),
                                                                  static_cast<int>(k));
  w.total = w.cutlass_offset + align_up(w.cutlass_bytes, kSectionAlign);
  return w;
}

// Transposes in [rows, cols] (row-major) to out [cols, ld] (rows contiguous), writing zeros to
// out rows [rows, ld). blockIdx.z picks the tensor: 0 = A scales, 1 = B scales, so one launch
// does both. 32x32 tiles through shared memory keep both the reads and the writes coalesced.
struct TransposeJob {
  const float* in;
  float* out;
  int64_t rows;
  int64_t ld;
};

constexpr int kTile = 32;
constexpr int kRowsPerPass = 8;

__global__ void __launch_bounds__(kTile * kRowsPerPass)
transpose_scales_kernel(TransposeJob sfa, TransposeJob sfb, int64_t cols) {
  __shared__ float tile[kTile][kTile + 1];
  const TransposeJob job = blockIdx.z == 0 ? sfa : sfb;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  if (r0 >= job.ld) return;  // uniform per CTA: the grid covers the larger of the two jobs
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col_tiles = (cols + kTile - 1) / kTile;
  for (int64_t ct = blockIdx.y; ct < col_tiles; ct += gridDim.y) {
    const int64_t c0 = ct * kTile;
#pragma unroll
    for (int j = ty; j < kTile; j += kRowsPerPass) {
      const int64_t r = r0 + j, c = c0 + tx;
      tile[j][tx] = (r < job.rows && c < cols) ? job.in[r * cols + c] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int j = ty; j < kTile; j += kRowsPerPass) {
      const int64_t c = c0 + j, r = r0 + tx;
      if (c < cols && r < job.ld) job.out[c * job.ld + r] = tile[tx][j];
    }
    __syncthreads();
  }
}

}  // namespace

size_t fp8_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, DType out_dtype) {
  // Unsupported shapes need nothing: fp8_gemm rejects (or, if empty, skips) them.
  if (!shape_supported(m, n, k, out_dtype)) return 0;
  return plan_workspace(m, n, k, out_dtype).total;
}

cudaError_t fp8_gemm(const uint8_t* a, const float* a_scale, const uint8_t* b,
                     const float* b_scale, void* out, DType out_dtype, int64_t m, int64_t n,
                     int64_t k, int64_t ldo, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;  // nothing to write
  if (!shape_supported(m, n, k, out_dtype)) return cudaErrorInvalidValue;
  const size_t elem = out_elem_bytes(out_dtype);
  if (ldo < n || (static_cast<size_t>(ldo) * elem) % 16 != 0) return cudaErrorInvalidValue;
  // a, b and out are TMA tensors (16-byte aligned base addresses); the scales are only read
  // by the transpose kernel.
  if (a == nullptr || b == nullptr || out == nullptr || a_scale == nullptr || b_scale == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (!aligned(a, 16) || !aligned(b, 16) || !aligned(out, 16) || !aligned(a_scale, 4) ||
      !aligned(b_scale, 4)) {
    return cudaErrorInvalidValue;
  }
  const WorkspacePlan plan = plan_workspace(m, n, k, out_dtype);
  if (workspace == nullptr || workspace_bytes < plan.total || !aligned(workspace, 256)) {
    return cudaErrorInvalidValue;
  }

  auto* ws = static_cast<uint8_t*>(workspace);
  float* sfa = reinterpret_cast<float*>(ws);
  float* sfb = reinterpret_cast<float*>(ws + plan.sfb_offset);
  void* cutlass_ws = plan.cutlass_bytes > 0 ? ws + plan.cutlass_offset : nullptr;

  {
    const TransposeJob ja{a_scale, sfa, m, plan.sfa_ld};
    const TransposeJob jb{b_scale, sfb, plan.nb, plan.nb};
    const int64_t row_tiles = ((plan.sfa_ld > plan.nb ? plan.sfa_ld : plan.nb) + kTile - 1) / kTile;
    const int64_t col_tiles = (plan.kb + kTile - 1) / kTile;
    const dim3 grid(static_cast<unsigned>(row_tiles),
                    static_cast<unsigned>(col_tiles < 65535 ? col_tiles : 65535), 2);
    transpose_scales_kernel<<<grid, dim3(kTile, kRowsPerPass), 0, stream>>>(ja, jb, plan.kb);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }

  sm90::Fp8GemmSm90Problem p;
  p.a = a;
  p.b = b;
  p.sfa = sfa;
  p.sfa_ld = plan.sfa_ld;
  p.sfb = sfb;
  p.out = out;
  p.ldo = ldo;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  return out_dtype == DType::kBFloat16
             ? sm90::fp8_gemm_sm90_bf16(p, cutlass_ws, plan.cutlass_bytes, stream)
             : sm90::fp8_gemm_sm90_f32(p, cutlass_ws, plan.cutlass_bytes, stream);
}

}  // namespace r1x::cuda
