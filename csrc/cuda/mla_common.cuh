// Device helpers shared by the MLA kernels (mla_attention.cu, mla_attention_sm90.cu,
// mla_decode.cu): warp-level tensor-core primitives (ldmatrix, mma.sync m16n8k16, cp.async, which
// sm_90a runs as sm_80 instructions), sm_90a warpgroup MMA (wgmma: CuTe's GMMA atoms, operands
// described by CuTe-built descriptors of the swizzled tiles in mla_smem.h), shared-memory tile
// loaders, and the varlen tile -> sequence mapping.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit inputs; lane = 4 * g + c):
//   A 16x16 (row-major): a0 = (g, 2c..2c+1), a1 = (g+8, 2c..), a2 = (g, 8+2c..), a3 = (g+8, 8+2c..)
//   B 16x8 (k x n):      b0 = (k 2c..2c+1, n g), b1 = (k 8+2c.., n g)
//   C 16x8 fp32:         c0, c1 = (g, 2c..2c+1), c2, c3 = (g+8, 2c..2c+1)
// so a C tile pair (n columns 16kk..16kk+15) re-packed in 16 bits is exactly the A fragment of
// k-step kk: probabilities go from one product to the next without touching shared memory.
// Shared tiles are row-major with a row pitch of (multiple of 16) + 8 elements: an odd number
// of 16-byte units, so ldmatrix's 8 row addresses hit 8 distinct bank groups.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "cute/arch/mma_sm90_gmma.hpp"
#include "cuda/common.cuh"
#include "cuda/mla_smem.h"

