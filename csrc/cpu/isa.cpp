#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define R1X_X86 1
#endif

namespace r1x::cpu {
namespace {

#ifdef R1X_X86
unsigned long long xgetbv0() {
  unsigned int lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

// Linux gates AMX tile data behind a per-process permission request (kernel >= 5.16).
bool request_amx_permission() {
  constexpr long kArchGetXcompPerm = 0x1022;
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  unsigned long long bitmask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) == 0 &&
      (bitmask & (1ULL << kXfeatureXtiledata))) {
    return true;
  }
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

Isa detect() {
  unsigned int eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return Isa::kGeneric;
  const bool osxsave = ecx & (1u << 27), fma = ecx & (1u << 12), f16c = ecx & (1u << 29);
  if (!osxsave) return Isa::kGeneric;
  const unsigned long long xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;        // XMM and YMM state
  const bool os_avx512 = (xcr0 & 0xe6) == 0xe6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;  // XTILECFG and XTILEDATA
  if (__get_cpuid_max(0, nullptr) < 7) return Isa::kGeneric;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const bool avx2 = ebx & (1u << 5), avx512f = ebx & (1u << 16), avx512dq = ebx & (1u << 17),
             avx512bw = ebx & (1u << 30), avx512vl = ebx & (1u << 31);
  const bool avx512vbmi = ecx & (1u << 1);
  const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
  unsigned int eax1, ebx1, ecx1, edx1;
  __cpuid_count(7, 1, eax1, ebx1, ecx1, edx1);
  const bool avx512bf16 = eax1 & (1u << 5);

  if (!(os_avx && avx2 && fma && f16c)) return Isa::kGeneric;
  if (!(os_avx512 && avx512f && avx512bw && avx512vl && avx512dq && avx512vbmi && avx512bf16)) {
    return Isa::kAvx2;
  }
  if (!(os_amx && amx_tile && amx_bf16 && request_amx_permission())) return Isa::kAvx512;
  return Isa::kAmx;
}
#else
Isa detect() { return Isa::kGeneric; }
#endif

Isa initial_cap() {
  const char* env = std::getenv("R1X_CPU_ISA");
  if (env == nullptr || *env == '\0') return Isa::kAmx;
  try {
    return parse_isa(env);
  } catch (const std::invalid_argument&) {
    return Isa::kAmx;  // an unknown name must not break import; r1x.info() shows the level
  }
}

std::atomic<int>& cap_storage() {
  static std::atomic<int> cap{static_cast<int>(initial_cap())};
  return cap;
}

}  // namespace

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() {
  const int cap = cap_storage().load(std::memory_order_relaxed);
  const int det = static_cast<int>(detected_isa());
  return static_cast<Isa>(cap < det ? cap : det);
}

Isa set_isa_cap(Isa cap) {
  return static_cast<Isa>(cap_storage().exchange(static_cast<int>(cap)));
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kGeneric: return "generic";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAmx: return "amx";
  }
  return "unknown";
}

Isa parse_isa(const std::string& name) {
  for (Isa isa : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512, Isa::kAmx}) {
    if (name == isa_name(isa)) return isa;
  }
  throw std::invalid_argument("unknown CPU ISA level '" + name +
                              "': expected one of generic, avx2, avx512, amx");
}

}  // namespace r1x::cpu
