// Grouped GEMM dispatchers (moe_launch.h's grouped_gemm, fp8_grouped_gemm, grouped_gemm_grad_a,
// grouped_gemm_grad_b) and their CUTLASS-free kernels.
//
// No CUTLASS here. This translation unit
//   - picks the path: the sm_90a CUTLASS grouped kernels (grouped_gemm_sm90_*.cu) for bf16 with
//     TMA-compatible strides and for FP8; a tiled CUDA-core kernel for everything else (fp32,
//     k % 8 != 0, misaligned pointers) and for both backward GEMMs;
//   - regroups the FP8 scales into the layouts the CUTLASS mainloop reads, inside the caller's
//     workspace (the A scales per group, which needs `offs`: done on the device);
//   - zeroes the output rows past the last group's end (also on the device).
//
// Group bounds everywhere (here and in the CUTLASS argument builder): group g owns rows
// [start_g, end_g) with start_g = clamp(offs[g - 1], 0, m), end_g = clamp(offs[g], start_g, m),
// so that invalid offsets cannot make any kernel read or write out of bounds.

#include "cuda/moe_launch.h"

#include "cuda/common.cuh"
#include "cuda/grouped_gemm_sm90.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace r1x::cuda {
namespace {

constexpr size_t kSectionAlign = 256;
constexpr int kFp8Block = 128;



// The CUTLASS path's problem description (FP8 scales, when any, set by the caller).
sm90::GroupedGemmSm90Problem make_problem(const void* a, const void* b, const int32_t* offs,
                                          void* out, int64_t m, int64_t n, int64_t k,
                                          int64_t groups, int64_t ldo) {
  sm90::GroupedGemmSm90Problem p;
  p.a = a;
  p.b = b;
  p.out = out;
  p.offs = offs;
  p.ldo = ldo;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.groups = static_cast<int>(groups);
  return p;
}

struct GroupBounds {
  int64_t start;
  int64_t end;
};

__device__ __forceinline__ GroupBounds group_bounds(const int32_t* offs, int g, int64_t m) {
  int64_t start = g == 0 ? 0 : static_cast<int64_t>(offs[g - 1]);
  start = start < 0 ? 0 : (start > m ? m : start);
  int64_t end = offs[g];
  end = end < start ? start : (end > m ? m : end);
  return {start, end};
}

// The group whose rows contain `row`, or -1 (row past the last group, or inconsistent offs).
__device__ __forceinline__ int group_of_row(const int32_t* offs, int groups, int64_t m,
                                            int64_t row) {
  int lo = 0, hi = groups;  // first g with end_g > row
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (group_bounds(offs, mid, m).end > row) hi = mid; else lo = mid + 1;
  }
  if (lo >= groups) return -1;
  const GroupBounds b = group_bounds(offs, lo, m);
  return (b.start <= row && row < b.end) ? lo : -1;
}

// ---- rows past the last group: zero ---------------------------------------------------------

template <typename T>
__global__ void zero_tail_rows_kernel(const int32_t* __restrict__ offs, int groups, int64_t m,
                                      int64_t cols, int64_t ld, T* __restrict__ out) {
  const int64_t tail = group_bounds(offs, groups - 1, m).end;
  const T zero = from_float<T>(0.0f);
  for (int64_t r = tail + blockIdx.x; r < m; r += gridDim.x) {
    T* row = out + r * ld;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) row[c] = zero;
  }
}

template <typename T>
cudaError_t zero_tail_rows(const int32_t* offs, int groups, int64_t m, int64_t cols, int64_t ld,
                           void* out, cudaStream_t stream) {
  // (Usually few rows: most CTAs find nothing to do.)
  zero_tail_rows_kernel<T><<<grid_for(m, 16), 256, 0, stream>>>(offs, groups, m, cols, ld,
                                                                 static_cast<T*>(out));
  return cudaGetLastError();
}

// ---- empty groups of grad_b: zero ----------------------------------------------------------

template <typename T>
__global__ void zero_empty_groups_kernel(const int32_t* __restrict__ offs, int groups, int64_t m,
                                         int64_t per_group, T* __restrict__ out) {
  const T zero = from_float<T>(0.0f);
  for (int g = blockIdx.y; g < groups; g += gridDim.y) {
    const GroupBounds b = group_bounds(offs, g, m);
    if (b.end > b.start) continue;
    T* o = out + static_cast<int64_t>(g) * per_group;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < per_group;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      o[i] = zero;
    }
  }
}

