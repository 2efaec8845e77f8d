// MLA kernels (mla.h), portable C++: the tile product as plain loops over contiguous B rows,
// which the compiler vectorises for the baseline target.
#include "cpu/mla_impl.h"

namespace r1x::cpu {
namespace {

struct GemmGeneric {
  static void run(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs,
                  const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
    for (int64_t i = 0; i < m; ++i) {
      float* crow = c + i * ldc;
      if (!accumulate) std::fill(crow, crow + n, 0.0f);
      for (int64_t p = 0; p < k; ++p) {
        const float av = a[i * ars + p * acs];
        const float* brow = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) crow[j] += av * brow[j];
      }
    }
  }
};

}  // namespace

const MlaKernels& mla_kernels_generic() {
  static const MlaKernels k = Mla<GemmGeneric>::table(Isa::kGeneric);
  return k;
}

}  // namespace r1x::cpu
