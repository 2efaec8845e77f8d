// Mixture-of-Experts routing, dispatch and combine kernels (torch-free; see moe_launch.h).
//
// moe_topk_route: one warp per token. The warp keeps the token's E choice values (and, for the
//   group-limited variant, its n_group group ratings) in shared memory, rates and masks the
//   groups, then picks the top_k experts by repeated warp-wide arg-max over 64-bit keys
//   (order-preserving float bits << 32 | ~index): the largest value wins, ties go to the lower
//   index, exactly torch.sort(descending=True, stable=True)'s order. Everything is fp32.
// moe_dispatch: expert ids -> radix-sort keys (an out-of-range id becomes key E), a stable
//   (hence deterministic) CUB radix sort of (key, flat index) pairs gives perm, a binary search
//   per expert over the sorted keys gives offs, and a warp-per-row gather copies the rows.
// moe_combine: the inverse permutation (one scatter), then every thread owns a vector of
//   columns of one token and sums its top_k slots in slot order in fp32.

#include "cuda/moe_launch.h"

#include "cuda/common.cuh"

#include <cub/device/device_radix_sort.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace r1x::cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ============================================================================================
// Routing
// ============================================================================================

// Order-preserving map float -> uint32 (a larger float gives a larger key), with torch.sort's
// conventions: every NaN ranks above +inf, -0 equals +0. The smallest key it returns is that of
// -inf (0x007fffff), so 0 is free to mark "taken".
__device__ __forceinline__ uint32_t order_key(float v) {
  if (v != v) return 0xffffffffu;
  if (v == 0.0f) v = 0.0f;
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr uint32_t kTaken = 0u;

// (key, index) packed so that the maximum is the largest key, then the lowest index.
__device__ __forceinline__ uint64_t pack_key(uint32_t key, int idx) {
  const uint32_t inv_idx = 0xffffffffu - static_cast<uint32_t>(idx);
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint64_t>(inv_idx);
}
__device__ __forceinline__ int packed_index(uint64_t p) {
  return static_cast<int>(0xffffffffu - static_cast<uint32_t>(p & 0xffffffffu));
}

__device__ __forceinline__ uint64_t warp_max_u64(uint64_t v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const uint64_t w = __shfl_xor_sync(kFullMask, v, o);
    v = w > v ? w : v;
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// max that propagates NaN (torch.max semantics: a NaN logit makes the whole softmax NaN).
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_max_nan(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

struct RouteArgs {
  int64_t tokens;
  int experts;
  int top_k;
  int n_group;
  int topk_group;
  bool softmax;
  bool norm;
  float scale;
  int smem_words_per_warp;  // experts + n_group + top_k
};

// sigmoid(x) = 1 / (1 + exp(-x)) and softmax = exp(x - max) / sum, both as ATen writes them
// (IEEE division, accurate expf).
__device__ __forceinline__ float route_score(float x, bool softmax, float mx, float sum) {
  return softmax ? __fdiv_rn(expf(x - mx), sum) : __fdiv_rn(1.0f, 1.0f + expf(-x));
}

template <typename TL, typename TB>
__global__ void __launch_bounds__(256)
moe_route_kernel(const TL* __restrict__ logits, const TB* __restrict__ bias, RouteArgs p,
                 float* __restrict__ weights, int32_t* __restrict__ ids) {
  extern __shared__ uint32_t route_smem[];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  // Per warp: the experts' choice values (as floats, then as keys), the groups' ratings (as
  // keys), the chosen experts' raw scores.
  uint32_t* keys = route_smem + static_cast<size_t>(warp) * p.smem_words_per_warp;
  float* vals = reinterpret_cast<float*>(keys);
  uint32_t* gkeys = keys + p.experts;
  float* chosen = reinterpret_cast<float*>(gkeys + p.n_group);
  const int e_total = p.experts;
  const int gsize = p.experts / p.n_group;

  for (int64_t t = static_cast<int64_t>(blockIdx.x) * warps + warp; t < p.tokens;
       t += static_cast<int64_t>(gridDim.x) * warps) {
    const TL* row = logits + t * e_total;

    float mx = 0.0f, sum = 1.0f;
    if (p.softmax) {
      mx = -INFINITY;
      for (int e = lane; e < e_total; e += kWarp) mx = max_nan(mx, to_float(row[e]));
      mx = warp_max_nan(mx);
      float s = 0.0f;
      for (int e = lane; e < e_total; e += kWarp) s += expf(to_float(row[e]) - mx);
      sum = warp_sum(s);
    }
    for (int e = lane; e < e_total; e += kWarp) {
      const float sc = route_score(to_float(row[e]), p.softmax, mx, sum);
      vals[e] = bias != nullptr ? sc + to_float(bias[e]) : sc;
    }
    __syncwarp();

    if (p.n_group > 1) {
      // Each group's rating: the sum of its top min(2, group size) choices (torch.topk ranks a
      // NaN highest, so compare by key).
      for (int g = lane; g < p.n_group; g += kWarp) {
        const float* gv = vals + static_cast<size_t>(g) * gsize;
        float v1 = gv[0];
        uint32_t k1 = order_key(v1);
        float v2 = 0.0f;
        uint32_t k2 = 0u;
        for (int i = 1; i < gsize; ++i) {
          const float v = gv[i];
          const uint32_t kv = order_key(v);
          if (kv > k1) {
            v2 = v1; k2 = k1; v1 = v; k1 = kv;
          } else if (kv > k2) {
            v2 = v; k2 = kv;
          }
        }
        gkeys[g] = order_key(gsize >= 2 ? v1 + v2 : v1);
      }
      __syncwarp();
      // Keep the topk_group best ratings (ties: the lower group); a kept group is marked taken.
      for (int i = 0; i < p.topk_group; ++i) {
        uint64_t best = 0;
        for (int g = lane; g < p.n_group; g += kWarp) {
          const uint32_t kg = gkeys[g];
          if (kg != kTaken) {
            const uint64_t c = pack_key(kg, g);
            best = c > best ? c : best;
          }
        }
        best = warp_max_u64(best);
        if (lane == 0) gkeys[packed_index(best)] = kTaken;
        __syncwarp();
      }
      // Experts of the other groups become -inf (still rankable, as masked_fill leaves them).
      for (int e = lane; e < e_total; e += kWarp) {
        const bool kept = gkeys[e / gsize] == kTaken;
        keys[e] = kept ? order_key(vals[e]) : order_key(-INFINITY);
      }
    } else {
      for (int e = lane; e < e_total; e += kWarp) keys[e] = order_key(vals[e]);
    }
    __syncwarp();

    // Top-k, in descending order.
    int32_t* ids_row = ids + t * p.top_k;
    float* w_row = weights + t * p.top_k;
    float total = 0.0f;  // lane 0: the chosen scores summed in rank order
    for (int i = 0; i < p.top_k; ++i) {
      uint64_t best = 0;
      for (int e = lane; e < e_total; e += kWarp) {
        const uint64_t c = pack_key(keys[e], e);
        best = c > best ? c : best;
      }
      best = warp_max_u64(best);
      const int idx = packed_index(best);
      if (lane == 0) {
        keys[idx] = kTaken;
        const float sc = route_score(to_float(row[idx]), p.softmax, mx, sum);
        chosen[i] = sc;
        total += sc;
        ids_row[i] = idx;
      }
      __syncwarp();
    }
    total = __shfl_sync(kFullMask, total, 0);
    const float denom = total + 1e-20f;
    for (int i = lane; i < p.top_k; i += kWarp) {
      const float w = p.norm ? __fdiv_rn(chosen[i], denom) : chosen[i];
      w_row[i] = w * p.scale;
    }
    __syncwarp();  // the next token reuses this warp's shared memory
  }
}

constexpr int64_t kRouteMaxExperts = 16384;

template <typename TL, typename TB>
cudaError_t launch_route(const void* logits, const void* bias, const RouteArgs& a, float* weights,
                         int32_t* ids, cudaStream_t stream) {
  auto kernel = moe_route_kernel<TL, TB>;
  const size_t per_warp = static_cast<size_t>(a.smem_words_per_warp) * sizeof(uint32_t);
  constexpr size_t kDefaultSmem = 48 * 1024;
  int warps = 4;
  while (warps > 1 && per_warp * warps > kDefaultSmem) warps /= 2;
  const size_t smem = per_warp * warps;
  if (smem > kDefaultSmem) {
    int device = 0, optin = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    }
    if (err != cudaSuccess) return err;
    if (smem > static_cast<size_t>(optin)) return cudaErrorInvalidValue;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid_for(a.tokens, warps), warps * kWarp, smem, stream>>>(
      static_cast<const TL*>(logits), static_cast<const TB*>(bias), a, weights, ids);
  return cudaGetLastError();
}

template <typename TL>
cudaError_t route_bias_dispatch(const void* logits, const void* bias, DType bias_dtype,
                                const RouteArgs& a, float* weights, int32_t* ids,
                                cudaStream_t stream) {
  if (bias == nullptr) return launch_route<TL, float>(logits, nullptr, a, weights, ids, stream);
  switch (bias_dtype) {
    case DType::kFloat32: return launch_route<TL, float>(logits, bias, a, weights, ids, stream);
    case DType::kBFloat16:
      return launch_route<TL, __nv_bfloat16>(logits, bias, a, weights, ids, stream);
    case DType::kFloat16: return launch_route<TL, __half>(logits, bias, a, weights, ids, stream);
  }
  return cudaErrorInvalidValue;
}

// ============================================================================================
// Dispatch
// ============================================================================================

template <typename TI>
__global__ void dispatch_keys_kernel(const TI* __restrict__ ids, int64_t rows, int64_t experts,
                                     int32_t* __restrict__ keys, int32_t* __restrict__ index) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    keys[i] = static_cast<int32_t>((e >= 0 && e < experts) ? e : experts);
    index[i] = static_cast<int32_t>(i);
  }
}

// offs[e] = the number of sorted keys <= e (an upper bound by binary search).
__global__ void dispatch_offs_kernel(const int32_t* __restrict__ sorted_keys, int64_t rows,
                                     int64_t experts, int32_t* __restrict__ offs) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < experts;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = rows;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (sorted_keys[mid] <= e) lo = mid + 1; else hi = mid;
    }
    offs[e] = static_cast<int32_t>(lo);
  }
}

