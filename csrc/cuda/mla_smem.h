// Shared-memory tiles of the sm_90a MLA kernels (mla_attention_sm90.cu, mla_decode.cu) and the
// wgmma descriptors that describe them, built by CuTe from the tiles' layouts. Host and device
// code: csrc/cuda/tests/gmma_desc_check.cu checks on the CPU that CuTe's layouts are exactly what
// the loaders write (sw128_offset) and that its descriptors are those the kernels need.
//
// Every tile holds 16-bit values (bf16 or fp16: only the size matters here) in CuTe's canonical
// 128-byte-swizzle atoms: 8 rows x 64 columns, 1024 bytes, 1024-byte aligned, the 16-byte chunk c
// of atom row r stored at chunk c ^ r; atoms go down the rows first, then across 64-column
// blocks, so each 64-column block of a tile is one K-major operand with 8-row groups 1024 bytes
// apart. The same bytes read with n along the columns (V as the B operand of P V) are an
// MN-major operand whose 64-column blocks are rows * 128 bytes apart.
#pragma once

#include <cstdint>

#include "cute/atom/mma_traits_sm90_gmma.hpp"
#include "cute/tensor.hpp"

namespace r1x::cuda::mla {

// Byte offset of 16-byte chunk kc (columns 8 kc .. 8 kc + 7) of row r in a tile of `rows` rows:
// what the loaders write (load_sw128) and the softmax stores P at.
CUTE_HOST_DEVICE constexpr uint32_t sw128_offset(int rows, int r, int kc) {
  return static_cast<uint32_t>((kc >> 3) * rows * 128 + (r >> 3) * 1024 + (r & 7) * 128 +
                               (((kc & 7) ^ (r & 7)) << 4));
}

namespace smem {

using E16 = cute::half_t;  // the layouts only depend on the element size
namespace gmma = cute::SM90::GMMA;

// A ROWS x COLS tile, (row, column) -> element, K-major (the columns are k).
template <int ROWS, int COLS>
using KMajorTile = decltype(cute::tile_to_shape(gmma::Layout_K_SW128_Atom<E16>{},
                                                cute::Shape<cute::Int<ROWS>, cute::Int<COLS>>{}));
// The same bytes as an MN-major operand: (column, row) -> element, n = column, k = row.
template <int ROWS, int COLS>
using MNMajorTile = decltype(cute::tile_to_shape(gmma::Layout_MN_SW128_Atom<E16>{},
                                                 cute::Shape<cute::Int<COLS>, cute::Int<ROWS>>{},
                                                 cute::Step<cute::_2, cute::_1>{}));

template <class Layout>
CUTE_HOST_DEVICE auto tile_tensor(const void* base, Layout layout) {
  return cute::make_tensor(cute::make_smem_ptr(static_cast<const E16*>(base)), layout);
}

// Descriptor of one wgmma operand of a K-major ROWS x COLS tile at `base`: rows
// [M * blk, M * blk + M), k step kk (columns 16 kk .. 16 kk + 15).
template <int ROWS, int COLS, int M>
CUTE_HOST_DEVICE uint64_t k_major_desc(const void* base, int blk, int kk) {
  static_assert(ROWS % M == 0 && M % 8 == 0 && COLS % 64 == 0, "whole swizzle atoms");
  const auto t = tile_tensor(base, KMajorTile<ROWS, COLS>{});
  return gmma::make_gmma_desc<gmma::Major::K>(
      cute::local_tile(t, cute::Shape<cute::Int<M>, cute::_16>{}, cute::make_coord(blk, kk)));
}

// Descriptor of one MN-major wgmma operand (B of P V) of the ROWS x COLS tile at `base`: n =
// columns [N * blk, N * blk + N), k step kk (rows 16 kk .. 16 kk + 15).
template <int ROWS, int COLS, int N>
CUTE_HOST_DEVICE uint64_t mn_major_desc(const void* base, int blk, int kk) {
  static_assert(COLS % N == 0 && N % 64 == 0 && ROWS % 16 == 0, "whole swizzle atoms");
  const auto t = tile_tensor(base, MNMajorTile<ROWS, COLS>{});
  return gmma::make_gmma_desc<gmma::Major::MN>(
      cute::local_tile(t, cute::Shape<cute::Int<N>, cute::_16>{}, cute::make_coord(blk, kk)));
}

}  // namespace smem
}  // namespace r1x::cuda::mla
