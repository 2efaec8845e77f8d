// Host-run check (nvcc-compiled, runs on the CPU; tests/test_cuda_host.py builds and runs it) that
// the wgmma operands of the sm_90a MLA kernels are what the kernels assume:
//   1. CuTe's layouts of the shared-memory tiles (mla_smem.h) put every element exactly where the
//      loaders write it (sw128_offset), for every tile shape the kernels use;
//   2. the descriptors CuTe builds from them, for every operand slice the kernels pass to wgmma
//      (tile, rows or columns per operand, block, k step), describe 128-byte-swizzled canonical
//      layouts with the strides of those tiles (K-major: 8-row groups 1024 bytes apart; MN-major:
//      64-column blocks rows * 128 bytes apart, 8-row groups 1024 apart) and start at the
//      slice's first element.
// On the host CuTe cannot convert a shared-memory pointer (it prints "ERROR:
// cast_smem_ptr_to_uint not supported but used." and takes address 0), so the start address is
// checked as the slice's offset from the tile instead; on the device the same code adds the
// tile's shared-memory address. Exit status 0 and "gmma_desc_check: ok" when everything holds.
#include <cstdio>
#include <cstdint>

#include "cuda/mla_smem.h"

using namespace r1x::cuda::mla;

namespace {

alignas(1024) unsigned char tile_buf[1 << 18];
int failures = 0;
int checked = 0;

void fail(const char* what, const char* tile, int a, int b, long long got, long long want) {
  if (failures++ < 20) {
    std::printf("MISMATCH %s [%s] (%d, %d): got %lld, want %lld\n", what, tile, a, b, got, want);
  }
}

uint32_t offset_of(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - tile_buf);
}

// Every element of a K-major ROWS x COLS tile, and of its MN-major view, sits where the
// loaders put it.
template <int ROWS, int COLS>
void check_layouts(const char* name) {
  const auto k = smem::tile_tensor(tile_buf, smem::KMajorTile<ROWS, COLS>{});
  const auto mn = smem::tile_tensor(tile_buf, smem::MNMajorTile<ROWS, COLS>{});
  for (int r = 0; r < ROWS; ++r) {
    for (int c = 0; c < COLS; ++c) {
      const uint32_t want = sw128_offset(ROWS, r, c / 8) + (c % 8) * 2;
      const uint32_t got_k = offset_of(&k(r, c));
      const uint32_t got_mn = offset_of(&mn(c, r));
      if (got_k != want) fail("K-major layout", name, r, c, got_k, want);
      if (got_mn != want) fail("MN-major layout", name, r, c, got_mn, want);
      ++checked;
    }
  }
}

cute::GmmaDescriptor as_desc(uint64_t bits) {
  cute::GmmaDescriptor d;
  d.desc_ = bits;
  return d;
}

// The K-major operand slices rows [M blk, M blk + M) x k step kk of a ROWS x COLS tile.
template <int ROWS, int COLS, int M>
void check_k_major(const char* name) {
  const auto t = smem::tile_tensor(tile_buf, smem::KMajorTile<ROWS, COLS>{});
  for (int blk = 0; blk < ROWS / M; ++blk) {
    for (int kk = 0; kk < COLS / 16; ++kk) {
      const cute::GmmaDescriptor d = as_desc(smem::k_major_desc<ROWS, COLS, M>(tile_buf, blk, kk));
      const auto slice = cute::local_tile(t, cute::Shape<cute::Int<M>, cute::_16>{}, cute::make_coord(blk, kk));
      const uint32_t start = offset_of(cute::raw_pointer_cast(slice.data()));
      // its first element (row M blk, a multiple of 8: no swizzle), k chunk 2 kk
      if (start != sw128_offset(ROWS, M * blk, 2 * kk)) fail("K start", name, blk, kk, start, sw128_offset(ROWS, M * blk, 2 * kk));
      if (d.bitfield.layout_type_ != uint8_t(cute::GMMA::LayoutType::B128)) fail("K swizzle", name, blk, kk, d.bitfield.layout_type_, 1);
      if (d.bitfield.stride_byte_offset_ != 1024 / 16) fail("K SBO", name, blk, kk, d.bitfield.stride_byte_offset_, 64);
      if (d.bitfield.leading_byte_offset_ != 1) fail("K LBO", name, blk, kk, d.bitfield.leading_byte_offset_, 1);
      if (d.bitfield.base_offset_ != 0) fail("K base offset", name, blk, kk, d.bitfield.base_offset_, 0);
      ++checked;
    }
  }
}