// ---- FP8 scale regrouping -------------------------------------------------------------------

constexpr int kTile = 32;
constexpr int kRowsPerPass = 8;

// a_scale [m, kb] row-major -> per group g an M-major block of kb x rows_g floats at
// sfa + start_g * kb (grouped_gemm_sm90.h). Rows outside every group are skipped.
__global__ void __launch_bounds__(kTile * kRowsPerPass)
regroup_a_scales_kernel(const float* __restrict__ a_scale, const int32_t* __restrict__ offs,
                        int groups, int64_t m, int64_t kb, float* __restrict__ sfa) {
  __shared__ float tile[kTile][kTile + 1];
  __shared__ int64_t row_start[kTile];
  __shared__ int64_t row_count[kTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  if (ty == 0) {
    const int64_t r = r0 + tx;
    const int g = r < m ? group_of_row(offs, groups, m, r) : -1;
    if (g >= 0) {
      const GroupBounds b = group_bounds(offs, g, m);
      row_start[tx] = b.start;
      row_count[tx] = b.end - b.start;
    } else {
      row_count[tx] = 0;
    }
  }
  __syncthreads();
  const int64_t col_tiles = (kb + kTile - 1) / kTile;
  for (int64_t ct = blockIdx.y; ct < col_tiles; ct += gridDim.y) {
    const int64_t c0 = ct * kTile;
#pragma unroll
    for (int j = ty; j < kTile; j += kRowsPerPass) {
      const int64_t r = r0 + j, c = c0 + tx;
      tile[j][tx] = (r < m && c < kb) ? a_scale[r * kb + c] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int j = ty; j < kTile; j += kRowsPerPass) {
      const int64_t c = c0 + j;
      const int64_t cnt = row_count[tx];
      if (c < kb && cnt > 0) {
        const int64_t start = row_start[tx];
        const int64_t r = r0 + tx;
        sfa[start * kb + c * cnt + (r - start)] = tile[tx][j];
      }
    }
    __syncthreads();
  }
}

// b_scale [groups, nb, kb] -> sfb [groups, kb, nb] (a batched transpose).
__global__ void __launch_bounds__(kTile * kRowsPerPass)
transpose_b_scales_kernel(const float* __restrict__ b_scale, int64_t groups, int64_t nb,
                          int64_t kb, float* __restrict__ sfb) {
  __shared__ float tile[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;  // along nb
  const int64_t col_tiles = (kb + kTile - 1) / kTile;
  for (int64_t g = blockIdx.z; g < groups; g += gridDim.z) {
    const float* in = b_scale + g * nb * kb;
    float* out = sfb + g * nb * kb;
    for (int64_t ct = blockIdx.y; ct < col_tiles; ct += gridDim.y) {
      const int64_t c0 = ct * kTile;
#pragma unroll
      for (int j = ty; j < kTile; j += kRowsPerPass) {
        const int64_t r = r0 + j, c = c0 + tx;
        tile[j][tx] = (r < nb && c < kb) ? in[r * kb + c] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int j = ty; j < kTile; j += kRowsPerPass) {
        const int64_t c = c0 + j, r = r0 + tx;
        if (c < kb && r < nb) out[c * nb + r] = tile[tx][j];
      }
      __syncthreads();
    }
  }
}

inline unsigned clamp_grid(int64_t v, int64_t cap) {
  return static_cast<unsigned>(v < 1 ? 1 : (v > cap ? cap : v));
}

// ---- CUDA-core grouped GEMM -----------------------------------------------------------------
//
// C[i, j] = sum_kk A(i, kk) * B(kk, j) over one group, 64x64 output tiles, 16-deep k-slices
// staged through shared memory as fp32, 4x4 outputs per thread, fp32 accumulation. Operands are
// addressed through strides, so the same kernel serves the three products:
//   forward: A = a rows (k contiguous), B(kk, j) = b[g][j, kk] (k contiguous)
//   grad_a:  A = grad rows (n contiguous), B(n, j) = b[g][n, j] (j contiguous)
//   grad_b:  A(n, r) = grad[r, n] (n contiguous), B(r, j) = a[r, j] (j contiguous)

constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBK = 16;
constexpr int kGemmThreads = 256;

template <typename T>
struct Operand {
  const T* ptr;
  int64_t s_outer;  // stride along the output dimension (i for A, j for B)
  int64_t s_k;      // stride along the reduction dimension
};

// kAKContig: A's reduction dimension is contiguous (else its row dimension is);
// kBKContig: B's reduction dimension is contiguous (else its column dimension is).
template <typename T, bool kAKContig, bool kBKContig>
__device__ __forceinline__ void gemm_tile(Operand<T> A, Operand<T> B, int64_t rows, int64_t cols,
                                          int64_t depth, int64_t i0, int64_t j0, T* C,
                                          int64_t ldc) {
  __shared__ __align__(16) float As[kBK][kBM + 4];
  __shared__ __align__(16) float Bs[kBK][kBN + 4];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  float acc[4][4] = {};

  for (int64_t k0 = 0; k0 < depth; k0 += kBK) {
    // 64 x 16 elements of each operand, 4 per thread, coalesced along the contiguous dimension.
#pragma unroll
    for (int p = 0; p < (kBM * kBK) / kGemmThreads; ++p) {
      const int idx = tid + p * kGemmThreads;
      const int kk = kAKContig ? idx % kBK : idx / kBM;
      const int i = kAKContig ? idx / kBK : idx % kBM;
      const int64_t gi = i0 + i, gk = k0 + kk;
      As[kk][i] = (gi < rows && gk < depth) ? to_float(A.ptr[gi * A.s_outer + gk * A.s_k]) : 0.0f;
    }
#pragma unroll
    for (int p = 0; p < (kBN * kBK) / kGemmThreads; ++p) {
      const int idx = tid + p * kGemmThreads;
      const int kk = kBKContig ? idx % kBK : idx / kBN;
      const int j = kBKContig ? idx / kBK : idx % kBN;
      const int64_t gj = j0 + j, gk = k0 + kk;
      Bs[kk][j] = (gj < cols && gk < depth) ? to_float(B.ptr[gj * B.s_outer + gk * B.s_k]) : 0.0f;
    }
    __syncthreads();
    // Two-level summation: each 16-deep slice into a fresh partial sum, then into the total
    // (the rounding error then grows with 16 + depth / 16 terms instead of depth).
    float part[4][4] = {};
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      const float4 a4 = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 b4 = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
      const float av[4] = {a4.x, a4.y, a4.z, a4.w};
      const float bv[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int v = 0; v < 4; ++v) part[u][v] = fmaf(av[u], bv[v], part[u][v]);
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[u][v] += part[u][v];
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t gi = i0 + ty * 4 + u;
    if (gi >= rows) continue;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t gj = j0 + tx * 4 + v;
      if (gj < cols) C[gi * ldc + gj] = from_float<T>(acc[u][v]);
    }
  }
}

// tile_prefix[g] = sum over groups < g of ceil(rows_g / kBM); tile_prefix[groups] = the total.
__global__ void __launch_bounds__(1024)
tile_prefix_kernel(const int32_t* __restrict__ offs, int groups, int64_t m,
                   int64_t* __restrict__ tile_prefix) {
  __shared__ int64_t warp_sums[32];
  __shared__ int64_t carry;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < groups; base += blockDim.x) {
    const int g = base + static_cast<int>(threadIdx.x);
    int64_t tiles = 0;
    if (g < groups) {
      const GroupBounds b = group_bounds(offs, g, m);
      tiles = (b.end - b.start + kBM - 1) / kBM;
    }
    // inclusive scan: within the warp, then across warps
    int64_t v = tiles;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t w = __shfl_up_sync(0xffffffffu, v, o);
      if (lane >= o) v += w;
    }
    if (lane == 31) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
      const int nwarps = blockDim.x / 32;
      int64_t s = lane < nwarps ? warp_sums[lane] : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int64_t w = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += w;
      }
      if (lane < nwarps) warp_sums[lane] = s;
    }
    __syncthreads();
    const int64_t inclusive = carry + v + (warp > 0 ? warp_sums[warp - 1] : 0);
    if (g < groups) tile_prefix[g + 1] = inclusive;
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry = inclusive;
    __syncthreads();
  }
  if (threadIdx.x == 0) tile_prefix[0] = 0;
}

