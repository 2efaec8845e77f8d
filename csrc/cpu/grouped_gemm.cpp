// Grouped GEMM drivers: the groups' GEMMs run as one parallel job. First every group's
// packing (units spread over the threads), then every group's output tiles, group-major so
// that each thread walks whole experts; one scratch buffer per thread, sized for the largest
// group. The per-group products are the ISA kernels' (fgemm_*.cpp for bf16/fp32, the FP8
// GEMM kernels of kernels_*.cpp for e4m3).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "cpu/fp8_scalar.h"
#include "cpu/moe.h"

namespace r1x::cpu {
namespace {

inline size_t align64(size_t x) { return (x + 63) / 64 * 64; }

// What the generic driver needs to know of one group's GEMM.
struct GroupJob {
  int64_t pack_units, tiles_m, tiles_n, tile_m, tile_n, m, n;
  size_t packed_bytes, scratch_bytes;
};

// pack(g, u0, u1, packed_g); tile(g, packed_g, m0, m1, n0, n1, scratch, ctx), where ctx names
// the thread's next tile (kernels.h): args_of(g) is group g's argument struct.
template <class Pack, class Tile, class ArgsOf>
void run_groups(const std::vector<GroupJob>& jobs, Pack pack, Tile tile, ArgsOf args_of) {
  const int64_t groups = static_cast<int64_t>(jobs.size());
  std::vector<size_t> packed_off(groups + 1, 0);
  size_t scratch = 0;
  std::vector<int64_t> tile_start(groups + 1, 0);
  struct Chunk { int64_t g, u0, u1; };
  std::vector<Chunk> chunks;
  for (int64_t g = 0; g < groups; ++g) {
    const GroupJob& j = jobs[g];
    packed_off[g + 1] = packed_off[g] + align64(j.packed_bytes);
    scratch = std::max(scratch, j.scratch_bytes);
    tile_start[g + 1] = tile_start[g] + j.tiles_m * j.tiles_n;
    const int64_t step = std::max<int64_t>(1, (j.pack_units + 7) / 8);
    for (int64_t u = 0; u < j.pack_units; u += step) chunks.push_back({g, u, std::min(j.pack_units, u + step)});
  }
  at::Tensor packed = at::empty({static_cast<int64_t>(packed_off[groups]) + 64}, at::kByte);
  char* base = static_cast<char*>(packed.data_ptr());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) pack(chunks[c].g, chunks[c].u0, chunks[c].u1, base + packed_off[chunks[c].g]);
  });
  at::parallel_for(0, tile_start[groups], 1, [&](int64_t t0, int64_t t1) {
    at::Tensor buf = at::empty({static_cast<int64_t>(scratch) + 64}, at::kByte);
    void* sp = buf.data_ptr();
    TileCtx ctx;
    int64_t g = std::upper_bound(tile_start.begin(), tile_start.end(), t0) - tile_start.begin() - 1;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= tile_start[g + 1]) ++g;
      const GroupJob& j = jobs[g];
      const int64_t local = t - tile_start[g];
      const int64_t m0 = (local / j.tiles_n) * j.tile_m, n0 = (local % j.tiles_n) * j.tile_n;
      ctx = TileCtx{};
      if (t + 1 < t1) {  // the next tile, in this group or the next one with tiles
        int64_t h = g;
        while (t + 1 >= tile_start[h + 1]) ++h;
        const GroupJob& jn = jobs[h];
        const int64_t ln = t + 1 - tile_start[h];
        const int64_t nm0 = (ln / jn.tiles_n) * jn.tile_m, nn0 = (ln % jn.tiles_n) * jn.tile_n;
        ctx = TileCtx{args_of(h), nm0, std::min(jn.m, nm0 + jn.tile_m), nn0, std::min(jn.n, nn0 + jn.tile_n)};
      }
      tile(g, base + packed_off[g], m0, std::min(j.m, m0 + j.tile_m), n0, std::min(j.n, n0 + j.tile_n), sp, ctx);
    }
  });
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t esize(DType d) { return d == DType::kF32 ? 4 : 2; }

enum class Product { kForward, kGradA, kGradB };

