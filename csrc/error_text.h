// Error messages for TORCH_CHECK built without iostreams: text("ring_mean_: count ", 3) gives one
// std::string, and TORCH_CHECK passes a single string or literal through untouched. With several
// message arguments it formats them in this extension's code, through std::ostringstream.
//
// Why: on the H200 image (CXX=/opt/gcc/bin/g++, which links libstdc++ into the extension
// statically: no libstdc++ among fastavg._C's NEEDED libraries), a failed TORCH_CHECK whose message
// formats a number through that stream crashes the process with a segfault, on the CPU and the GPU
// alike (runs 6 and 7). Run 8 pinned it with a two-line extension built there by the same
// compiler: a number in the message crashed; several literals, TORCH_CHECK_VALUE and a plain
// std::invalid_argument all raised (bench/native_error_probe.py --minimal). std::to_string
// formats without a stream; fastavg._C's every error path raised in run 8.
#pragma once

#include <c10/core/ScalarType.h>

#include <string>
#include <type_traits>

namespace fastavg {

inline void append_text(std::string& out, const char* part) { out += part != nullptr ? part : "(null)"; }
inline void append_text(std::string& out, const std::string& part) { out += part; }
inline void append_text(std::string& out, c10::ScalarType part) { out += c10::toString(part); }
template <typename T, typename std::enable_if<std::is_integral<T>::value, int>::type = 0>
inline void append_text(std::string& out, T part) {
  out += std::to_string(part);  // the C library's formatting, not a stream's locale
}

template <typename... Parts>
std::string text(const Parts&... parts) {
  std::string out;
  (append_text(out, parts), ...);
  return out;
}

}  // namespace fastavg
