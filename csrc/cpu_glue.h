// Helpers shared by the CPU glue files (csrc/<family>.cpp).
#pragma once

#include <ATen/ATen.h>

#include "cpu/kernels.h"

namespace r1x {

// float32 / bfloat16 / float16 -> the CPU kernels' dtype tag.
inline cpu::DType cpu_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::DType::kF32;
    case at::kBFloat16: return cpu::DType::kBF16;
    default: return cpu::DType::kF16;
  }
}

}  // namespace r1x
