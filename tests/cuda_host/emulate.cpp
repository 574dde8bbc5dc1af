// fastavg's CUDA kernels (csrc/cuda_kernels.cuh) built by a host compiler and run on the CPU:
// every block of the grid, and every thread of a block, one after another. The kernels share
// nothing between threads (no shared memory, no __syncthreads), so this order gives what a GPU
// gives, and CI tests their logic on host memory with no GPU (tests/test_cuda_emulated.py).
//
// g++ -std=c++17 -shared -fPIC -I csrc -I $CUDA_HOME/include tests/cuda_host/emulate.cpp
#include <cstdint>

// CUDA's keywords a host compiler lacks (cuda_fp16.h defines __device__ and friends for it).
#define __launch_bounds__(...)
#define __grid_constant__
// The formulas as the device compiles them (fastavg_math.h spells one for each compiler).
#define FASTAVG_GPU_SPELLING

namespace {
struct Dim {
  unsigned x = 0;
};
Dim threadIdx, blockIdx, blockDim, gridDim;
}  // namespace

#include "cuda_kernels.cuh"

namespace {
using namespace fastavg::cuda;

// Runs `kernel` over a grid of `blocks` x `threads`, thread by thread.
template <typename Kernel>
void run(unsigned blocks, unsigned threads, Kernel&& kernel) {
  gridDim.x = blocks;
  blockDim.x = threads;
  for (unsigned b = 0; b < blocks; ++b) {
    blockIdx.x = b;
    for (unsigned t = 0; t < threads; ++t) {
      threadIdx.x = t;
      kernel();
    }
  }
}
}  // namespace

extern "C" {

// One launch of update_kernel, as ops_cuda.cu's update() makes it (at most 4 averages, 2 rings), of
// `threads` per block (set_block_threads) and `unroll` (set_unroll); 0 for a (parameter, average)
// dtype pair the build lacks, as update() refuses it.
int emulate_update(const int64_t* table, int64_t rows, void* const* averages, const double* weights, int n_averages,
                   void* const* rings, int n_rings, int vectors_ok, int param, int average, unsigned blocks,
                   unsigned threads, int unroll) {
  UpdateArgs args{};
  args.table = table;
  args.rows = rows;
  for (int k = 0; k < n_averages; ++k) {
    args.averages[k] = averages[k];
    args.weights[k] = weights[k];
  }
  args.n_averages = n_averages;
  for (int k = 0; k < n_rings; ++k) args.rings[k] = rings[k];
  args.n_rings = n_rings;
  args.vectors_ok = vectors_ok != 0;
  finish_update_args(args);
  return dispatch_pair(Dtype(param), Dtype(average), [&](auto p_tag, auto a_tag) {
    with_update_kernel<decltype(p_tag), decltype(a_tag)>(args, unroll, [&](auto kernel) {
      run(blocks, threads, [&] { kernel(args); });
    });
  });
}

// One launch of swap_kernel in `mode` (0: from an average, 1: from a ring, 2: restore) of `threads`
// per block and `unroll`; 0 for an unsupported dtype pair.
int emulate_swap(const int64_t* table, int64_t rows, void* backup, const void* source, int64_t stride, int64_t count,
                 int param, int average, int mode, int vectors_ok, unsigned blocks, unsigned threads, int unroll) {
  return dispatch_pair(Dtype(param), Dtype(average), [&](auto p_tag, auto a_tag) {
    using P = decltype(p_tag);
    using A = decltype(a_tag);
    P* b = static_cast<P*>(backup);
    with_swap_kernel<P, A>(mode, unroll, [&](auto kernel) {
      run(blocks, threads, [&] { kernel(table, rows, b, source, stride, count, vectors_ok != 0); });
    });
  });
}

int emulate_ring_mean(void* out, const void* ring, int64_t n, int64_t stride, int64_t count, int out_dtype,
                      int ring_dtype, unsigned blocks) {
  return dispatch_pair(Dtype(ring_dtype), Dtype(out_dtype), [&](auto r_tag, auto o_tag) {
    using R = decltype(r_tag);
    using O = decltype(o_tag);
    run(blocks, kThreads, [&] { ring_mean_kernel<O, R>(static_cast<O*>(out), static_cast<const R*>(ring), n, stride, count); });
  });
}

int64_t emulate_balanced_blocks(int64_t items, int64_t most) { return balanced_blocks(items, most); }

}  // extern "C"