// x_sorted[r] = x[perm[r] / top_k]: one warp per row, V-byte vectors, four in flight per lane.
template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ x, const int32_t* __restrict__ perm,
                                   int64_t rows, int64_t top_k, int64_t tokens,
                                   int64_t vecs_per_row, V* __restrict__ out) {
  constexpr int kUnroll = 4;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
       r < rows; r += warps) {
    // 32-bit division (rows < 2^31); perm is ours, the clamp is belt and braces.
    const int32_t pr = perm[r];
    int64_t src =
        pr < 0 ? 0 : static_cast<int64_t>(static_cast<uint32_t>(pr) / static_cast<uint32_t>(top_k));
    src = src >= tokens ? tokens - 1 : src;
    const V* in = x + src * vecs_per_row;
    V* o = out + r * vecs_per_row;
    int64_t v = lane;
#pragma unroll 1
    for (; v + (kUnroll - 1) * kWarp < vecs_per_row; v += kUnroll * kWarp) {
      V buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) buf[u] = in[v + u * kWarp];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) o[v + u * kWarp] = buf[u];
    }
#pragma unroll 1
    for (; v < vecs_per_row; v += kWarp) o[v] = in[v];
  }
}

template <typename V>
cudaError_t launch_gather(const void* x, const int32_t* perm, int64_t rows, int64_t top_k,
                          int64_t tokens, int64_t row_bytes, void* out, cudaStream_t stream) {
  const int64_t vecs = row_bytes / static_cast<int64_t>(sizeof(V));
  constexpr int kThreads = 256;
  gather_rows_kernel<V><<<grid_for(rows, kThreads / kWarp), kThreads, 0, stream>>>(
      static_cast<const V*>(x), perm, rows, top_k, tokens, vecs, static_cast<V*>(out));
  return cudaGetLastError();
}

