// MLA in bfloat16 on AMX (mla_bf16.h's algorithms with TDPBF16PS tile products, fp32
// accumulation in the tile registers), which leaves the decode bound by reading the cache;
// other dtypes take the AVX-512 kernels.
#include "cpu/amx_util.h"
#include "cpu/mla_bf16.h"

namespace r1x::cpu {
namespace {

struct AmxOps {
  static void begin() { configure_full_tiles(); }
  static void end() { _tile_release(); }
  static const MlaKernels& fallback() { return mla_kernels_avx512(); }

  // s[64][lds] = kb[64][dp] . Q^T for ncols (a multiple of 16) query columns.
  static void st(const uint16_t* kb, int64_t dp, const uint32_t* qv, int64_t ldq, int64_t ncols,
                float* s, int64_t lds) {
    for (int64_t cb = 0; cb < ncols; cb += 16) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < dp; k += 32) {
        _tile_loadd(4, qv + (k / 2) * ldq + cb, ldq * 4);
        _tile_loadd(5, kb + 0 * 16 * dp + k, dp * 2);
        _tile_dpbf16ps(0, 5, 4);
        _tile_loadd(6, kb + 1 * 16 * dp + k, dp * 2);
        _tile_dpbf16ps(1, 6, 4);
        _tile_loadd(5, kb + 2 * 16 * dp + k, dp * 2);
        _tile_dpbf16ps(2, 5, 4);
        _tile_loadd(6, kb + 3 * 16 * dp + k, dp * 2);
        _tile_dpbf16ps(3, 6, 4);
      }
      _tile_stored(0, s + 0 * 16 * lds + cb, lds * 4);
      _tile_stored(1, s + 1 * 16 * lds + cb, lds * 4);
      _tile_stored(2, s + 2 * 16 * lds + cb, lds * 4);
      _tile_stored(3, s + 3 * 16 * lds + cb, lds * 4);
    }
  }

  // o[rpad][dvp] += P V: P's two 32-key halves in tmm4/5, 4 output tiles at a time in tmm0-3.
  static void pv(const uint16_t* pb, int64_t rpad, const uint32_t* vv, int64_t dvp, float* o) {
    for (int64_t rb = 0; rb < rpad; rb += 16) {
      _tile_loadd(4, pb + rb * kTile, kTile * 2);
      _tile_loadd(5, pb + rb * kTile + 32, kTile * 2);
      float* orow = o + rb * dvp;
      int64_t cb = 0;
      for (; cb + 64 <= dvp; cb += 64) {
        _tile_loadd(0, orow + cb, dvp * 4);
        _tile_loadd(1, orow + cb + 16, dvp * 4);
        _tile_loadd(2, orow + cb + 32, dvp * 4);
        _tile_loadd(3, orow + cb + 48, dvp * 4);
        _tile_loadd(6, vv + cb, dvp * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, vv + 16 * dvp + cb, dvp * 4);
        _tile_dpbf16ps(0, 5, 7);
        _tile_loadd(6, vv + cb + 16, dvp * 4);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(7, vv + 16 * dvp + cb + 16, dvp * 4);
        _tile_dpbf16ps(1, 5, 7);
        _tile_loadd(6, vv + cb + 32, dvp * 4);
        _tile_dpbf16ps(2, 4, 6);
        _tile_loadd(7, vv + 16 * dvp + cb + 32, dvp * 4);
        _tile_dpbf16ps(2, 5, 7);
        _tile_loadd(6, vv + cb + 48, dvp * 4);
        _tile_dpbf16ps(3, 4, 6);
        _tile_loadd(7, vv + 16 * dvp + cb + 48, dvp * 4);
        _tile_dpbf16ps(3, 5, 7);
        _tile_stored(0, orow + cb, dvp * 4);
        _tile_stored(1, orow + cb + 16, dvp * 4);
        _tile_stored(2, orow + cb + 32, dvp * 4);
        _tile_stored(3, orow + cb + 48, dvp * 4);
      }
      for (; cb < dvp; cb += 16) {
        _tile_loadd(0, orow + cb, dvp * 4);
        _tile_loadd(6, vv + cb, dvp * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, vv + 16 * dvp + cb, dvp * 4);
        _tile_dpbf16ps(0, 5, 7);
        _tile_stored(0, orow + cb, dvp * 4);
      }
    }
  }
};

}  // namespace

const MlaKernels& mla_kernels_amx() {
  static const MlaKernels k = MlaBf16<AmxOps>::table(Isa::kAmx);
  return k;
}

}  // namespace r1x::cpu