// Forward (kGradA = false): out[rows of g] = a[rows of g] @ b[g].T, b [groups, n, k].
// grad_a (kGradA = true):    out[rows of g] = grad[rows of g] @ b[g], b [groups, n, k].
// blockIdx.x enumerates the groups' row tiles (tile_prefix), blockIdx.y the column tiles.
template <typename T, bool kGradA>
__global__ void __launch_bounds__(kGemmThreads)
grouped_rows_gemm_kernel(const T* __restrict__ x, const T* __restrict__ b,
                         const int32_t* __restrict__ offs, const int64_t* __restrict__ tile_prefix,
                         int groups, int64_t m, int64_t n, int64_t k, T* __restrict__ out,
                         int64_t ldo) {
  const int64_t t = blockIdx.x;
  if (t >= tile_prefix[groups]) return;
  int lo = 0, hi = groups - 1;  // the last g with tile_prefix[g] <= t
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tile_prefix[mid] <= t) lo = mid; else hi = mid - 1;
  }
  const int g = lo;
  const GroupBounds gb = group_bounds(offs, g, m);
  const int64_t i0 = (t - tile_prefix[g]) * kBM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int64_t rows = gb.end - gb.start;
  const T* bg = b + static_cast<int64_t>(g) * n * k;
  if constexpr (!kGradA) {
    // x = a [m, k]; C [rows, n]; reduce over k
    if (j0 >= n) return;
    const Operand<T> A{x + gb.start * k, k, 1};
    const Operand<T> B{bg, k, 1};
    gemm_tile<T, true, true>(A, B, rows, n, k, i0, j0, out + gb.start * ldo, ldo);
  } else {
    // x = grad [m, n]; C [rows, k]; reduce over n
    if (j0 >= k) return;
    const Operand<T> A{x + gb.start * n, n, 1};
    const Operand<T> B{bg, 1, k};
    gemm_tile<T, true, false>(A, B, rows, k, n, i0, j0, out + gb.start * ldo, ldo);
  }
}

