// The CUDA launchers, callable from a host compiler with no CUDA headers: raw pointers, the
// stream as void*, dtypes as our own codes. Each returns nullptr or a CUDA error message.
#pragma once
#include <cstdint>

namespace fastavg {
namespace cuda {

enum Dtype : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };
constexpr int kMaxAverages = 4;
constexpr int kMaxRings = 2;

struct UpdateArgs {
  const int64_t* table;  // (rows, 4) on the device: address, flat offset, length, aligned
  int64_t rows;
  void* averages[kMaxAverages];
  double weights[kMaxAverages];
  float weights32[kMaxAverages];  // the same, rounded for float math (filled by update())
  bool copies[kMaxAverages];      // weight 1: a first update, a copy (filled by update())
  int n_averages;
  void* rings[kMaxRings];  // the slot being written, (N,) each
  int n_rings;
  bool vectors_ok;  // every average and ring pointer is 16-byte aligned
};

const char* update(UpdateArgs args, Dtype param, Dtype average, int device, void* stream);
// mode 0: p = average; 1: p = mean(ring[:count]) rounded to `average`; 2: p = backup (restore).
const char* swap(const int64_t* table, int64_t rows, void* backup, const void* source, int64_t stride, int64_t count,
                 Dtype param, Dtype average, int mode, bool vectors_ok, int device, void* stream);
const char* ring_mean(void* out, const void* ring, int64_t n, int64_t stride, int64_t count, Dtype out_dtype,
                      Dtype ring_dtype, int device, void* stream);
// Threads per block of update and swap launches from now on, for tuning (bench/kernel_sweep.py):
// a multiple of 32 up to kThreads (256; the default is 128). Returns the previous value, or -1
// (unchanged) for any other number.
int set_block_threads(int threads);
// Vectors per thread per pass of later ring-only update and vector swap launches, as a multiple of
// one, for tuning: 1, 2 (the default) or 4. Returns the previous value, or -1 (unchanged).
int set_unroll(int factor);
// Later update and swap launches' grid, for tuning: 0, the default, a persistent grid of at most the
// blocks resident at once; 1, one block per table row. Returns the previous value, or -1 (unchanged).
int set_block_per_row(int on);
// Later ring-only update launches (LAWA alone) through the TMA's bulk copies on GPUs that have it
// (compute capability 9 and later), for tuning: 0, the default, off; else the KB of each of its 4
// shared-memory stages, a power of two from 4 to 32. Returns the previous value, or -1 (unchanged).
int set_bulk_rings(int stage_kb);
// Later ring-only updates (LAWA alone) as the driver's copies, one cudaMemcpyBatchAsync of every
// parameter into each slot, for tuning: 0, the default, off (the kernels); 1 on; 2 on, asking the
// driver to prefer the copy engines (cudaMemcpyFlagPreferOverlapWithCompute). Returns the previous
// value, or -1 (unchanged) for any other number and in builds of CUDA before 13.0.
int set_driver_copies(int mode);
int driver_copies();  // the setting now
// Whether `stream` is being captured into a CUDA graph (or the query failed): there the ring-only
// updates take the kernels, which a graph holds, whatever set_driver_copies says.
bool capturing(void* stream);
// The copies of set_driver_copies: `n_params` parameters (`bytes[i]` bytes at `params[i]`) into each
// of `n_slots` ring slots, back to back (ring_copies.h), on `stream`; nullptr or CUDA's error.
const char* copy_rings(const void* const* params, const int64_t* bytes, int64_t n_params, void* const* slots,
                       int n_slots, int mode, int device, void* stream);
// nullptr where this build's kernels run on the current device, else CUDA's reason: a build for
// other architectures (no sm_ image for this GPU and no PTX it can compile) launches nothing there.
const char* kernels_missing();

}  // namespace cuda
}  // namespace fastavg
