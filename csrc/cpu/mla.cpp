// MLA CPU driver (mla.h): picks the ISA's kernels, cuts the work into tasks, runs them on
// ATen's thread pool with a shared work queue (costs differ a lot between tasks: causal query
// blocks, sequences of different lengths), and merges the decode's split-KV partial results.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/fp8_scalar.h"
#include "cpu/mla.h"

namespace r1x::cpu {
namespace {

const MlaKernels& kernels() {
#if R1X_X86_KERNELS  // the ISA translation units are only built for x86-64 (CMakeLists.txt)
  const Isa isa = active_isa();
  return isa >= Isa::kAmx      ? mla_kernels_amx()
         : isa >= Isa::kAvx512 ? mla_kernels_avx512()
         : isa >= Isa::kAvx2   ? mla_kernels_avx2()
                               : mla_kernels_generic();
#else
  return mla_kernels_generic();
#endif
}

// Runs fn(task, scratch) for task in [0, n) on every worker: tasks are claimed in order from
// an atomic counter (put the expensive ones first), each worker with its own scratch.
template <class Fn>
void run_tasks(int64_t n, size_t scratch_bytes, const Fn& fn) {
  if (n == 0) return;
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    at::Tensor buf = at::empty({static_cast<int64_t>(scratch_bytes) + 64}, at::kByte);
    const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data_ptr());
    void* scratch = reinterpret_cast<void*>((p + 63) / 64 * 64);
    (void)w0;
    (void)w1;
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(t, scratch);
  });
}

struct Task {
  int64_t seq, head, q0, q1;
  double cost;
};

}  // namespace

void mla_attention_forward(const AttnFwdArgs& args) {
  const MlaKernels& k = kernels();
  std::vector<Task> tasks;
  for (int64_t b = 0; b < args.batch; ++b) {
    const int64_t len = args.cu[b + 1] - args.cu[b];
    for (int64_t q0 = 0; q0 < len; q0 += kMlaBlockQ) {
      const int64_t q1 = std::min(len, q0 + kMlaBlockQ);
      const double keys = static_cast<double>(args.causal ? q1 : len);
      for (int64_t h = 0; h < args.h; ++h) tasks.push_back({b, h, q0, q1, keys * (q1 - q0)});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& x, const Task& y) { return x.cost > y.cost; });
  run_tasks(static_cast<int64_t>(tasks.size()), k.fwd_scratch(args), [&](int64_t i, void* s) {
    const Task& t = tasks[i];
    k.fwd_task(args, t.seq, t.head, t.q0, t.q1, s);
  });
}

void mla_attention_backward(const AttnBwdArgs& args) {
  const MlaKernels& k = kernels();
  std::vector<Task> tasks;
  int64_t max_len = 0;
  for (int64_t b = 0; b < args.batch; ++b) {
    const int64_t len = args.cu[b + 1] - args.cu[b];
    max_len = std::max(max_len, len);
    if (len == 0) continue;
    for (int64_t h = 0; h < args.h; ++h)
      tasks.push_back({b, h, 0, len, static_cast<double>(len) * static_cast<double>(len)});
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& x, const Task& y) { return x.cost > y.cost; });
  run_tasks(static_cast<int64_t>(tasks.size()), k.bwd_scratch(args, max_len),
            [&](int64_t i, void* s) { k.bwd_task(args, tasks[i].seq, tasks[i].head, s); });
}

void mla_decode(const DecodeArgs& args) {
  const MlaKernels& k = kernels();
  const int64_t rows = args.sq * args.h, dv = args.dv;
  const float kNegInf = -std::numeric_limits<float>::infinity();
  // Split each sequence's tokens so that there are a few tasks per thread even for one
  // sequence, but never below 256 tokens a split (each split re-reads the queries and adds a
  // partial output to merge).
  int64_t max_len = 0;
  for (int64_t b = 0; b < args.batch; ++b) max_len = std::max<int64_t>(max_len, args.seqlens[b]);
  const int64_t want = (4 * at::get_num_threads() + args.batch - 1) / std::max<int64_t>(args.batch, 1);
  const int64_t splits = std::max<int64_t>(1, std::min(want, (max_len + 255) / 256));
  const int64_t chunk = std::max<int64_t>(
      kMlaBlockK, (max_len + splits - 1) / splits + kMlaBlockK - 1) / kMlaBlockK * kMlaBlockK;

  // partials [batch, splits] of (o [rows, dv], m [rows], l [rows])
  const int64_t part_floats = rows * dv + 2 * rows;
  at::Tensor partial = at::empty({args.batch * splits * part_floats}, at::kFloat);
  float* base = partial.data_ptr<float>();
  auto part = [&](int64_t b, int64_t s) {
    float* p = base + (b * splits + s) * part_floats;
    return DecodePartial{p, p + rows * dv, p + rows * dv + rows};
  };
  std::vector<Task> tasks;
  for (int64_t b = 0; b < args.batch; ++b) {
    const int64_t len = args.seqlens[b];
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t t0 = std::min(len, s * chunk), t1 = std::min(len, t0 + chunk);
      tasks.push_back({b, s, t0, t1, static_cast<double>(t1 - t0)});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& x, const Task& y) { return x.cost > y.cost; });
  run_tasks(static_cast<int64_t>(tasks.size()), k.decode_scratch(args), [&](int64_t i, void* s) {
    const Task& t = tasks[i];
    k.decode_task(args, t.seq, t.q0, t.q1, part(t.seq, t.head), s);
  });

  // merge: M = max m_i, L = sum l_i 2^(m_i - M), out = sum o_i 2^(m_i - M) / L
  const size_t es = args.dtype == DType::kF32 ? 4 : 2;
  at::parallel_for(0, args.batch * rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> acc(dv), w(splits);
    for (int64_t br = r0; br < r1; ++br) {
      const int64_t b = br / rows, r = br % rows;
      float mmax = kNegInf;
      for (int64_t s = 0; s < splits; ++s) mmax = std::max(mmax, part(b, s).m[r]);
      float l = 0.0f;
      for (int64_t s = 0; s < splits; ++s) {
        const DecodePartial p = part(b, s);
        w[s] = p.l[r] > 0.0f ? std::exp2(p.m[r] - mmax) : 0.0f;
        l += w[s] * p.l[r];
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t s = 0; s < splits; ++s) {
        if (w[s] == 0.0f) continue;
        const float* o = part(b, s).o + r * dv;
        for (int64_t j = 0; j < dv; ++j) acc[j] += w[s] * o[j];
      }
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      for (int64_t j = 0; j < dv; ++j) acc[j] *= inv;
      // out [b, s, h, dv] is row br of [batch * rows, dv]; lse [b, h, s]
      void* dst = static_cast<char*>(args.out) + br * dv * static_cast<int64_t>(es);
      if (args.dtype == DType::kF32) {
        std::copy(acc.begin(), acc.end(), static_cast<float*>(dst));
      } else if (args.dtype == DType::kBF16) {
        for (int64_t j = 0; j < dv; ++j) static_cast<uint16_t*>(dst)[j] = f32_to_bf16(acc[j]);
      } else {
        for (int64_t j = 0; j < dv; ++j) static_cast<Float16*>(dst)[j] = static_cast<Float16>(acc[j]);
      }
      const int64_t sq = r / args.h, head = r % args.h;
      args.lse[(b * args.h + head) * args.sq + sq] =
          l > 0.0f ? (mmax + std::log2(l)) * 0.6931471805599453f : kNegInf;
    }
  });
}

}  // namespace r1x::cpu