namespace r1x::cuda::mla {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;

__host__ __device__ __forceinline__ int round16(int x) { return (x + 15) / 16 * 16; }
// Shared-memory row pitch (elements) of a tile whose rows hold `cols` 16-bit values.
__host__ __device__ __forceinline__ int tile_pitch(int cols) { return round16(cols) + 8; }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// volatile: these read shared memory written by other threads, they must stay between the
// barriers they were written between.
__device__ __forceinline__ void ldsm_x4(const void* p, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(const void* p, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one 32-bit register of two 16-bit values, `lo` in the low half (the lower k).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The A fragment of k-step kk from C tiles 2kk and 2kk+1 (see the layouts above).
template <typename T>
__device__ __forceinline__ void c_pair_to_a(const float (&c0)[4], const float (&c1)[4],
                                            uint32_t (&a)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---- sm_90a warpgroup MMA (wgmma), through CuTe's GMMA atoms ------------------------------
// nvcc -arch=sm_90a also emits compute_90 PTX, which has no wgmma: there CuTe's atoms compile to
// an invalid-path trap (never run: an sm_90a device loads the sm_90a binary).
//
// Accumulators of m64nNk16 (per warp w of the warpgroup, lane = 4 g + c): d[4 j + e] = (row
// 16 w + g + 8 (e >> 1), column 8 j + 2 c + (e & 1)): the mma.sync C layout, and a register A
// operand has the mma.sync A layout of the warp's 16 rows. Shared operands are described by
// descriptors built from the tiles' CuTe layouts (mla_smem.h).
namespace gmma = cute::SM90::GMMA;

__device__ __forceinline__ void wgmma_fence() { cute::warpgroup_arrive(); }
__device__ __forceinline__ void wgmma_commit() { cute::warpgroup_commit_batch(); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  cute::warpgroup_wait<N>();
}
// Generic-proxy writes to shared memory (cp.async, st.shared) made visible to wgmma's reads.
// (CUTLASS's fence_view_async_shared emits the same instruction without the memory clobber.)
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  __trap();
#endif
}
// Keeps the compiler from moving reads or writes of wgmma accumulators across wgmma_wait.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(r[i]);
}

// The atoms r1x uses, m64nNk16 with fp32 accumulators: SS takes A and B from shared memory
// (A K-major; B K-major, or MN-major for P V in the decode), RS takes A from registers (B
// MN-major).
template <typename T, int N, gmma::Major kMajorB>
struct SsAtom;
template <>
struct SsAtom<__nv_bfloat16, 32, gmma::Major::K> {
  using type = gmma::MMA_64x32x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>;
};
template <>
struct SsAtom<__half, 32, gmma::Major::K> {
  using type = gmma::MMA_64x32x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>;
};
template <>
struct SsAtom<__nv_bfloat16, 128, gmma::Major::K> {
  using type = gmma::MMA_64x128x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>;
};
template <>
struct SsAtom<__half, 128, gmma::Major::K> {
  using type = gmma::MMA_64x128x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>;
};
template <>
struct SsAtom<__nv_bfloat16, 256, gmma::Major::MN> {
  using type = gmma::MMA_64x256x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::MN>;
};
template <>
struct SsAtom<__half, 256, gmma::Major::MN> {
  using type = gmma::MMA_64x256x16_F32F16F16_SS<gmma::Major::K, gmma::Major::MN>;
};
template <typename T, int N>
struct RsAtom;
template <>
struct RsAtom<__nv_bfloat16, 64> {
  using type = gmma::MMA_64x64x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>;
};
template <>
struct RsAtom<__half, 64> {
  using type = gmma::MMA_64x64x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>;
};
template <>
struct RsAtom<__nv_bfloat16, 128> {
  using type = gmma::MMA_64x128x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>;
};
template <>
struct RsAtom<__half, 128> {
  using type = gmma::MMA_64x128x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>;
};

template <class Atom, int R, size_t... I>
__device__ __forceinline__ void atom_ss(float (&d)[R], uint64_t da, uint64_t db, gmma::ScaleOut s,
                                        std::index_sequence<I...>) {
  Atom::fma(da, db, d[I]..., s);
}
template <class Atom, int R, size_t... I>
__device__ __forceinline__ void atom_rs(float (&d)[R], const uint32_t (&a)[4], uint64_t db,
                                        gmma::ScaleOut s, std::index_sequence<I...>) {
  Atom::fma(a[0], a[1], a[2], a[3], db, d[I]..., s);
}

// d (+)= A B^T, m64nNk16; scale_d == 0 overwrites d. ss: A and B K-major in shared memory;
// sst: the same with B MN-major (B's n contiguous); rs: A in registers, B MN-major.
template <typename T, int N, gmma::Major kMajorB = gmma::Major::K>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  using Atom = typename SsAtom<T, N, kMajorB>::type;
  static_assert(sizeof(typename Atom::CRegisters) == sizeof(d), "accumulator count");
  atom_ss<Atom>(d, da, db, scale_d ? gmma::ScaleOut::One : gmma::ScaleOut::Zero,
                std::make_index_sequence<N / 2>{});
}
template <typename T, int N>
__device__ __forceinline__ void wgmma_sst(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  wgmma_ss<T, N, gmma::Major::MN>(d, da, db, scale_d);
}
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db,
                                         int scale_d) {
  using Atom = typename RsAtom<T, N>::type;
  static_assert(sizeof(typename Atom::CRegisters) == sizeof(d), "accumulator count");
  atom_rs<Atom>(d, a, db, scale_d ? gmma::ScaleOut::One : gmma::ScaleOut::Zero,
                std::make_index_sequence<N / 2>{});
}

