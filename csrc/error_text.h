// Error messages for TORCH_CHECK built without iostreams: text("ring_mean_: count ", 3) gives one
// std::string, and TORCH_CHECK passes a single string or literal through untouched. With several
// message arguments it formats them in this extension's code, through std::ostringstream.
//
// Why: on the H200 image (CXX=/opt/gcc/bin/g++, which links libstdc++ into fastavg._C statically:
// no libstdc++ among its NEEDED libraries), a failed TORCH_CHECK whose message formatted a number
// through that stream crashed the process with a segfault, on the CPU and the GPU alike, while one
// with a single literal message raised RuntimeError (bench/native_error_probe.py, runs 6 and 7).
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
