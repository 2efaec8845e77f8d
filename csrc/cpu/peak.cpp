// The machine's measured peak for the active ISA's GEMM instruction (Kernels::peak_probe), on
// every thread at once: what the benchmarks report kernels' TFLOP/s against.
#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>

#include "cpu/kernels.h"

namespace r1x::cpu {

double peak_gflops(const Kernels& kern, double seconds) {
  if (kern.peak_probe == nullptr) return 0.0;
  using clock = std::chrono::steady_clock;
  // calibrate on one thread (also the warm-up), then every thread runs the same count at once
  int64_t iters = 1 << 16;
  for (;;) {
    const auto t0 = clock::now();
    kern.peak_probe(iters);
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    if (dt > 0.01 || iters > (int64_t{1} << 40)) {
      iters = static_cast<int64_t>(iters * seconds / dt) + 1;
      break;
    }
    iters *= 4;
  }
  const int64_t threads = at::get_num_threads();
  std::atomic<int64_t> flops_x1000{0};
  const auto t0 = clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) flops_x1000 += static_cast<int64_t>(kern.peak_probe(iters) / 1000.0);
  });
  const double dt = std::chrono::duration<double>(clock::now() - t0).count();
  return static_cast<double>(flops_x1000.load()) * 1000.0 / dt / 1e9;
}

}  // namespace r1x::cpu