// ---- 128-byte-swizzled tiles (the wgmma kernels' operands; layouts in mla_smem.h) ----------
// Rows [0, rows) x columns [0, kCols) of a tile: row r < nvalid from row_ptr(r) (cols % 8 == 0),
// everything else zero. The caller commits the cp.async group.
template <typename T, int kCols, int kThreads, typename RowPtr>
__device__ __forceinline__ void load_sw128(unsigned char* base, int rows, int nvalid, int cols,
                                           RowPtr row_ptr) {
  constexpr int kChunks = kCols / 8;
  for (int i = threadIdx.x; i < rows * kChunks; i += kThreads) {
    const int r = i / kChunks, kc = i - r * kChunks;
    unsigned char* dst = base + sw128_offset(rows, r, kc);
    if (r < nvalid && kc * 8 < cols) {
      cp_async16(dst, row_ptr(r) + kc * 8);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Loads rows [0, rows) x columns [0, round16(cols)) of a tile into shared memory (row pitch
// `pitch` elements): row r < nvalid comes from row_ptr(r) (a pointer to its first element),
// columns >= cols and rows >= nvalid are zero. With `vec` (cols % 8 == 0 and every row 16-byte
// aligned) it issues 16-byte cp.async copies (the caller commits and waits), else plain loads.
// Zeros matter: padded rows and columns take part in the products and must not be NaN.
template <typename T, int kThreads, typename RowPtr>
__device__ __forceinline__ void load_tile(T* smem, int pitch, int rows, int nvalid, int cols,
                                          bool vec, RowPtr row_ptr) {
  const int cpad = round16(cols);
  if (vec) {
    const int chunks = cpad / 8;
    for (int i = threadIdx.x; i < rows * chunks; i += kThreads) {
      const int r = i / chunks, c = (i - r * chunks) * 8;
      T* dst = smem + r * pitch + c;
      if (r < nvalid && c < cols) {
        cp_async16(dst, row_ptr(r) + c);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  } else {
    const T zero = from_float<T>(0.0f);
    for (int i = threadIdx.x; i < rows * cpad; i += kThreads) {
      const int r = i / cpad, c = i - r * cpad;
      smem[r * pitch + c] = (r < nvalid && c < cols) ? row_ptr(r)[c] : zero;
    }
  }
}

// ---- varlen tiles -------------------------------------------------------------------------
// Sequence b, clamped: [start, start + len) inside [0, t).
struct SeqRange {
  int64_t start;
  int64_t len;
};

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

__device__ __forceinline__ SeqRange seq_range(const int32_t* cu, int b, int64_t t) {
  const int64_t s = clamp64(cu[b], 0, t);
  return {s, clamp64(cu[b + 1], s, t) - s};
}

// Tiles of `tile_rows` rows: sequence b's tiles are numbered from first_tile(b) = start_b /
// tile_rows + b on. That is nondecreasing in b and leaves room for ceil(len_b / tile_rows) tiles
// (start_{b+1} < (start_{b+1} / tile_rows + 1) * tile_rows), so floor(t / tile_rows) + batch
// tile indices cover every sequence; an index that lands past its sequence's end has no work.
// Finds the tile `idx` without a host-side max_seqlen. Returns false when there is nothing to do.
__device__ __forceinline__ bool find_tile(const int32_t* cu, int batch, int64_t t, int tile_rows,
                                          int64_t idx, SeqRange& seq, int64_t& row0) {
  auto first_tile = [&](int b) { return clamp64(cu[b], 0, t) / tile_rows + b; };
  if (first_tile(0) > idx) return false;
  int lo = 0, hi = batch - 1;  // the last b with first_tile(b) <= idx
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_tile(mid) <= idx) lo = mid; else hi = mid - 1;
  }
  seq = seq_range(cu, lo, t);
  row0 = (idx - first_tile(lo)) * tile_rows;
  return row0 < seq.len;
}

inline int64_t num_tiles(int64_t t, int64_t batch, int tile_rows) {
  return t / tile_rows + batch;
}

// ---- attention forward: parameters shared by mla_attention.cu and mla_attention_sm90.cu ----
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  const int32_t* cu;
  int batch;
  int64_t t;
  int h, dqk, dv;
  bool causal;
  float scale_log2;  // softmax scale * log2(e): the kernels work in base 2
};

// The wgmma forward (mla_attention_sm90.cu): bf16/fp16, dqk and dv multiples of 8, dqk <= 192,
// dv <= 128.
bool attention_forward_sm90_takes(int dqk, int dv);
template <typename T>
cudaError_t attention_forward_sm90(const FwdParams& p, cudaStream_t stream);

}  // namespace r1x::cuda::mla