// grad_b: out[g] [n, k] = grad[rows of g].T @ a[rows of g]; blockIdx = (k tile, n tile, group).
template <typename T>
__global__ void __launch_bounds__(kGemmThreads)
grouped_grad_b_kernel(const T* __restrict__ grad, const T* __restrict__ a,
                      const int32_t* __restrict__ offs, int groups, int64_t m, int64_t n,
                      int64_t k, T* __restrict__ out) {
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kBM;
  for (int g = blockIdx.z; g < groups; g += gridDim.z) {
    const GroupBounds gb = group_bounds(offs, g, m);
    const Operand<T> A{grad + gb.start * n, 1, n};
    const Operand<T> B{a + gb.start * k, 1, k};
    gemm_tile<T, false, false>(A, B, n, k, gb.end - gb.start, i0, j0,
                               out + static_cast<int64_t>(g) * n * k, k);
  }
}

size_t tile_prefix_bytes(int64_t groups) {
  return align_up(static_cast<size_t>(groups + 1) * sizeof(int64_t), kSectionAlign);
}

template <typename T, bool kGradA>
cudaError_t launch_rows_gemm(const void* x, const void* b, const int32_t* offs, void* out,
                             int64_t m, int64_t n, int64_t k, int64_t groups, int64_t ldo,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (workspace == nullptr || workspace_bytes < tile_prefix_bytes(groups) ||
      !aligned_to(workspace, 8)) {
    return cudaErrorInvalidValue;
  }
  const int64_t cols = kGradA ? k : n;
  const int64_t row_tiles = (m + kBM - 1) / kBM + groups;  // each group adds at most one partial
  const int64_t col_tiles = (cols + kBN - 1) / kBN;
  if (row_tiles > INT_MAX || col_tiles > 65535) return cudaErrorInvalidValue;
  auto* prefix = static_cast<int64_t*>(workspace);
  tile_prefix_kernel<<<1, 1024, 0, stream>>>(offs, static_cast<int>(groups), m, prefix);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  grouped_rows_gemm_kernel<T, kGradA><<<grid, kGemmThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(b), offs, prefix, static_cast<int>(groups),
      m, n, k, static_cast<T*>(out), ldo);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return zero_tail_rows<T>(offs, static_cast<int>(groups), m, cols, ldo, out, stream);
}