// Groups with at least this many tokens run on ATen's matmul (oneDNN, itself multithreaded)
// instead of r1x's kernels, where oneDNN is faster: measured crossovers per CPU path, dtype and
// product (r1x time / oneDNN time; kNever: r1x is faster at every size measured).
//   avx512 (Zen 4, 2 threads), bf16, single groups of N x K = 2816 x 2048, 2048 x 1408 and
//     1408 x 2048: forward 0.77-0.97 at 16 tokens, 1.03-1.07 at 512; grad_a 0.87-0.96 at 16,
//     1.03-1.10 at 512; grad_b 1.10-1.27 at 16, 1.06-1.2 at 512. Grouped (E groups of 2816 x
//     2048 at 4-512 tokens), the differences up to 256 tokens are within this VM's noise and a
//     oneDNN call per group costs its own thread hand-off, so only groups of >= 512 tokens go
//     to oneDNN (and grad_b's from 256).
//   avx512, fp32, 64 groups of 2816 x 2048 at 4-64 tokens: forward 0.33-0.87 (never); grad_a
//     5-8x, grad_b 1.3-1.4x slower (the FMA kernel packs the weights to fp32 per call): always.
//   avx2 (Zen 4 with r1x's avx2 path and oneDNN capped at AVX2), 8 groups of 1408 x 2048: fp32
//     forward 1.15-1.25 at 64-512 tokens, grad_a 1.25, grad_b 1.3-1.5 (-> 64); bf16: oneDNN
//     has no native bf16 below AVX512_CORE_BF16 and converts (never).
//   amx: not re-measured here; its kernels were tuned against oneDNN on AMX (never).
constexpr int64_t kNever = INT64_MAX;
int64_t library_min_tokens(Product p, DType dt) {
  switch (active_isa()) {
    case Isa::kAvx512:
      if (dt == DType::kBF16) return p == Product::kGradB ? 256 : 512;
      return p == Product::kForward ? kNever : 1;
    case Isa::kAvx2: return dt == DType::kF32 ? 64 : kNever;
    default: return kNever;
  }
}

// out = x @ y on ATen (strided views of the raw operands).
void library_gemm(const FGemmArgs& a) {
  const at::ScalarType st = a.dtype == DType::kF32 ? at::kFloat : at::kBFloat16;
  const auto opts = at::TensorOptions().dtype(st);
  at::Tensor x = at::from_blob(const_cast<void*>(a.x.ptr), {a.m, a.k}, {a.x.rs, a.x.cs}, opts);
  at::Tensor y = at::from_blob(const_cast<void*>(a.y.ptr), {a.k, a.n}, {a.y.rs, a.y.cs}, opts);
  at::Tensor out = at::from_blob(a.out, {a.m, a.n}, {a.ldo, 1}, opts);
  at::mm_out(out, x, y);
}

// Runs one float GEMM per group (groups with an empty product are skipped), large ones on ATen.
void run_fgemm(const std::vector<FGemmArgs>& args, Product product) {
  const FGemmKernels& kern = fgemm_kernels_for(active_isa());
  std::vector<FGemmArgs> live, lib;
  for (const FGemmArgs& a : args) {
    if (a.m == 0 || a.n == 0 || a.k == 0) continue;
    const int64_t tokens = product == Product::kGradB ? a.k : a.m;
    (tokens >= library_min_tokens(product, a.dtype) ? lib : live).push_back(a);
  }
  for (const FGemmArgs& a : lib) library_gemm(a);
  std::vector<FGemmPlan> plans;
  std::vector<GroupJob> jobs;
  for (const FGemmArgs& a : live) {
    const FGemmPlan p = kern.plan(a);
    plans.push_back(p);
    jobs.push_back({p.pack_units, cdiv(a.m, p.tile_m), cdiv(a.n, p.tile_n), p.tile_m, p.tile_n, a.m,
                    a.n, p.packed_bytes, p.scratch_bytes});
  }
  run_groups(
      jobs, [&](int64_t g, int64_t u0, int64_t u1, void* packed) { kern.pack(live[g], plans[g], u0, u1, packed); },
      [&](int64_t g, const void* packed, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* sp,
          TileCtx& ctx) { kern.tile(live[g], plans[g], packed, m0, m1, n0, n1, sp, ctx); },
      [&](int64_t g) { return static_cast<const void*>(&live[g]); });
}

// Rows [offs[g-1], offs[g]) of group g.
inline int64_t group_begin(const int32_t* offs, int64_t g) { return g == 0 ? 0 : offs[g - 1]; }

void zero_rows(void* out, int64_t row0, int64_t row1, int64_t row_bytes) {
  if (row1 > row0) std::memset(static_cast<char*>(out) + row0 * row_bytes, 0, (row1 - row0) * row_bytes);
}

}  // namespace