// The MN-major operand slices columns [N blk, N blk + N) x k step kk (rows 16 kk ..) of a
// ROWS x COLS tile.
template <int ROWS, int COLS, int N>
void check_mn_major(const char* name) {
  const auto t = smem::tile_tensor(tile_buf, smem::MNMajorTile<ROWS, COLS>{});
  for (int blk = 0; blk < COLS / N; ++blk) {
    for (int kk = 0; kk < ROWS / 16; ++kk) {
      const cute::GmmaDescriptor d = as_desc(smem::mn_major_desc<ROWS, COLS, N>(tile_buf, blk, kk));
      const auto slice = cute::local_tile(t, cute::Shape<cute::Int<N>, cute::_16>{}, cute::make_coord(blk, kk));
      const uint32_t start = offset_of(cute::raw_pointer_cast(slice.data()));
      const uint32_t want_start = sw128_offset(ROWS, 16 * kk, N * blk / 8);
      if (start != want_start) fail("MN start", name, blk, kk, start, want_start);
      if (d.bitfield.layout_type_ != uint8_t(cute::GMMA::LayoutType::B128)) fail("MN swizzle", name, blk, kk, d.bitfield.layout_type_, 1);
      if (d.bitfield.stride_byte_offset_ != 1024 / 16) fail("MN SBO", name, blk, kk, d.bitfield.stride_byte_offset_, 64);
      // LBO: the distance between 64-column blocks; with a single block (N = 64) it is unused
      // and CuTe writes 0
      const int want_lbo = N > 64 ? ROWS * 128 / 16 : 0;
      if (d.bitfield.leading_byte_offset_ != want_lbo) fail("MN LBO", name, blk, kk, d.bitfield.leading_byte_offset_, want_lbo);
      if (d.bitfield.base_offset_ != 0) fail("MN base offset", name, blk, kk, d.bitfield.base_offset_, 0);
      ++checked;
    }
  }
}

}  // namespace

int main() {
  // Tiles: attention (mla_attention_sm90.cu) Q 128 x Dqk, K 128 x Dqk (Dqk in 64, 128, 192), V
  // 128 x Dv (Dv in 64, 128); decode (mla_decode.cu) Q and K 64 x 576, P 64 x 64, V the first
  // 512 columns of the K tile.
  check_layouts<128, 64>("128x64");
  check_layouts<128, 128>("128x128");
  check_layouts<128, 192>("128x192");
  check_layouts<64, 576>("64x576");
  check_layouts<64, 512>("64x512");
  check_layouts<64, 64>("64x64");
  // attention S = Q K^T: A = 64 rows of Q per warpgroup, B = all 128 keys
  check_k_major<128, 64, 64>("attn Q, Dqk 64");
  check_k_major<128, 128, 64>("attn Q, Dqk 128");
  check_k_major<128, 192, 64>("attn Q, Dqk 192");
  check_k_major<128, 64, 128>("attn K, Dqk 64");
  check_k_major<128, 128, 128>("attn K, Dqk 128");
  check_k_major<128, 192, 128>("attn K, Dqk 192");
  // attention O += P V: B = V, n = Dv columns
  check_mn_major<128, 64, 64>("attn V, Dv 64");
  check_mn_major<128, 128, 128>("attn V, Dv 128");
  // decode S = Q K^T: A = the 64 query rows, B = 32 tokens per warpgroup; O += P V: A = P,
  // B = 256 V columns per warpgroup
  check_k_major<64, 576, 64>("decode Q");
  check_k_major<64, 576, 32>("decode K");
  check_k_major<64, 64, 64>("decode P");
  check_mn_major<64, 512, 256>("decode V");
  if (failures) {
    std::printf("gmma_desc_check: %d mismatches in %d checks\n", failures, checked);
    return 1;
  }
  std::printf("gmma_desc_check: ok (%d checks)\n", checked);
  return 0;
}
