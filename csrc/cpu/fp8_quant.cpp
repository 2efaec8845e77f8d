#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu/fp8.h"
#include "cpu/fp8_scalar.h"

namespace r1x::cpu {

const Kernels& kernels_for(Isa isa) {
#if R1X_X86_KERNELS  // the ISA translation units are only built for x86-64 (CMakeLists.txt)
  switch (isa) {
    case Isa::kAmx: return kernels_amx();
    case Isa::kAvx512: return kernels_avx512();
    case Isa::kAvx2: return kernels_avx2();
    default: return kernels_generic();
  }
#else
  (void)isa;
  return kernels_generic();
#endif
}

float fp8_scale_from_amax(float amax, bool ue8m0) {
  float s = std::isnan(amax) ? amax : std::max(amax, kMinAmax) / kFp8Max;
  if (ue8m0) {
    uint32_t b = f32_bits(s);
    if ((b & 0x7f800000u) != 0x7f800000u && (b & 0x007fffffu) != 0) {
      b = (b & 0xff800000u) + 0x00800000u;
    }
    s = bits_f32(b);
  }
  return s;
}

namespace {
size_t elem_size(DType d) { return d == DType::kF32 ? 4 : 2; }
// Work items of ~16K elements per task amortise the thread hand-off.
int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, elems_per_item));
}
}  // namespace

void quant_fp8_per_token_group(const void* x, DType dtype, int64_t rows, int64_t k,
                               int64_t group_size, bool ue8m0, uint8_t* q, float* scale) {
  const Kernels& kern = active_kernels();
  const int64_t groups = rows * (k / group_size);
  const char* xb = static_cast<const char*>(x);
  const size_t es = elem_size(dtype);
  at::parallel_for(0, groups, grain_for(group_size), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const void* xg = xb + g * group_size * es;
      const float s = fp8_scale_from_amax(kern.amax(xg, dtype, group_size), ue8m0);
      scale[g] = s;
      kern.quantize(xg, dtype, group_size, s, q + g * group_size);
    }
  });
}

void quant_fp8_per_block(const void* w, DType dtype, int64_t n, int64_t k, int64_t block_size,
                         bool ue8m0, uint8_t* q, float* scale) {
  const Kernels& kern = active_kernels();
  const int64_t bn = (n + block_size - 1) / block_size, bk = (k + block_size - 1) / block_size;
  const char* wb = static_cast<const char*>(w);
  const size_t es = elem_size(dtype);
  at::parallel_for(0, bn * bk, grain_for(block_size * block_size), [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = (blk / bk) * block_size, c0 = (blk % bk) * block_size;
      const int64_t r1 = std::min(n, r0 + block_size), width = std::min(k, c0 + block_size) - c0;
      uint32_t amax = 0;
      for (int64_t r = r0; r < r1; ++r)
        amax = std::max(amax, f32_bits(kern.amax(wb + (r * k + c0) * es, dtype, width)));
      const float s = fp8_scale_from_amax(bits_f32(amax), ue8m0);
      scale[blk] = s;
      for (int64_t r = r0; r < r1; ++r)
        kern.quantize(wb + (r * k + c0) * es, dtype, width, s, q + r * k + c0);
    }
  });
}

void dequant_fp8(const uint8_t* q, const float* scale, int64_t batch, int64_t rows,
                 int64_t cols, int64_t block_r, int64_t block_c, float* out) {
  const Kernels& kern = active_kernels();
  const int64_t sr = (rows + block_r - 1) / block_r, sc = (cols + block_c - 1) / block_c;
  at::parallel_for(0, batch * rows, grain_for(cols), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / rows, r = row % rows;
      const float* srow = scale + (b * sr + r / block_r) * sc;
      for (int64_t j = 0; j < sc; ++j) {
        const int64_t c0 = j * block_c, width = std::min(cols, c0 + block_c) - c0;
        kern.dequantize(q + row * cols + c0, width, srow[j], out + row * cols + c0);
      }
    }
  });
}

}  // namespace r1x::cpu