cudaError_t gather_rows(const void* x, const int32_t* perm, int64_t rows, int64_t top_k,
                        int64_t tokens, int64_t row_bytes, void* out, cudaStream_t stream) {
  auto fits = [&](uintptr_t w) {
    return row_bytes % static_cast<int64_t>(w) == 0 && aligned_to(x, w) && aligned_to(out, w);
  };
  if (fits(16)) return launch_gather<uint4>(x, perm, rows, top_k, tokens, row_bytes, out, stream);
  if (fits(8)) return launch_gather<uint2>(x, perm, rows, top_k, tokens, row_bytes, out, stream);
  if (fits(4)) return launch_gather<uint32_t>(x, perm, rows, top_k, tokens, row_bytes, out, stream);
  if (fits(2)) return launch_gather<uint16_t>(x, perm, rows, top_k, tokens, row_bytes, out, stream);
  return launch_gather<uint8_t>(x, perm, rows, top_k, tokens, row_bytes, out, stream);
}

// Radix-sort bits covering keys in [0, experts].
inline int key_bits(int64_t experts) {
  int bits = 1;
  while ((int64_t{1} << bits) <= experts) ++bits;
  return bits;
}

struct DispatchPlan {
  size_t keys_in = 0, keys_out = 0, index = 0, cub = 0;  // byte offsets
  size_t cub_bytes = 0;
  size_t total = 0;
  cudaError_t status = cudaSuccess;
};