bool sizes_ok(int64_t m, int64_t n, int64_t k, int64_t groups) {
  return m > 0 && n > 0 && k > 0 && groups > 0 && m <= INT_MAX && n <= INT_MAX && k <= INT_MAX &&
         groups <= INT_MAX;
}

// ---- FP8 workspace ---------------------------------------------------------------------------

struct Fp8Plan {
  int64_t kb = 0, nb = 0;
  size_t sfb_offset = 0;
  size_t cutlass_offset = 0;
  size_t cutlass_bytes = 0;
  size_t total = 0;
};

Fp8Plan plan_fp8(int64_t m, int64_t n, int64_t k, int64_t groups, DType out_dtype) {
  Fp8Plan p;
  p.kb = k / kFp8Block;
  p.nb = (n + kFp8Block - 1) / kFp8Block;
  p.sfb_offset = align_up(static_cast<size_t>(m * p.kb) * sizeof(float), kSectionAlign);
  const size_t sfb_bytes = static_cast<size_t>(groups * p.kb * p.nb) * sizeof(float);
  p.cutlass_offset = p.sfb_offset + align_up(sfb_bytes, kSectionAlign);
  const int g = static_cast<int>(groups);
  p.cutlass_bytes = out_dtype == DType::kBFloat16
                        ? sm90::fp8_grouped_gemm_sm90_bf16_workspace_bytes(g)
                        : sm90::fp8_grouped_gemm_sm90_f32_workspace_bytes(g);
  p.total = p.cutlass_offset + align_up(p.cutlass_bytes, kSectionAlign);
  return p;
}

bool fp8_shape_ok(int64_t m, int64_t n, int64_t k, int64_t groups, DType out_dtype) {
  if (!sizes_ok(m, n, k, groups) || k % kFp8Block != 0) return false;
  if (out_dtype != DType::kBFloat16 && out_dtype != DType::kFloat32) return false;
  // 32-bit CUTLASS scale-layout strides
  return m * (k / kFp8Block) <= INT_MAX && groups * (k / kFp8Block) * ((n + 127) / 128) <= INT_MAX;
}

}  // namespace

// ---- grouped_gemm -----------------------------------------------------------------------------

size_t grouped_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, int64_t groups,
                                    DType dtype) {
  if (!sizes_ok(m, n, k, groups)) return 0;
  size_t bytes = tile_prefix_bytes(groups);
  if (dtype == DType::kBFloat16 && k % 8 == 0) {
    const size_t tma = sm90::grouped_gemm_sm90_bf16_workspace_bytes(static_cast<int>(groups));
    bytes = tma > bytes ? tma : bytes;
  }
  return bytes;
}

cudaError_t grouped_gemm(const void* a, const void* b, const int32_t* offs, void* out,
                         DType dtype, int64_t m, int64_t n, int64_t k, int64_t groups,
                         int64_t ldo, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  if (!sizes_ok(m, n, k, groups) || ldo < n) return cudaErrorInvalidValue;
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat32) return cudaErrorInvalidValue;
  if (a == nullptr || b == nullptr || offs == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (dtype == DType::kFloat32) {
    return launch_rows_gemm<float, false>(a, b, offs, out, m, n, k, groups, ldo, workspace,
                                          workspace_bytes, stream);
  }
  const bool tma = k % 8 == 0 && ldo % 8 == 0 && aligned_to(a, 16) && aligned_to(b, 16) &&
                   aligned_to(out, 16) && aligned_to(workspace, kSectionAlign);
  if (tma) {
    cudaError_t err = zero_tail_rows<__nv_bfloat16>(offs, static_cast<int>(groups), m, n, ldo,
                                                    out, stream);
    if (err != cudaSuccess) return err;
    sm90::GroupedGemmSm90Problem p;
    p.a = a;
    p.b = b;
    p.out = out;
    p.offs = offs;
    p.ldo = ldo;
    p.m = static_cast<int>(m);
    p.n = static_cast<int>(n);
    p.k = static_cast<int>(k);
    p.groups = static_cast<int>(groups);
    err = sm90::grouped_gemm_sm90_bf16(p, workspace, workspace_bytes, stream);
    // Anything CUTLASS declines (cudaErrorInvalidValue) still runs, on the CUDA cores.
    if (err != cudaErrorInvalidValue) return err;
  }
  return launch_rows_gemm<__nv_bfloat16, false>(a, b, offs, out, m, n, k, groups, ldo, workspace,
                                                workspace_bytes, stream);
}

