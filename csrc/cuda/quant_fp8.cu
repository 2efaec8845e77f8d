// FP8 (e4m3) quantization / dequantization kernels (torch-free; see launch.h).
//
// Numerics are meant to be bit-identical to the PyTorch reference:
//   amax  = max |x| over the group, in fp32, NaN-propagating (torch.amax semantics)
//   scale = max(amax, 1e-4) / 448          (IEEE division; a NaN amax stays NaN, like clamp)
//   scale = 2^ceil(log2(scale))            (ue8m0 only; exact, by bit manipulation)
//   q     = e4m3(clamp(x / scale, -448, 448))  (IEEE division, RNE, NaN stays NaN)
// Every division is __fdiv_rn so that no build flag (e.g. -prec-div=false) can turn it into a
// reciprocal multiply.

#include "cuda/launch.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace r1x::cuda {
namespace {

constexpr float kFp8Max = 448.0f;
constexpr float kMinAmax = 1e-4f;
constexpr int kThreads = 256;

// ---- scalar helpers -----------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// max that propagates NaN from either side (torch.amax / torch.maximum semantics); fmaxf
// would silently drop a NaN and quantize the rest of the group with a finite scale.
__device__ __forceinline__ float max_nan(float a, float b) {
  return (a > b || a != a) ? a : b;
}

__device__ __forceinline__ float scale_from_amax(float amax, bool ue8m0) {
  // `amax < kMinAmax` is false for NaN, so a NaN amax passes through like torch.clamp(min=).
  const float clamped = amax < kMinAmax ? kMinAmax : amax;
  float s = __fdiv_rn(clamped, kFp8Max);
  if (ue8m0) {
    const uint32_t bits = __float_as_uint(s);
    // Only finite values: bumping the exponent of Inf/NaN would carry into the sign bit.
    // s >= 1e-4 / 448 is always a normal number, so the mantissa test is an exact
    // "is not a power of two".
    if ((bits & 0x7f800000u) != 0x7f800000u && (bits & 0x007fffffu) != 0u) {
      s = __uint_as_float((bits + 0x00800000u) & 0xff800000u);
    }
  }
  return s;
}

__device__ __forceinline__ float quant_value(float x, float scale) {
  float v = __fdiv_rn(x, scale);
  // Comparisons (not fminf/fmaxf) so that NaN is kept, as torch.clamp does.
  v = v < -kFp8Max ? -kFp8Max : v;
  v = v > kFp8Max ? kFp8Max : v;
  return v;
}

// ---- vectors ------------------------------------------------------------------------------

// V consecutive elements; 16 bytes for the vectorised path, one element for the scalar one.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V>
struct alignas(V) Bytes {
  uint8_t b[V];
};

template <typename T, int V>
__device__ __forceinline__ float vec_amax(const Vec<T, V>& x) {
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < V; ++i) m = max_nan(m, fabsf(to_float(x.v[i])));
  return m;
}

template <typename T, int V>
__device__ __forceinline__ void vec_quant_store(const Vec<T, V>& x, float scale, uint8_t* dst) {
  Bytes<V> out;
  if constexpr (V % 2 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 2) {
      const float2 f = make_float2(quant_value(to_float(x.v[i]), scale),
                                   quant_value(to_float(x.v[i + 1]), scale));
      // Low byte holds f.x: the lower address after a little-endian store.
      const __nv_fp8x2_storage_t p = __nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3);
      out.b[i] = static_cast<uint8_t>(p & 0xffu);
      out.b[i + 1] = static_cast<uint8_t>(p >> 8);
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      out.b[i] = __nv_cvt_float_to_fp8(quant_value(to_float(x.v[i]), scale), __NV_SATFINITE,
                                       __NV_E4M3);
    }
  }
  *reinterpret_cast<Bytes<V>*>(dst) = out;
}

// ---- per-token-group ----------------------------------------------------------------------
//
// Since k % group_size == 0, group g is the contiguous range [g * G, (g + 1) * G) of the
// flattened x, and its scale is scale[g]. A "team" of `team` lanes (a power of two <= 32)
// handles one group, so a warp handles 32 / team groups at once; with G = 128 and bf16 that is
// one 16-byte vector per lane and two groups per warp. Each lane keeps up to kCache vectors in
// registers so that common group sizes are read from memory once; longer groups are re-read
// in the second pass (an L1/L2 hit).