constexpr size_t kAlign = 256;

DispatchPlan plan_dispatch(int64_t rows, int64_t experts) {
  DispatchPlan p;
  const size_t arr = align_up(static_cast<size_t>(rows) * sizeof(int32_t), kAlign);
  p.keys_in = 0;
  p.keys_out = arr;
  p.index = 2 * arr;
  p.cub = 3 * arr;
  p.status = cub::DeviceRadixSort::SortPairs(
      nullptr, p.cub_bytes, static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<int>(rows), 0, key_bits(experts));
  p.total = p.cub + align_up(p.cub_bytes, kAlign);
  return p;
}

// ============================================================================================
// Combine
// ============================================================================================

__global__ void inverse_perm_kernel(const int32_t* __restrict__ perm, int64_t rows,
                                    int32_t* __restrict__ inv) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t p = perm[r];
    if (p >= 0 && p < rows) inv[p] = static_cast<int32_t>(r);
  }
}

// inv[perm[r]] = r, and -1 where perm does not reach (a slot that then contributes nothing).
cudaError_t build_inverse_perm(const int32_t* perm, int64_t rows, int32_t* inv,
                               cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(inv, 0xff, static_cast<size_t>(rows) * sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  constexpr int kThreads = 256;
  inverse_perm_kernel<<<grid_for(rows, kThreads), kThreads, 0, stream>>>(perm, rows, inv);
  return cudaGetLastError();
}

template <typename T, int V>
struct alignas(sizeof(T) * V) VecT {
  T v[V];
};

// out[t, c .. c+V) = sum_j w[t, j] * y[inv[t, j], c .. c+V), j in slot order, fp32.
template <typename T, typename TW, int V>
__global__ void __launch_bounds__(256)
combine_kernel(const T* __restrict__ y, const TW* __restrict__ w, const int32_t* __restrict__ inv,
               int64_t tokens, int64_t top_k, int64_t cols, T* __restrict__ out) {
  const int64_t vecs_per_row = cols / V;
  const int64_t total = tokens * vecs_per_row;
  const int64_t rows = tokens * top_k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / vecs_per_row;
    const int64_t c = (i - t * vecs_per_row) * V;
    float acc[V];
#pragma unroll
    for (int u = 0; u < V; ++u) acc[u] = 0.0f;
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t slot = t * top_k + j;
      const int32_t r = inv[slot];
      if (r < 0 || r >= rows) continue;
      const float wt = to_float(w[slot]);
      const T* src = y + static_cast<int64_t>(r) * cols + c;
      const VecT<T, V> yv = *reinterpret_cast<const VecT<T, V>*>(src);
#pragma unroll
      for (int u = 0; u < V; ++u) acc[u] = fmaf(wt, to_float(yv.v[u]), acc[u]);
    }
    VecT<T, V> o;
#pragma unroll
    for (int u = 0; u < V; ++u) o.v[u] = from_float<T>(acc[u]);
    *reinterpret_cast<VecT<T, V>*>(out + t * cols + c) = o;
  }
}