void grouped_gemm(const void* a, const void* b, const int32_t* offs, int64_t groups, int64_t n,
                  int64_t k, DType dtype, void* out) {
  const size_t es = esize(dtype);
  std::vector<FGemmArgs> args;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = group_begin(offs, g), rows = offs[g] - r0;
    if (k == 0) {
      zero_rows(out, r0, offs[g], n * es);
      continue;
    }
    // x = a rows [rows, k]; y(p, j) = b[g][j, p]
    args.push_back({{static_cast<const char*>(a) + r0 * k * es, k, 1},
                    {static_cast<const char*>(b) + g * n * k * es, 1, k},
                    static_cast<char*>(out) + r0 * n * es, n, dtype, rows, n, k});
  }
  run_fgemm(args, Product::kForward);
}

void grouped_gemm_grad_a(const void* grad, const void* b, const int32_t* offs, int64_t groups,
                         int64_t n, int64_t k, DType dtype, void* grad_a) {
  const size_t es = esize(dtype);
  std::vector<FGemmArgs> args;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = group_begin(offs, g), rows = offs[g] - r0;
    if (n == 0) {
      zero_rows(grad_a, r0, offs[g], k * es);
      continue;
    }
    // x = grad rows [rows, n]; y = b[g] [n, k]
    args.push_back({{static_cast<const char*>(grad) + r0 * n * es, n, 1},
                    {static_cast<const char*>(b) + g * n * k * es, k, 1},
                    static_cast<char*>(grad_a) + r0 * k * es, k, dtype, rows, k, n});
  }
  run_fgemm(args, Product::kGradA);
}

void grouped_gemm_grad_b(const void* grad, const void* a, const int32_t* offs, int64_t groups,
                         int64_t n, int64_t k, DType dtype, void* grad_b) {
  const size_t es = esize(dtype);
  std::vector<FGemmArgs> args;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = group_begin(offs, g), rows = offs[g] - r0;
    if (rows == 0) {
      zero_rows(grad_b, g * n, (g + 1) * n, k * es);
      continue;
    }
    // x(i, p) = grad[r0 + p, i]: [n, rows]; y = a rows [rows, k]
    args.push_back({{static_cast<const char*>(grad) + r0 * n * es, 1, n},
                    {static_cast<const char*>(a) + r0 * k * es, k, 1},
                    static_cast<char*>(grad_b) + g * n * k * es, k, dtype, n, k, rows});
  }
  run_fgemm(args, Product::kGradB);
}

void fp8_grouped_gemm(const uint8_t* a, const float* a_scale, const uint8_t* b,
                      const float* b_scale, const int32_t* offs, int64_t groups, int64_t n,
                      int64_t k, DType out_dtype, void* out) {
  const Kernels& kern = active_kernels();
  const int64_t kb = k / kGemmBlock, nb = cdiv(n, kGemmBlock);
  const size_t es = esize(out_dtype);
  std::vector<GemmArgs> args;
  std::vector<GemmPlan> plans;
  std::vector<GroupJob> jobs;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = group_begin(offs, g), rows = offs[g] - r0;
    if (rows == 0) continue;
    args.push_back({a + r0 * k, a_scale + r0 * kb, b + g * n * k, b_scale + g * nb * kb,
                    static_cast<char*>(out) + r0 * n * es, out_dtype, rows, n, k});
    const GemmPlan p = kern.gemm_plan(rows, n, k);
    plans.push_back(p);
    jobs.push_back({cdiv(rows, p.pack_rows), cdiv(rows, p.tile_m), cdiv(n, p.tile_n), p.tile_m,
                    p.tile_n, rows, n, p.packed_a_bytes, p.scratch_bytes});
  }
  run_groups(
      jobs,
      [&](int64_t g, int64_t u0, int64_t u1, void* packed) {
        const int64_t pr = plans[g].pack_rows;
        kern.gemm_pack_a(args[g], plans[g], u0 * pr, std::min(args[g].m, u1 * pr), packed);
      },
      [&](int64_t g, const void* packed, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* sp,
          TileCtx& ctx) { kern.gemm_tile(args[g], plans[g], packed, m0, m1, n0, n1, sp, ctx); },
      [&](int64_t g) { return static_cast<const void*>(&args[g]); });
}

}  // namespace r1x::cpu