template <typename T, int V, int kCache>
__global__ void __launch_bounds__(kThreads)
quant_group_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scale,
                   int64_t num_groups, int64_t group_size, int team, bool ue8m0) {
  const int lane = threadIdx.x & 31;
  const int team_lane = lane & (team - 1);
  const int team_in_warp = lane / team;
  const int groups_per_warp = 32 / team;
  const int64_t vecs = group_size / V;

  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * kThreads) >> 5;

  // Every lane of a warp runs the same number of iterations, so the team shuffles below never
  // see an exited lane; lanes of a team past the end just contribute 0.
  for (int64_t g0 = warp * groups_per_warp; g0 < num_groups;
       g0 += num_warps * groups_per_warp) {
    const int64_t g = g0 + team_in_warp;
    const bool valid = g < num_groups;
    const Vec<T, V>* src = reinterpret_cast<const Vec<T, V>*>(x + g * group_size);

    Vec<T, V> cache[kCache];
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < kCache; ++j) {
      const int64_t i = team_lane + static_cast<int64_t>(j) * team;
      if (valid && i < vecs) {
        cache[j] = src[i];
        amax = max_nan(amax, vec_amax(cache[j]));
      }
    }
    if (valid) {
      for (int64_t i = team_lane + static_cast<int64_t>(kCache) * team; i < vecs; i += team) {
        amax = max_nan(amax, vec_amax(src[i]));
      }
    }
    for (int o = team >> 1; o > 0; o >>= 1) {
      amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    }
    if (!valid) continue;

    const float s = scale_from_amax(amax, ue8m0);
    if (team_lane == 0) scale[g] = s;
    uint8_t* dst = q + g * group_size;
#pragma unroll
    for (int j = 0; j < kCache; ++j) {
      const int64_t i = team_lane + static_cast<int64_t>(j) * team;
      if (i < vecs) vec_quant_store(cache[j], s, dst + i * V);
    }
    for (int64_t i = team_lane + static_cast<int64_t>(kCache) * team; i < vecs; i += team) {
      vec_quant_store(src[i], s, dst + i * V);
    }
  }
}

// ---- per-block ----------------------------------------------------------------------------
//
// One CTA per (block_size x block_size) block of w (partial at the right/bottom edges). The
// block's V-element vectors are numbered row-major, vector index -> (row, vector-in-row), and
// thread t takes vectors t, t + 256, ...; the first kCache of them stay in registers between
// the amax pass and the quantization pass (a full 128x128 bf16 block is 8 per thread).

template <typename T, int V, int kCache>
__global__ void __launch_bounds__(kThreads)
quant_block_kernel(const T* __restrict__ w, uint8_t* __restrict__ q, float* __restrict__ scale,
                   int64_t n, int64_t k, int64_t block_size, int64_t blocks_n, int64_t blocks_k,
                   bool ue8m0) {
  __shared__ float warp_amax[kThreads / 32];
  const int64_t num_blocks = blocks_n * blocks_k;

  for (int64_t blk = blockIdx.x; blk < num_blocks; blk += gridDim.x) {
    const int64_t bn = blk / blocks_k;
    const int64_t bk = blk - bn * blocks_k;
    const int64_t row0 = bn * block_size;
    const int64_t col0 = bk * block_size;
    const uint32_t rows = static_cast<uint32_t>(min(block_size, n - row0));
    const uint32_t cols = static_cast<uint32_t>(min(block_size, k - col0));
    // cols % V == 0 on the vector path (the launcher checks k % V == 0, block_size % V == 0).
    const uint32_t vecs_per_row = cols / V;
    const uint32_t total = rows * vecs_per_row;
    const T* base = w + row0 * k + col0;

    Vec<T, V> cache[kCache];
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < kCache; ++j) {
      const uint32_t i = threadIdx.x + j * kThreads;
      if (i < total) {
        const uint32_t r = i / vecs_per_row;
        const uint32_t c = i - r * vecs_per_row;
        cache[j] = *reinterpret_cast<const Vec<T, V>*>(base + r * k + c * V);
        amax = max_nan(amax, vec_amax(cache[j]));
      }
    }
    for (uint32_t i = threadIdx.x + kCache * kThreads; i < total; i += kThreads) {
      const uint32_t r = i / vecs_per_row;
      const uint32_t c = i - r * vecs_per_row;
      amax = max_nan(amax, vec_amax(*reinterpret_cast<const Vec<T, V>*>(base + r * k + c * V)));
    }

    for (int o = 16; o > 0; o >>= 1) {
      amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    }
    if ((threadIdx.x & 31) == 0) warp_amax[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = warp_amax[0];
#pragma unroll
    for (int i = 1; i < kThreads / 32; ++i) amax = max_nan(amax, warp_amax[i]);
    // The next block's writes to warp_amax must wait until everyone has read it.
    __syncthreads();

    const float s = scale_from_amax(amax, ue8m0);
    if (threadIdx.x == 0) scale[blk] = s;
    uint8_t* dst = q + row0 * k + col0;
#pragma unroll
    for (int j = 0; j < kCache; ++j) {
      const uint32_t i = threadIdx.x + j * kThreads;
      if (i < total) {
        const uint32_t r = i / vecs_per_row;
        const uint32_t c = i - r * vecs_per_row;
        vec_quant_store(cache[j], s, dst + r * k + c * V);
      }
    }
    for (uint32_t i = threadIdx.x + kCache * kThreads; i < total; i += kThreads) {
      const uint32_t r = i / vecs_per_row;
      const uint32_t c = i - r * vecs_per_row;
      vec_quant_store(*reinterpret_cast<const Vec<T, V>*>(base + r * k + c * V), s,
                      dst + r * k + c * V);
    }
  }
}