// ---- fp8_grouped_gemm -------------------------------------------------------------------------

size_t fp8_grouped_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, int64_t groups,
                                        DType out_dtype) {
  if (!fp8_shape_ok(m, n, k, groups, out_dtype)) return 0;
  return plan_fp8(m, n, k, groups, out_dtype).total;
}

cudaError_t fp8_grouped_gemm(const uint8_t* a, const float* a_scale, const uint8_t* b,
                             const float* b_scale, const int32_t* offs, void* out,
                             DType out_dtype, int64_t m, int64_t n, int64_t k, int64_t groups,
                             int64_t ldo, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  if (!fp8_shape_ok(m, n, k, groups, out_dtype)) return cudaErrorInvalidValue;
  const size_t elem = out_dtype == DType::kBFloat16 ? 2 : 4;
  if (ldo < n || (static_cast<size_t>(ldo) * elem) % 16 != 0) return cudaErrorInvalidValue;
  if (a == nullptr || b == nullptr || a_scale == nullptr || b_scale == nullptr ||
      offs == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (!aligned_to(a, 16) || !aligned_to(b, 16) || !aligned_to(out, 16) || !aligned_to(a_scale, 4) ||
      !aligned_to(b_scale, 4)) {
    return cudaErrorInvalidValue;
  }
  const Fp8Plan plan = plan_fp8(m, n, k, groups, out_dtype);
  if (workspace == nullptr || workspace_bytes < plan.total || !aligned_to(workspace, kSectionAlign)) {
    return cudaErrorInvalidValue;
  }
  auto* ws = static_cast<uint8_t*>(workspace);
  float* sfa = reinterpret_cast<float*>(ws);
  float* sfb = reinterpret_cast<float*>(ws + plan.sfb_offset);
  void* cutlass_ws = ws + plan.cutlass_offset;

  const dim3 block(kTile, kRowsPerPass);
  {
    const int64_t row_tiles = (m + kTile - 1) / kTile;
    const int64_t col_tiles = (plan.kb + kTile - 1) / kTile;
    const dim3 grid(static_cast<unsigned>(row_tiles), clamp_grid(col_tiles, 65535));
    regroup_a_scales_kernel<<<grid, block, 0, stream>>>(a_scale, offs, static_cast<int>(groups),
                                                        m, plan.kb, sfa);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  {
    const int64_t row_tiles = (plan.nb + kTile - 1) / kTile;
    const int64_t col_tiles = (plan.kb + kTile - 1) / kTile;
    const dim3 grid(static_cast<unsigned>(row_tiles), clamp_grid(col_tiles, 65535),
                    clamp_grid(groups, 65535));
    transpose_b_scales_kernel<<<grid, block, 0, stream>>>(b_scale, groups, plan.nb, plan.kb, sfb);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  cudaError_t err =
      out_dtype == DType::kBFloat16
          ? zero_tail_rows<__nv_bfloat16>(offs, static_cast<int>(groups), m, n, ldo, out, stream)
          : zero_tail_rows<float>(offs, static_cast<int>(groups), m, n, ldo, out, stream);
  if (err != cudaSuccess) return err;

  sm90::GroupedGemmSm90Problem p = make_problem(a, b, offs, out, m, n, k, groups, ldo);
  p.sfa = sfa;
  p.sfb = sfb;
  return out_dtype == DType::kBFloat16
             ? sm90::fp8_grouped_gemm_sm90_bf16(p, cutlass_ws, plan.cutlass_bytes, stream)
             : sm90::fp8_grouped_gemm_sm90_f32(p, cutlass_ws, plan.cutlass_bytes, stream);
}

// ---- backward ---------------------------------------------------------------------------------

namespace {

// The CUTLASS path of the backward products: bf16, n and k multiples of 8 (16-byte row pitches
// of every operand), 16-byte aligned pointers.
bool grad_tma(DType dtype, int64_t n, int64_t k, const void* x, const void* y, const void* out,
              const void* workspace) {
  return dtype == DType::kBFloat16 && n % 8 == 0 && k % 8 == 0 && aligned_to(x, 16) &&
         aligned_to(y, 16) && aligned_to(out, 16) && aligned_to(workspace, kSectionAlign);
}

}  // namespace

size_t grouped_gemm_grad_workspace_bytes(int64_t m, int64_t n, int64_t k, int64_t groups,
                                         DType dtype) {
  if (!sizes_ok(m, n, k, groups)) return 0;
  size_t bytes = tile_prefix_bytes(groups);
  if (dtype == DType::kBFloat16 && n % 8 == 0 && k % 8 == 0) {
    const int g = static_cast<int>(groups);
    const size_t a = sm90::grouped_gemm_sm90_bf16_grad_a_workspace_bytes(g);
    const size_t b = sm90::grouped_gemm_sm90_bf16_grad_b_workspace_bytes(g);
    bytes = a > bytes ? a : bytes;
    bytes = b > bytes ? b : bytes;
  }
  return bytes;
}

cudaError_t grouped_gemm_grad_a(const void* grad, const void* b, const int32_t* offs, void* out,
                                DType dtype, int64_t m, int64_t n, int64_t k, int64_t groups,
                                void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!sizes_ok(m, n, k, groups)) return cudaErrorInvalidValue;
  if (grad == nullptr || b == nullptr || offs == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (grad_tma(dtype, n, k, grad, b, out, workspace)) {
    cudaError_t err = zero_tail_rows<__nv_bfloat16>(offs, static_cast<int>(groups), m, k, k, out,
                                                    stream);
    if (err != cudaSuccess) return err;
    err = sm90::grouped_gemm_sm90_bf16_grad_a(make_problem(grad, b, offs, out, m, n, k, groups, k),
                                              workspace, workspace_bytes, stream);
    // Anything CUTLASS declines (cudaErrorInvalidValue) still runs, on the CUDA cores.
    if (err != cudaErrorInvalidValue) return err;
  }
  switch (dtype) {
    case DType::kFloat32:
      return launch_rows_gemm<float, true>(grad, b, offs, out, m, n, k, groups, k, workspace,
                                           workspace_bytes, stream);
    case DType::kBFloat16:
      return launch_rows_gemm<__nv_bfloat16, true>(grad, b, offs, out, m, n, k, groups, k,
                                                   workspace, workspace_bytes, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t grouped_gemm_grad_b(const void* grad, const void* a, const int32_t* offs, void* out,
                                DType dtype, int64_t m, int64_t n, int64_t k, int64_t groups,
                                void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!sizes_ok(m, n, k, groups)) return cudaErrorInvalidValue;
  if (grad == nullptr || a == nullptr || offs == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (grad_tma(dtype, n, k, grad, a, out, workspace)) {
    // CUTLASS skips empty groups (no tiles): their outputs are zeroed here.
    const int64_t per_group = n * k;
    const dim3 zgrid(clamp_grid((per_group + 2047) / 2048, 1024), clamp_grid(groups, 65535));
    zero_empty_groups_kernel<__nv_bfloat16><<<zgrid, 256, 0, stream>>>(
        offs, static_cast<int>(groups), m, per_group, static_cast<__nv_bfloat16*>(out));
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    err = sm90::grouped_gemm_sm90_bf16_grad_b(make_problem(grad, a, offs, out, m, n, k, groups, k),
                                              workspace, workspace_bytes, stream);
    if (err != cudaErrorInvalidValue) return err;
  }
  const int64_t col_tiles = (k + kBN - 1) / kBN, row_tiles = (n + kBM - 1) / kBM;
  if (col_tiles > INT_MAX || row_tiles > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles),
                  clamp_grid(groups, 65535));
  switch (dtype) {
    case DType::kFloat32:
      grouped_grad_b_kernel<float><<<grid, kGemmThreads, 0, stream>>>(
          static_cast<const float*>(grad), static_cast<const float*>(a), offs,
          static_cast<int>(groups), m, n, k, static_cast<float*>(out));
      break;
    case DType::kBFloat16:
      grouped_grad_b_kernel<__nv_bfloat16><<<grid, kGemmThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(grad), static_cast<const __nv_bfloat16*>(a), offs,
          static_cast<int>(groups), m, n, k, static_cast<__nv_bfloat16*>(out));
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace r1x::cuda
