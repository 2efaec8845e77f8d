// MoE routing, dispatch and combine on the CPU: threaded over tokens (routing, combine) and
// rows (dispatch); the index bookkeeping of dispatch is one sequential counting pass.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/fp8_scalar.h"
#include "cpu/moe.h"

namespace r1x::cpu {
namespace {

// Descending value, ties to the lower index: the order the reference's stable sort gives.
struct Ranked {
  float v;
  int32_t i;
  bool operator<(const Ranked& o) const { return v > o.v || (v == o.v && i < o.i); }
};

inline float selectable(float v) { return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v; }

void route_token(const void* logits, DType dt, int64_t row, int64_t e, const float* bias,
                 const RouteOptions& opt, float* scores, Ranked* cand, Ranked* groups,
                 float* w_out, int32_t* id_out) {
  const int64_t base = row * e;
  if (opt.softmax) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < e; ++j) {
      scores[j] = load_as_f32(logits, int(dt), base + j);
      mx = std::max(mx, scores[j]);
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < e; ++j) {
      scores[j] = std::exp(scores[j] - mx);
      sum += scores[j];
    }
    for (int64_t j = 0; j < e; ++j) scores[j] /= sum;
  } else {
    for (int64_t j = 0; j < e; ++j) scores[j] = 1.0f / (1.0f + std::exp(-load_as_f32(logits, int(dt), base + j)));
  }
  for (int64_t j = 0; j < e; ++j)
    cand[j] = {selectable(bias ? scores[j] + bias[j] : scores[j]), static_cast<int32_t>(j)};
  if (opt.n_group > 1) {
    // rate each group by the sum of its two best choice values; keep the topk_group best
    const int64_t gs = e / opt.n_group;
    for (int64_t g = 0; g < opt.n_group; ++g) {
      float b1 = -std::numeric_limits<float>::infinity(), b2 = b1;
      for (int64_t j = g * gs; j < (g + 1) * gs; ++j) {
        const float v = cand[j].v;
        if (v > b1) {
          b2 = b1;
          b1 = v;
        } else if (v > b2) {
          b2 = v;
        }
      }
      groups[g] = {selectable(gs >= 2 ? b1 + b2 : b1), static_cast<int32_t>(g)};
    }
    std::partial_sort(groups, groups + opt.topk_group, groups + opt.n_group);
    for (int64_t g = opt.topk_group; g < opt.n_group; ++g)
      for (int64_t j = groups[g].i * gs; j < (groups[g].i + 1) * gs; ++j)
        cand[j].v = -std::numeric_limits<float>::infinity();
  }
  std::partial_sort(cand, cand + opt.top_k, cand + e);
  float sum = 0.0f;
  for (int64_t j = 0; j < opt.top_k; ++j) {
    id_out[j] = cand[j].i;
    w_out[j] = scores[cand[j].i];
    sum += w_out[j];
  }
  const float denom = opt.norm_topk_prob ? sum + 1e-20f : 1.0f;
  for (int64_t j = 0; j < opt.top_k; ++j) {
    w_out[j] = (opt.norm_topk_prob ? w_out[j] / denom : w_out[j]) * opt.routed_scaling_factor;
  }
}

template <class T>
inline float to_f32(T v);
template <>
inline float to_f32<float>(float v) { return v; }
template <>
inline float to_f32<uint16_t>(uint16_t v) { return bf16_to_f32(v); }
template <class T>
inline T from_f32(float v);
template <>
inline float from_f32<float>(float v) { return v; }
template <>
inline uint16_t from_f32<uint16_t>(float v) { return f32_to_bf16(v); }

}  // namespace

void moe_topk_route(const void* logits, DType dtype, int64_t t, int64_t e, const void* bias,
                    DType bias_dtype, const RouteOptions& opt, float* weights, int32_t* ids) {
  std::vector<float> biasf;
  if (bias) {
    biasf.resize(e);
    for (int64_t j = 0; j < e; ++j) biasf[j] = load_as_f32(bias, int(bias_dtype), j);
  }
  at::parallel_for(0, t, 64, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(e);
    std::vector<Ranked> cand(e), groups(opt.n_group);
    for (int64_t r = t0; r < t1; ++r)
      route_token(logits, dtype, r, e, bias ? biasf.data() : nullptr, opt, scores.data(),
                  cand.data(), groups.data(), weights + r * opt.top_k, ids + r * opt.top_k);
  });
}

int64_t moe_dispatch_index(const void* ids, bool ids64, int64_t t, int64_t k, int64_t e,
                           int32_t* offs, int32_t* perm) {
  const int64_t rows = t * k;
  auto id = [&](int64_t r) -> int64_t {
    return ids64 ? static_cast<const int64_t*>(ids)[r] : static_cast<const int32_t*>(ids)[r];
  };
  std::vector<int64_t> cursor(e + 1, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t x = id(r);
    if (x < 0 || x >= e) return r;
    ++cursor[x + 1];
  }
  for (int64_t x = 0; x < e; ++x) {
    cursor[x + 1] += cursor[x];
    offs[x] = static_cast<int32_t>(cursor[x + 1]);
  }
  for (int64_t r = 0; r < rows; ++r) perm[cursor[id(r)]++] = static_cast<int32_t>(r);
  return -1;
}

