// R1X_CHECK, R1X_CHECK_VALUE, R1X_CHECK_TYPE: TORCH_CHECK* with the message built by plain
// string appends instead of an std::ostringstream.
//
// Why: on the first GPU run (Ubuntu 24.04 image, GCC 13.3, torch 2.11+cu130, after CUDA was
// initialised) every r1x error whose message streamed a number (`ss << int64_t`, a shape)
// crashed the process with SIGSEGV, while the messages made only of strings and dtype names were
// raised fine (benchmarks/results/gpu_check_2026-12-04_h200.md). Numbers go through the stream's
// num_put facet; appending std::to_string results does not touch a locale at all, so a message
// can be built whatever state the process's iostreams are in. The message is built only when the
// check fails (the TORCH_CHECK macros evaluate their message lazily).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace r1x {
namespace detail {

inline void append(std::string& s, const char* v) { s += v ? v : "(null)"; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, std::string_view v) { s.append(v.data(), v.size()); }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename T,
          std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> && !std::is_same_v<T, char>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);  // what `ostream << double` prints by default
  s += buf;
}
inline void append(std::string& s, float v) { append(s, static_cast<double>(v)); }
inline void append(std::string& s, c10::IntArrayRef v) {  // "[2, 3]", as c10 prints sizes
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }

}  // namespace detail

// The concatenation of the arguments as text.
template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace r1x

#define R1X_CHECK(cond, ...) TORCH_CHECK(cond, ::r1x::message(__VA_ARGS__))
#define R1X_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::r1x::message(__VA_ARGS__))
#define R1X_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::r1x::message(__VA_ARGS__))
