// Runtime ISA selection for the CPU kernels.
//
// Each ISA level's kernels are compiled in their own translation unit with that ISA's flags
// (see CMakeLists.txt); nothing outside those files may use ISA-specific instructions. The
// level in use is the best the CPU and OS support, capped by the R1X_CPU_ISA environment
// variable or r1x._C.set_cpu_isa() (tests use the cap to run every path on one machine).
#pragma once

#include <string>

namespace r1x::cpu {

enum class Isa : int {
  kGeneric = 0,  // portable C++ (whatever the compiler's baseline x86-64 target allows)
  kAvx2 = 1,     // AVX2 + FMA + F16C: fp32 FMA kernels
  kAvx512 = 2,   // AVX-512 F/BW/VL/DQ/VBMI + AVX512_BF16: bf16 dot-product kernels
  kAmx = 3,      // kAvx512 + AMX-TILE/AMX-BF16 (tile matrix multiply), OS permission granted
};

// The best level this machine supports (computed once).
Isa detected_isa();
// The level the kernels use now: min(detected, cap).
Isa active_isa();
// Caps the level; returns the previous cap. Names: generic, avx2, avx512, amx.
Isa set_isa_cap(Isa cap);

const char* isa_name(Isa isa);
// Parses a level name; throws std::invalid_argument naming the accepted values.
Isa parse_isa(const std::string& name);

}  // namespace r1x::cpu