void moe_gather_rows(const void* x, int64_t row_bytes, const int32_t* perm, int64_t rows,
                     int64_t k, void* out) {
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      std::memcpy(static_cast<char*>(out) + r * row_bytes,
                  static_cast<const char*>(x) + (perm[r] / k) * row_bytes, row_bytes);
  });
}

namespace {

template <class T>
void combine_rows(const T* y, const void* w, DType w_dtype, const int32_t* inv, int64_t t0,
                  int64_t t1, int64_t k, int64_t h, DType dtype, void* out) {
  std::vector<float> acc(h);
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j = 0; j < k; ++j) {
      const float wj = load_as_f32(w, int(w_dtype), t * k + j);
      const T* src = y + inv[t * k + j] * h;
      for (int64_t c = 0; c < h; ++c) acc[c] += wj * to_f32(src[c]);
    }
    store_row_scalar(acc.data(), h, int(dtype), static_cast<char*>(out) + t * h * (dtype == DType::kF32 ? 4 : 2));
  }
}

}  // namespace

namespace {

// inv[perm[r]] = r; the first bad r (out of range or repeated), or -1.
int64_t invert(const int32_t* perm, int64_t rows, std::vector<int32_t>& inv) {
  inv.assign(rows, -1);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p = perm[r];
    if (p < 0 || p >= rows || inv[p] >= 0) return r;
    inv[p] = static_cast<int32_t>(r);
  }
  return -1;
}

template <class T>
void combine_backward_rows(const T* g, const T* y, const void* w, DType w_dtype,
                           const int32_t* inv, int64_t t0, int64_t t1, int64_t k, int64_t h,
                           T* grad_y, float* grad_w) {
  std::vector<float> gf(h);
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t c = 0; c < h; ++c) gf[c] = to_f32(g[t * h + c]);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = inv[t * k + j];
      const float wj = load_as_f32(w, int(w_dtype), t * k + j);
      const T* yr = y + r * h;
      T* gy = grad_y + r * h;
      float dot[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t c = 0;
      for (; c + 8 <= h; c += 8)
        for (int u = 0; u < 8; ++u) dot[u] += gf[c + u] * to_f32(yr[c + u]);
      for (; c < h; ++c) dot[0] += gf[c] * to_f32(yr[c]);
      for (c = 0; c < h; ++c) gy[c] = from_f32<T>(wj * gf[c]);
      grad_w[t * k + j] = ((dot[0] + dot[1]) + (dot[2] + dot[3])) + ((dot[4] + dot[5]) + (dot[6] + dot[7]));
    }
  }
}

}  // namespace

int64_t moe_combine_backward(const void* g, const void* y, DType dtype, const void* w,
                             DType w_dtype, const int32_t* perm, int64_t t, int64_t k, int64_t h,
                             void* grad_y, float* grad_w) {
  std::vector<int32_t> inv;
  const int64_t bad = invert(perm, t * k, inv);
  if (bad >= 0) return bad;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(h * k, 1));
  at::parallel_for(0, t, grain, [&](int64_t t0, int64_t t1) {
    if (dtype == DType::kF32) {
      combine_backward_rows(static_cast<const float*>(g), static_cast<const float*>(y), w, w_dtype,
                            inv.data(), t0, t1, k, h, static_cast<float*>(grad_y), grad_w);
    } else {
      combine_backward_rows(static_cast<const uint16_t*>(g), static_cast<const uint16_t*>(y), w,
                            w_dtype, inv.data(), t0, t1, k, h, static_cast<uint16_t*>(grad_y), grad_w);
    }
  });
  return -1;
}

int64_t moe_combine(const void* y, DType dtype, const void* w, DType w_dtype,
                    const int32_t* perm, int64_t t, int64_t k, int64_t h, void* out) {
  const int64_t rows = t * k;
  std::vector<int32_t> inv;
  const int64_t bad = invert(perm, rows, inv);
  if (bad >= 0) return bad;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(h * k, 1));
  at::parallel_for(0, t, grain, [&](int64_t t0, int64_t t1) {
    if (dtype == DType::kF32) {
      combine_rows(static_cast<const float*>(y), w, w_dtype, inv.data(), t0, t1, k, h, dtype, out);
    } else {
      combine_rows(static_cast<const uint16_t*>(y), w, w_dtype, inv.data(), t0, t1, k, h, dtype, out);
    }
  });
  return -1;
}

}  // namespace r1x::cpu