template <typename T, typename TW>
cudaError_t launch_combine(const void* y, const void* w, const int32_t* inv, int64_t tokens,
                           int64_t top_k, int64_t cols, void* out, cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vec_ok = cols % kVec == 0 && aligned_to(y, 16) && aligned_to(out, 16);
  if (vec_ok) {
    const unsigned grid = grid_for(tokens * (cols / kVec), kThreads);
    combine_kernel<T, TW, kVec><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(y), static_cast<const TW*>(w), inv, tokens, top_k, cols,
        static_cast<T*>(out));
  } else {
    combine_kernel<T, TW, 1><<<grid_for(tokens * cols, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(y), static_cast<const TW*>(w), inv, tokens, top_k, cols,
        static_cast<T*>(out));
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t combine_weight_dispatch(const void* y, const void* w, DType w_dtype,
                                    const int32_t* inv, int64_t tokens, int64_t top_k,
                                    int64_t cols, void* out, cudaStream_t stream) {
  switch (w_dtype) {
    case DType::kFloat32:
      return launch_combine<T, float>(y, w, inv, tokens, top_k, cols, out, stream);
    case DType::kBFloat16:
      return launch_combine<T, __nv_bfloat16>(y, w, inv, tokens, top_k, cols, out, stream);
    case DType::kFloat16:
      return launch_combine<T, __half>(y, w, inv, tokens, top_k, cols, out, stream);
  }
  return cudaErrorInvalidValue;
}

// One warp per slot s = (t, j): grad_y[inv[s]] = w[s] * g[t], grad_w[s] = dot(g[t], y[inv[s]]).
template <typename T, typename TW>
__global__ void __launch_bounds__(256)
combine_backward_kernel(const T* __restrict__ g, const T* __restrict__ y, const TW* __restrict__ w,
                        const int32_t* __restrict__ inv, int64_t tokens, int64_t top_k,
                        int64_t cols, T* __restrict__ grad_y, float* __restrict__ grad_w) {
  const int64_t rows = tokens * top_k;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t s = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; s < rows;
       s += warps) {
    const int32_t r = inv[s];
    float acc = 0.0f;
    if (r >= 0 && r < rows) {
      const float wt = to_float(w[s]);
      const T* gt = g + (s / top_k) * cols;
      const T* yr = y + static_cast<int64_t>(r) * cols;
      T* gy = grad_y + static_cast<int64_t>(r) * cols;
      for (int64_t c = lane; c < cols; c += kWarp) {
        const float gv = to_float(gt[c]);
        gy[c] = from_float<T>(wt * gv);
        acc = fmaf(gv, to_float(yr[c]), acc);
      }
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_xor_sync(kFullMask, acc, off);
    if (lane == 0) grad_w[s] = acc;
  }
}

template <typename T>
cudaError_t launch_combine_backward(const void* g, const void* y, const void* w, DType w_dtype,
                                    const int32_t* inv, int64_t tokens, int64_t top_k,
                                    int64_t cols, void* grad_y, float* grad_w,
                                    cudaStream_t stream) {
  constexpr int kThreads = 256;
  const unsigned grid = grid_for(tokens * top_k, kThreads / kWarp);
  const T* gt = static_cast<const T*>(g);
  const T* yt = static_cast<const T*>(y);
  T* gy = static_cast<T*>(grad_y);
  switch (w_dtype) {
    case DType::kFloat32:
      combine_backward_kernel<T, float><<<grid, kThreads, 0, stream>>>(
          gt, yt, static_cast<const float*>(w), inv, tokens, top_k, cols, gy, grad_w);
      break;
    case DType::kBFloat16:
      combine_backward_kernel<T, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          gt, yt, static_cast<const __nv_bfloat16*>(w), inv, tokens, top_k, cols, gy, grad_w);
      break;
    case DType::kFloat16:
      combine_backward_kernel<T, __half><<<grid, kThreads, 0, stream>>>(
          gt, yt, static_cast<const __half*>(w), inv, tokens, top_k, cols, gy, grad_w);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

// ---- routing ------------------------------------------------------------------------------

int64_t moe_route_max_experts() { return kRouteMaxExperts; }

cudaError_t moe_topk_route(const void* logits, DType logits_dtype, const void* bias,
                           DType bias_dtype, int64_t tokens, int64_t experts,
                           const MoeRouteParams& params, float* weights, int32_t* ids,
                           cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  if (tokens < 0 || experts < 1 || experts > kRouteMaxExperts) return cudaErrorInvalidValue;
  if (params.n_group < 1 || experts % params.n_group != 0) return cudaErrorInvalidValue;
  if (params.topk_group < 1 || params.topk_group > params.n_group) return cudaErrorInvalidValue;
  const int64_t eligible =
      params.n_group > 1 ? params.topk_group * (experts / params.n_group) : experts;
  if (params.top_k < 1 || params.top_k > eligible) return cudaErrorInvalidValue;
  if (logits == nullptr || weights == nullptr || ids == nullptr) return cudaErrorInvalidValue;
  if (tokens > INT64_MAX / experts) return cudaErrorInvalidValue;

  RouteArgs a;
  a.tokens = tokens;
  a.experts = static_cast<int>(experts);
  a.top_k = static_cast<int>(params.top_k);
  a.n_group = static_cast<int>(params.n_group);
  a.topk_group = static_cast<int>(params.topk_group);
  a.softmax = params.softmax;
  a.norm = params.norm_topk_prob;
  a.scale = params.routed_scaling_factor;
  a.smem_words_per_warp = a.experts + a.n_group + a.top_k;
  switch (logits_dtype) {
    case DType::kFloat32:
      return route_bias_dispatch<float>(logits, bias, bias_dtype, a, weights, ids, stream);
    case DType::kBFloat16:
      return route_bias_dispatch<__nv_bfloat16>(logits, bias, bias_dtype, a, weights, ids, stream);
    case DType::kFloat16:
      return route_bias_dispatch<__half>(logits, bias, bias_dtype, a, weights, ids, stream);
  }
  return cudaErrorInvalidValue;
}

// ---- dispatch -----------------------------------------------------------------------------

size_t moe_dispatch_workspace_bytes(int64_t tokens, int64_t top_k, int64_t experts) {
  if (tokens <= 0 || top_k <= 0 || experts <= 0) return 0;
  if (tokens > INT_MAX / top_k || experts >= INT_MAX) return 0;
  const DispatchPlan p = plan_dispatch(tokens * top_k, experts);
  return p.status == cudaSuccess ? p.total : 0;
}

cudaError_t moe_dispatch(const void* x, int64_t row_bytes, const void* ids, bool ids_int64,
                         int64_t tokens, int64_t top_k, int64_t experts, void* x_sorted,
                         int32_t* offs, int32_t* perm, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  if (tokens < 0 || top_k < 0 || experts < 1 || row_bytes < 0) return cudaErrorInvalidValue;
  if (experts >= INT_MAX) return cudaErrorInvalidValue;
  if (offs == nullptr) return cudaErrorInvalidValue;
  const int64_t rows = tokens * top_k;
  if (rows == 0) {
    // Every expert is empty.
    return cudaMemsetAsync(offs, 0, static_cast<size_t>(experts) * sizeof(int32_t), stream);
  }
  if (tokens > INT_MAX / top_k) return cudaErrorInvalidValue;  // int32 perm / CUB item count
  if (ids == nullptr || perm == nullptr) return cudaErrorInvalidValue;
  if (row_bytes > 0 && (x == nullptr || x_sorted == nullptr)) return cudaErrorInvalidValue;
  const DispatchPlan plan = plan_dispatch(rows, experts);
  if (plan.status != cudaSuccess) return plan.status;
  if (workspace == nullptr || workspace_bytes < plan.total || !aligned_to(workspace, kAlign)) {
    return cudaErrorInvalidValue;
  }
  auto* ws = static_cast<uint8_t*>(workspace);
  auto* keys_in = reinterpret_cast<int32_t*>(ws + plan.keys_in);
  auto* keys_out = reinterpret_cast<int32_t*>(ws + plan.keys_out);
  auto* index = reinterpret_cast<int32_t*>(ws + plan.index);

  constexpr int kThreads = 256;
  if (ids_int64) {
    dispatch_keys_kernel<int64_t><<<grid_for(rows, kThreads), kThreads, 0, stream>>>(
        static_cast<const int64_t*>(ids), rows, experts, keys_in, index);
  } else {
    dispatch_keys_kernel<int32_t><<<grid_for(rows, kThreads), kThreads, 0, stream>>>(
        static_cast<const int32_t*>(ids), rows, experts, keys_in, index);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  size_t cub_bytes = plan.cub_bytes;
  err = cub::DeviceRadixSort::SortPairs(ws + plan.cub, cub_bytes, keys_in, keys_out, index, perm,
                                        static_cast<int>(rows), 0, key_bits(experts), stream);
  if (err != cudaSuccess) return err;
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  dispatch_offs_kernel<<<grid_for(experts, kThreads), kThreads, 0, stream>>>(keys_out, rows,
                                                                              experts, offs);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  if (row_bytes == 0) return cudaSuccess;
  return gather_rows(x, perm, rows, top_k, tokens, row_bytes, x_sorted, stream);
}

// ---- combine ------------------------------------------------------------------------------

size_t moe_combine_workspace_bytes(int64_t tokens, int64_t top_k) {
  if (tokens <= 0 || top_k <= 0) return 0;
  return align_up(static_cast<size_t>(tokens * top_k) * sizeof(int32_t), kAlign);
}

cudaError_t moe_combine(const void* y_sorted, DType y_dtype, const void* weights, DType w_dtype,
                        const int32_t* perm, int64_t tokens, int64_t top_k, int64_t cols,
                        void* out, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (tokens < 0 || top_k < 0 || cols < 0) return cudaErrorInvalidValue;
  if (tokens == 0 || cols == 0) return cudaSuccess;
  if (out == nullptr) return cudaErrorInvalidValue;
  const int64_t rows = tokens * top_k;
  if (top_k > 0 && tokens > INT_MAX / top_k) return cudaErrorInvalidValue;
  int32_t* inv = nullptr;
  if (rows > 0) {
    if (y_sorted == nullptr || weights == nullptr || perm == nullptr) return cudaErrorInvalidValue;
    if (workspace == nullptr || workspace_bytes < moe_combine_workspace_bytes(tokens, top_k) ||
        !aligned_to(workspace, 4)) {
      return cudaErrorInvalidValue;
    }
    inv = static_cast<int32_t*>(workspace);
    const cudaError_t err = build_inverse_perm(perm, rows, inv, stream);
    if (err != cudaSuccess) return err;
  }
  switch (y_dtype) {
    case DType::kFloat32:
      return combine_weight_dispatch<float>(y_sorted, weights, w_dtype, inv, tokens, top_k, cols,
                                            out, stream);
    case DType::kBFloat16:
      return combine_weight_dispatch<__nv_bfloat16>(y_sorted, weights, w_dtype, inv, tokens,
                                                    top_k, cols, out, stream);
    case DType::kFloat16:
      return combine_weight_dispatch<__half>(y_sorted, weights, w_dtype, inv, tokens, top_k,
                                             cols, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t moe_combine_backward(const void* grad_out, const void* y_sorted, DType y_dtype,
                                 const void* weights, DType w_dtype, const int32_t* perm,
                                 int64_t tokens, int64_t top_k, int64_t cols, void* grad_y,
                                 float* grad_w, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream) {
  if (tokens < 0 || top_k < 0 || cols < 0) return cudaErrorInvalidValue;
  const int64_t rows = tokens * top_k;
  if (rows == 0) return cudaSuccess;
  if (top_k > 0 && tokens > INT_MAX / top_k) return cudaErrorInvalidValue;
  if (grad_out == nullptr || y_sorted == nullptr || weights == nullptr || perm == nullptr ||
      grad_y == nullptr || grad_w == nullptr || workspace == nullptr ||
      workspace_bytes < moe_combine_workspace_bytes(tokens, top_k) || !aligned_to(workspace, 4)) {
    return cudaErrorInvalidValue;
  }
  int32_t* inv = static_cast<int32_t*>(workspace);
  const size_t esize = y_dtype == DType::kFloat32 ? 4 : 2;
  // rows of grad_y that perm does not reach (perm not a permutation) stay zero
  cudaError_t err = cudaMemsetAsync(grad_y, 0, static_cast<size_t>(rows * cols) * esize, stream);
  if (err != cudaSuccess) return err;
  err = build_inverse_perm(perm, rows, inv, stream);
  if (err != cudaSuccess) return err;
  switch (y_dtype) {
    case DType::kFloat32:
      return launch_combine_backward<float>(grad_out, y_sorted, weights, w_dtype, inv, tokens,
                                            top_k, cols, grad_y, grad_w, stream);
    case DType::kBFloat16:
      return launch_combine_backward<__nv_bfloat16>(grad_out, y_sorted, weights, w_dtype, inv,
                                                    tokens, top_k, cols, grad_y, grad_w, stream);
    case DType::kFloat16:
      return launch_combine_backward<__half>(grad_out, y_sorted, weights, w_dtype, inv, tokens,
                                             top_k, cols, grad_y, grad_w, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace r1x::cuda
