#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/fp8.h"

namespace r1x::cpu {

void fp8_gemm(const GemmArgs& args) {
  const Kernels& kern = active_kernels();
  const GemmPlan plan = kern.gemm_plan(args.m, args.n, args.k);
  // Buffers from torch's CPU allocator (64-byte aligned, and cached by it).
  at::Tensor packed = at::empty({static_cast<int64_t>(plan.packed_a_bytes)}, at::kByte);
  void* packed_ptr = packed.data_ptr();

  const int64_t chunks = (args.m + plan.pack_rows - 1) / plan.pack_rows;
  const int64_t rows_per_chunk_grain = std::max<int64_t>(1, 65536 / (plan.pack_rows * args.k));
  at::parallel_for(0, chunks, rows_per_chunk_grain, [&](int64_t begin, int64_t end) {
    kern.gemm_pack_a(args, plan, begin * plan.pack_rows,
                     std::min(args.m, end * plan.pack_rows), packed_ptr);
  });

  const int64_t tiles_m = (args.m + plan.tile_m - 1) / plan.tile_m;
  const int64_t tiles_n = (args.n + plan.tile_n - 1) / plan.tile_n;
  at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({static_cast<int64_t>(plan.scratch_bytes) + 64}, at::kByte);
    void* sp = scratch.data_ptr();
    TileCtx ctx;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t mt = t / tiles_n, nt = t % tiles_n;
      const int64_t m0 = mt * plan.tile_m, n0 = nt * plan.tile_n;
      const int64_t next_m0 = (t + 1) / tiles_n * plan.tile_m, next_n0 = (t + 1) % tiles_n * plan.tile_n;
      ctx = t + 1 < end ? TileCtx{&args, next_m0, std::min(args.m, next_m0 + plan.tile_m), next_n0,
                                  std::min(args.n, next_n0 + plan.tile_n)}
                        : TileCtx{};
      kern.gemm_tile(args, plan, packed_ptr, m0, std::min(args.m, m0 + plan.tile_m), n0,
                     std::min(args.n, n0 + plan.tile_n), sp, ctx);
    }
  });
}

}  // namespace r1x::cpu
