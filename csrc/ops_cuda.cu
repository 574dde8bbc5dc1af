// The launchers of the CUDA kernels (cuda_kernels.cuh): plain CUDA over raw pointers, no torch
// headers, so every source compiles with nvcc anywhere; cuda_binding.cpp binds them to torch.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include "cuda_kernels.cuh"
#include "ops_cuda.h"
#include "ring_copies.h"

namespace fastavg {
namespace cuda {
namespace {

// A persistent grid, balanced (balanced_blocks): no more blocks than are resident at once. Each
// block walks every gridDim.x-th row, so a block that waits for a free slot runs its rows after the
// others' and stretches the launch: a fixed 8 blocks per SM put a quarter of the grid in a second
// wave when update_kernel<bf16, float> took 40 registers (6 blocks per SM; H200: EMA at 76% of copy
// while the 32-register fp32 kernel reached 100%).
template <typename Kernel>
unsigned blocks_for(Kernel kernel, int64_t work, int device, int threads, size_t shared_bytes = 0) {
  int sms = 0, per_sm = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, shared_bytes) != cudaSuccess) {
    cudaGetLastError();  // clear it, so the launch check reports only the launch
    per_sm = 1;
  }
  return static_cast<unsigned>(balanced_blocks(work, int64_t(sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1)));
}

// Update and swap launches' grid (set_block_per_row): the persistent grid above (false, the default),
// or one block per table row (true), which the GPU runs in waves as blocks finish, so that no block
// is left with work when the others are done. A question for the sweep and the benchmark: LAWA
// alone stays at 89-90% of copy (H200, runs 6 and 7). Over finer rows this grid also narrows the
// span of memory the active blocks touch at once (bench/NOTES.md, session of 14:30: every update
// that writes as much as it reads lands at 90-92%).
std::atomic<bool> block_per_row{false};
constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x's limit: the kernels' row loop covers any rows past it

template <typename Kernel>
unsigned grid_for(Kernel kernel, int64_t rows, int device, int threads, size_t shared_bytes = 0) {
  if (block_per_row.load()) return static_cast<unsigned>(std::min(rows, kMaxGridX));
  return blocks_for(kernel, rows, device, threads, shared_bytes);
}

// Threads per block of update and swap launches (set_block_threads): 128, as Triton's programs. At
// 256, every native bf16 update ran 1 to 3 points of copy under Triton's at the same work per thread
// (H200, run 6, benchmark: EMA 91.2% against 93.2% at 128, SWA 90.6% against 93.2%, swap 89.9%
// against 91.5%; same binary, through this hook).
std::atomic<int> block_threads{kDefaultThreads};

// Vectors per thread per pass of ring-only updates (LAWA alone) and swaps, as a multiple of one
// (set_unroll): 1, 2 or kMaxUnroll, default 2. With one 16-byte load in flight per thread
// they ran at 88.6% (LAWA) and 91.5% (swap) of copy at 128 threads, and at 89.7% and 92.2% with
// two (H200, run 6, bf16; at 256 threads two vectors were slower for LAWA: 85.8% against 89.0%).
std::atomic<int> unroll{kDefaultUnroll};

// Ring-only updates (LAWA alone) through bulk_ring_kernel, the TMA's copies, in stages of this many
// KB (set_bulk_rings), on GPUs of compute capability 9 and later where the stages fit (bulk_fits); 0
// (the default), and on other GPUs, update_kernel as for the rest.
std::atomic<int> bulk_stage_kb{0};

// Ring-only updates (LAWA alone) as the driver's copies (set_driver_copies): LAWA alone is a copy,
// and the copy bandwidth it is measured against is the driver's (torch's copy_ of a contiguous
// tensor is a cudaMemcpyAsync), while every fastavg kernel that writes as much as it reads stays at
// 90-92% of it (H200, runs 6 and 7). cudaMemcpyBatchAsync moves the parameters in one call, as the
// driver copies: a question for the sweep and the benchmark. kHasBatchCopies: whether this build has
// the call in CUDA 13's form (12.8 and 12.9 spell it another way, which nothing here compiles).
std::atomic<int> driver_copy_mode{0};
#if CUDART_VERSION >= 13000
constexpr bool kHasBatchCopies = true;
#else
constexpr bool kHasBatchCopies = false;
#endif

// The TMA is there from compute capability 9; the 4 stages must fit a block's shared memory (an RTX
// 50x0, 12.0, opts in to 99 KB of it, under four 32 KB stages): otherwise update_kernel runs.
bool bulk_fits(int device, size_t shared_bytes) {
  int major = 0, shared_optin = 0;
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9 &&
         cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess &&
         size_t(shared_optin) >= shared_bytes;
}

constexpr const char* kUnsupportedPair =
    "unsupported (parameter, average) dtype pair: averages must be the parameters' dtype, or float32 / float64 wider "
    "than it";

const char* last_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace

const char* update(UpdateArgs args, Dtype param, Dtype average, int device, void* stream) {
  if (args.rows == 0 || args.n_averages + args.n_rings == 0) return nullptr;
  finish_update_args(args);
  const unsigned stage_bytes = unsigned(bulk_stage_kb.load()) * 1024;
  const size_t shared_bytes = size_t(kBulkStages) * stage_bytes;
  if (args.n_averages == 0 && stage_bytes > 0 && bulk_fits(device, shared_bytes)) {
    dispatch(param, [&](auto p_tag) {
      using P = decltype(p_tag);
      with_count<1, kMaxRings>(args.n_rings, [&](auto nr) {
        auto kernel = bulk_ring_kernel<P, decltype(nr)::value>;
        // Past 48 KB of dynamic shared memory a kernel must opt in, before the occupancy query too.
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
        const int threads = block_threads.load();
        kernel<<<grid_for(kernel, args.rows, device, threads, shared_bytes), threads, shared_bytes,
                 static_cast<cudaStream_t>(stream)>>>(args, stage_bytes);
      });
    });
    return last_error();
  }
  const bool supported = dispatch_pair(param, average, [&](auto p_tag, auto a_tag) {
    with_update_kernel<decltype(p_tag), decltype(a_tag)>(args, unroll.load(), [&](auto kernel) {
      const int threads = block_threads.load();
      kernel<<<grid_for(kernel, args.rows, device, threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(args);
    });
  });
  return supported ? last_error() : kUnsupportedPair;
}

const char* swap(const int64_t* table, int64_t rows, void* backup, const void* source, int64_t stride, int64_t count,
                 Dtype param, Dtype average, int mode, bool vectors_ok, int device, void* stream) {
  if (rows == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const bool supported = dispatch_pair(param, average, [&](auto p_tag, auto a_tag) {
    using P = decltype(p_tag);
    using A = decltype(a_tag);
    P* b = static_cast<P*>(backup);
    auto launch = [&](auto kernel) {
      const int threads = block_threads.load();
      kernel<<<grid_for(kernel, rows, device, threads), threads, 0, s>>>(table, rows, b, source, stride, count,
                                                                          vectors_ok);
    };
    with_swap_kernel<P, A>(mode, unroll.load(), launch);
  });
  return supported ? last_error() : kUnsupportedPair;
}

const char* ring_mean(void* out, const void* ring, int64_t n, int64_t stride, int64_t count, Dtype out_dtype,
                      Dtype ring_dtype, int device, void* stream) {
  if (n == 0) return nullptr;
  // The ring holds parameters, `out` is in the averages' dtype: the pairs of update and swap.
  const bool supported = dispatch_pair(ring_dtype, out_dtype, [&](auto r_tag, auto o_tag) {
    using R = decltype(r_tag);
    using O = decltype(o_tag);
    const unsigned blocks = blocks_for(ring_mean_kernel<O, R>, (n + kThreads - 1) / kThreads, device, kThreads);
    ring_mean_kernel<O, R><<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<O*>(out), static_cast<const R*>(ring), n, stride, count);
  });
  return supported ? last_error() : kUnsupportedPair;
}

int set_block_threads(int threads) {
  if (threads < 32 || threads > kThreads || threads % 32 != 0) return -1;
  return block_threads.exchange(threads);
}

int set_unroll(int factor) {
  if (!valid_unroll(factor)) return -1;
  return unroll.exchange(factor);
}

int set_block_per_row(int on) {
  if (on != 0 && on != 1) return -1;
  return block_per_row.exchange(on == 1) ? 1 : 0;
}

int set_bulk_rings(int stage_kb) {
  if (stage_kb != 0 && (stage_kb < 4 || stage_kb * 1024 > int(kMaxBulkStageBytes) || (stage_kb & (stage_kb - 1)))) {
    return -1;
  }
  return bulk_stage_kb.exchange(stage_kb);
}

int set_driver_copies(int mode) {
  if (!kHasBatchCopies || mode < 0 || mode > 2) return -1;
  return driver_copy_mode.exchange(mode);
}

int driver_copies() { return driver_copy_mode.load(); }

bool capturing(void* stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &status) != cudaSuccess) {
    cudaGetLastError();  // not sticky; cleared so that no later launch check reports it
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

const char* copy_rings(const void* const* params, const int64_t* bytes, int64_t n_params, void* const* slots,
                       int n_slots, int mode, int device, void* stream) {
#if CUDART_VERSION >= 13000
  RingCopies copies = ring_copy_list(params, bytes, n_params, slots, n_slots);
  if (copies.sizes.empty()) return nullptr;
  cudaMemcpyAttributes attributes{};
  attributes.srcAccessOrder = cudaMemcpySrcAccessOrderStream;  // after the optimizer's step on the stream
  attributes.srcLocHint.type = cudaMemLocationTypeDevice;
  attributes.srcLocHint.id = device;
  attributes.dstLocHint = attributes.srcLocHint;
  attributes.flags = mode == 2 ? cudaMemcpyFlagPreferOverlapWithCompute : cudaMemcpyFlagDefault;
  size_t first_copy = 0;  // the attributes apply to every copy
  // The batch refuses the legacy default stream (torch's default: a null handle). The per-thread
  // default stream is a blocking stream: ordered after the legacy stream's earlier work, and the
  // legacy stream's later work after it, so the copies keep torch's stream order.
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (s == nullptr || s == cudaStreamLegacy) s = cudaStreamPerThread;
  const cudaError_t error = cudaMemcpyBatchAsync(copies.destinations.data(), copies.sources.data(),
                                                 copies.sizes.data(), copies.sizes.size(), &attributes, &first_copy, 1, s);
  if (error == cudaSuccess) return nullptr;
  cudaGetLastError();  // not sticky; cleared so that no later launch check reports it
  return cudaGetErrorString(error);
#else
  (void)params, (void)bytes, (void)n_params, (void)slots, (void)n_slots, (void)mode, (void)device, (void)stream;
  return "the driver's batch copies need a build of CUDA 13.0 or later";
#endif
}

const char* kernels_missing() {
  // Every kernel of this file is in one fat binary, built for the same architectures: one asks for all.
  cudaFuncAttributes attributes;
  const cudaError_t error = cudaFuncGetAttributes(&attributes, ring_mean_kernel<float, float>);
  if (error == cudaSuccess) return nullptr;
  cudaGetLastError();  // not sticky; cleared so that no later launch check reports it
  return cudaGetErrorString(error);
}

}  // namespace cuda
}  // namespace fastavg
