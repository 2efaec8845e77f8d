// AMX helpers shared by the AMX kernel TUs (include only from TUs compiled with -mamx-tile
// -mamx-bf16 and the AVX-512 flags).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace r1x::cpu {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// All 8 tile registers as 16 rows x 64 bytes (16 x 16 fp32, or 16 x 32 bf16).
inline void configure_full_tiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

}  // namespace
}  // namespace r1x::cpu