// ---- dequant ------------------------------------------------------------------------------
//
// Flattened [batch * rows, cols]; each thread converts V consecutive elements of one row
// (V = 16 when cols % 16 == 0 and the pointers are 16-byte aligned, else 1). The column block
// is tracked incrementally inside a vector so that only one division per vector is needed.

template <int V>
__global__ void __launch_bounds__(kThreads)
dequant_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scale, int64_t rows,
               int64_t cols, int64_t block_r, int64_t block_c, int64_t scale_rows,
               int64_t scale_cols, int64_t total_vecs, float* __restrict__ out) {
  const int64_t vecs_per_row = cols / V;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < total_vecs;
       v += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t flat_row = v / vecs_per_row;
    const int64_t c0 = (v - flat_row * vecs_per_row) * V;
    const int64_t b = flat_row / rows;
    const int64_t r = flat_row - b * rows;
    const float* srow = scale + (b * scale_rows + r / block_r) * scale_cols;
    int64_t cb = c0 / block_c;
    int64_t in_blk = c0 - cb * block_c;

    const int64_t off = flat_row * cols + c0;
    Bytes<V> in = *reinterpret_cast<const Bytes<V>*>(q + off);
    float res[V];
    float s = srow[cb];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (in_blk == block_c) {
        in_blk = 0;
        s = srow[++cb];
      }
      ++in_blk;
      const __half_raw h = __nv_cvt_fp8_to_halfraw(in.b[i], __NV_E4M3);
      res[i] = __half2float(__half(h)) * s;
    }
    if constexpr (V % 4 == 0) {
#pragma unroll
      for (int i = 0; i < V; i += 4) {
        *reinterpret_cast<float4*>(out + off + i) =
            make_float4(res[i], res[i + 1], res[i + 2], res[i + 3]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) out[off + i] = res[i];
    }
  }
}

// ---- launch helpers -----------------------------------------------------------------------

inline bool aligned_to(const void* p, uintptr_t a) {
  return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0;
}
inline bool aligned16(const void* p) { return aligned_to(p, 16); }

