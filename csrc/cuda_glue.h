// Helpers shared by the torch-facing CUDA glue (csrc/*_cuda.cpp): dtype mapping, launch-error
// reporting, operand preparation and workspace allocation with the caching allocator.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "check.h"
#include "cuda/launch.h"

namespace r1x {

inline cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: return cuda::DType::kFloat16;
  }
}

inline void check_launch(cudaError_t err, const char* op) {
  R1X_CHECK(err == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

// Contiguous, with a 16-byte-aligned data pointer (vector loads and TMA need it).
inline at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// `bytes` of scratch on `like`'s device, 256-byte aligned; keep `buffer` alive until the kernels
// that use it are enqueued (the caching allocator orders reuse on the stream).
struct Workspace {
  at::Tensor buffer;
  void* ptr = nullptr;
  size_t bytes = 0;
};

inline Workspace make_workspace(size_t bytes, const at::Tensor& like) {
  constexpr size_t kAlign = 256;
  Workspace w;
  w.bytes = bytes;
  if (bytes == 0) return w;
  w.buffer = at::empty({static_cast<int64_t>(bytes + kAlign)}, like.options().dtype(at::kByte));
  const uintptr_t p = reinterpret_cast<uintptr_t>(w.buffer.data_ptr());
  w.ptr = reinterpret_cast<void*>((p + kAlign - 1) / kAlign * kAlign);
  return w;
}

}  // namespace r1x
