// LAWA alone as the driver's copies: each parameter's bytes into its place in each ring slot, as
// one list for cudaMemcpyBatchAsync (ops_cuda.cu's copy_rings). Plain C++, no CUDA or torch
// headers, so that tests/cuda_host/emulate.cpp runs the same list on the CPU (with memcpy).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace fastavg {
namespace cuda {

struct RingCopies {
  std::vector<void*> destinations;
  std::vector<const void*> sources;
  std::vector<size_t> sizes;
};

// Parameter i (`bytes[i]` bytes at `params[i]`) goes to each slot at the sum of the bytes before it:
// a slot holds the parameters back to back, as the flat buffers do. Empty parameters copy nothing.
inline RingCopies ring_copy_list(const void* const* params, const int64_t* bytes, int64_t n_params, void* const* slots,
                                 int n_slots) {
  RingCopies copies;
  for (int s = 0; s < n_slots; ++s) {
    int64_t offset = 0;
    for (int64_t i = 0; i < n_params; ++i) {
      if (bytes[i] > 0) {
        copies.destinations.push_back(static_cast<char*>(slots[s]) + offset);
        copies.sources.push_back(params[i]);
        copies.sizes.push_back(static_cast<size_t>(bytes[i]));
      }
      offset += bytes[i];
    }
  }
  return copies;
}

}  // namespace cuda
}  // namespace fastavg