// Enough CTAs to fill the GPU several times over; the kernels grid-stride beyond that.
inline unsigned grid_for(int64_t work_items, int64_t items_per_cta) {
  int64_t g = (work_items + items_per_cta - 1) / items_per_cta;
  constexpr int64_t kMaxGrid = int64_t{1} << 20;
  if (g > kMaxGrid) g = kMaxGrid;
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

inline int team_for(int64_t vecs_per_group) {
  int team = 1;
  while (team < 32 && team * 2 <= vecs_per_group) team *= 2;
  return team;
}

template <typename T>
cudaError_t launch_quant_group(const T* x, int64_t rows, int64_t k, int64_t group_size,
                               bool ue8m0, uint8_t* q, float* scale, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t num_groups = rows * (k / group_size);
  // Every group start is 16-byte aligned iff x is and G * sizeof(T) is a multiple of 16;
  // q then takes kVec-byte stores, so it must be kVec-byte aligned too.
  if (group_size % kVec == 0 && aligned16(x) && aligned_to(q, kVec)) {
    const int team = team_for(group_size / kVec);
    const int64_t groups_per_cta = (kThreads / 32) * (32 / team);
    quant_group_kernel<T, kVec, 4><<<grid_for(num_groups, groups_per_cta), kThreads, 0, stream>>>(
        x, q, scale, num_groups, group_size, team, ue8m0);
  } else {
    const int team = team_for(group_size);
    const int64_t groups_per_cta = (kThreads / 32) * (32 / team);
    quant_group_kernel<T, 1, 8><<<grid_for(num_groups, groups_per_cta), kThreads, 0, stream>>>(
        x, q, scale, num_groups, group_size, team, ue8m0);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_quant_block(const T* w, int64_t n, int64_t k, int64_t block_size, bool ue8m0,
                               uint8_t* q, float* scale, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t blocks_n = (n + block_size - 1) / block_size;
  const int64_t blocks_k = (k + block_size - 1) / block_size;
  const unsigned grid = grid_for(blocks_n * blocks_k, 1);
  if (k % kVec == 0 && block_size % kVec == 0 && aligned16(w) && aligned_to(q, kVec)) {
    quant_block_kernel<T, kVec, 8><<<grid, kThreads, 0, stream>>>(
        w, q, scale, n, k, block_size, blocks_n, blocks_k, ue8m0);
  } else {
    quant_block_kernel<T, 1, 16><<<grid, kThreads, 0, stream>>>(
        w, q, scale, n, k, block_size, blocks_n, blocks_k, ue8m0);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t quant_fp8_per_token_group(const void* x, DType x_dtype, int64_t rows, int64_t k,
                                      int64_t group_size, bool ue8m0, uint8_t* q, float* scale,
                                      cudaStream_t stream) {
  if (rows < 0 || k < 0 || group_size <= 0 || k % group_size != 0) return cudaErrorInvalidValue;
  if (rows == 0 || k == 0) return cudaSuccess;
  if (x == nullptr || q == nullptr || scale == nullptr) return cudaErrorInvalidValue;
  switch (x_dtype) {
    case DType::kFloat32:
      return launch_quant_group(static_cast<const float*>(x), rows, k, group_size, ue8m0, q,
                                scale, stream);
    case DType::kBFloat16:
      return launch_quant_group(static_cast<const __nv_bfloat16*>(x), rows, k, group_size, ue8m0,
                                q, scale, stream);
    case DType::kFloat16:
      return launch_quant_group(static_cast<const __half*>(x), rows, k, group_size, ue8m0, q,
                                scale, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t quant_fp8_per_block(const void* w, DType w_dtype, int64_t n, int64_t k,
                                int64_t block_size, bool ue8m0, uint8_t* q, float* scale,
                                cudaStream_t stream) {
  // Within a block the kernel indexes vectors with 32-bit integers.
  if (n < 0 || k < 0 || block_size <= 0 || block_size > 32768) return cudaErrorInvalidValue;
  if (n == 0 || k == 0) return cudaSuccess;
  if (w == nullptr || q == nullptr || scale == nullptr) return cudaErrorInvalidValue;
  switch (w_dtype) {
    case DType::kFloat32:
      return launch_quant_block(static_cast<const float*>(w), n, k, block_size, ue8m0, q, scale,
                                stream);
    case DType::kBFloat16:
      return launch_quant_block(static_cast<const __nv_bfloat16*>(w), n, k, block_size, ue8m0, q,
                                scale, stream);
    case DType::kFloat16:
      return launch_quant_block(static_cast<const __half*>(w), n, k, block_size, ue8m0, q, scale,
                                stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t dequant_fp8(const uint8_t* q, const float* scale, int64_t batch, int64_t rows,
                        int64_t cols, int64_t block_r, int64_t block_c, float* out,
                        cudaStream_t stream) {
  if (batch < 0 || rows < 0 || cols < 0 || block_r <= 0 || block_c <= 0) {
    return cudaErrorInvalidValue;
  }
  if (batch == 0 || rows == 0 || cols == 0) return cudaSuccess;
  if (q == nullptr || scale == nullptr || out == nullptr) return cudaErrorInvalidValue;
  const int64_t scale_rows = (rows + block_r - 1) / block_r;
  const int64_t scale_cols = (cols + block_c - 1) / block_c;
  const int64_t total = batch * rows * cols;
  if (cols % 16 == 0 && aligned16(q) && aligned16(out)) {
    dequant_kernel<16><<<grid_for(total / 16, kThreads), kThreads, 0, stream>>>(
        q, scale, rows, cols, block_r, block_c, scale_rows, scale_cols, total / 16, out);
  } else {
    dequant_kernel<1><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
        q, scale, rows, cols, block_r, block_c, scale_rows, scale_cols, total, out);
  }
  return cudaGetLastError();
}

}  // namespace r1x::cuda
