// fastavg's CUDA kernels (csrc/cuda_kernels.cuh) built by a host compiler and run on the CPU:
// every block of the grid, and every thread of a block, one after another. The kernels share
// nothing between threads (no __syncthreads; bulk_ring_kernel's shared memory is its thread 0's
// alone), so this order gives what a GPU gives, and CI tests their logic on host memory with no GPU
// (tests/test_cuda_emulated.py). The TMA's async copies run in a model (below).
//
// g++ -std=c++17 -shared -fPIC -I csrc -I $CUDA_HOME/include tests/cuda_host/emulate.cpp
#include <cstdint>

// CUDA's keywords a host compiler lacks (cuda_fp16.h defines __device__ and friends for it).
#define __launch_bounds__(...)
#define __grid_constant__
// The formulas as the device compiles them (fastavg_math.h spells one for each compiler).
#define FASTAVG_GPU_SPELLING
// bulk_ring_kernel's async copies: this file's model of them (cuda_kernels.cuh declares them).
#define FASTAVG_BULK_MODEL

namespace {
struct Dim {
  unsigned x = 0;
};
Dim threadIdx, blockIdx, blockDim, gridDim;
int64_t vector_bytes = 0;  // moved by vector accesses since emulate_take_vector_bytes last read it
int noted_unroll = 0;      // the Unroll of the update or swap kernel launched last, 0 after emulate_take_unroll
}  // namespace
#define FASTAVG_COUNT_VECTOR_BYTES(bytes) (vector_bytes += int64_t(bytes))
#define FASTAVG_NOTE_UNROLL(unroll) (noted_unroll = (unroll))

#include "cuda_kernels.cuh"
#include "ring_copies.h"

#include <cstring>
#include <deque>
#include <map>
#include <string>
#include <vector>

// The model of the TMA's copies. Each copy runs as late as a GPU may run it: a load when its
// barrier is waited on, a store when its group is waited for. A wait whose parity is not that of
// the barrier's phase in progress returns at once, as on a GPU, without the load. Recorded as
// errors: what a GPU may run in another order (a store from a stage whose load is in flight, a
// load into a stage a store has yet to read), a wait for a phase nothing completes (a GPU would
// hang), and copies left in flight when a block ends.
namespace {
struct Copy {
  void* to;
  const void* from;
  unsigned bytes;
};
struct Barrier {
  std::vector<Copy> loads;  // of the phase in progress
  unsigned long long completed = 0;
};
std::map<uint64_t*, Barrier> barriers;
std::vector<Copy> open_group;
std::deque<std::vector<Copy>> groups;  // committed, oldest first
std::string bulk_error;

void fail(const std::string& what) {
  if (bulk_error.empty()) bulk_error = what;
}

bool overlaps(const void* a, unsigned a_bytes, const void* b, unsigned b_bytes) {
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return x < y + b_bytes && y < x + a_bytes;
}

// Whether a committed or open store has yet to read [stage, stage + bytes).
bool unread(const void* stage, unsigned bytes) {
  for (const Copy& c : open_group) {
    if (overlaps(c.from, c.bytes, stage, bytes)) return true;
  }
  for (const auto& group : groups) {
    for (const Copy& c : group) {
      if (overlaps(c.from, c.bytes, stage, bytes)) return true;
    }
  }
  return false;
}

// Whether a load in flight writes into [stage, stage + bytes).
bool landing(const void* stage, unsigned bytes) {
  for (const auto& [address, barrier] : barriers) {
    for (const Copy& c : barrier.loads) {
      if (overlaps(c.to, c.bytes, stage, bytes)) return true;
    }
  }
  return false;
}

void run_group(const std::vector<Copy>& group) {
  for (const Copy& c : group) std::memcpy(c.to, c.from, c.bytes);
}

// After each block: nothing may be left in flight.
void end_block() {
  for (auto& [address, barrier] : barriers) {
    if (!barrier.loads.empty()) fail("a block ended with a load in flight");
  }
  if (!open_group.empty()) fail("a block ended with stores never committed");
  if (!groups.empty()) fail("a block ended with stores in flight");
  barriers.clear();
  open_group.clear();
  groups.clear();
}
}  // namespace

namespace fastavg {
namespace cuda {
void bulk_init(uint64_t* barrier) { barriers[barrier] = Barrier{}; }

void bulk_load(void* stage, const void* source, unsigned bytes, uint64_t* barrier) {
  auto found = barriers.find(barrier);
  if (found == barriers.end()) return fail("a load on a barrier never initialised");
  if (!found->second.loads.empty()) fail("two loads on one barrier phase");
  if (bytes == 0 || bytes % 16 || reinterpret_cast<uintptr_t>(source) % 16 || reinterpret_cast<uintptr_t>(stage) % 16) {
    fail("a load that is empty, not 16-byte aligned or not a multiple of 16 bytes");
  }
  if (unread(stage, bytes)) fail("a load into a stage a store has yet to read");
  found->second.loads.push_back({stage, source, bytes});
}

void bulk_wait(uint64_t* barrier, unsigned parity) {
  auto found = barriers.find(barrier);
  if (found == barriers.end()) return fail("a wait on a barrier never initialised");
  Barrier& b = found->second;
  if ((b.completed & 1) != parity) return;  // that parity's phase is the one before: complete
  if (b.loads.empty()) return fail("a wait for a phase no load completes (a GPU would hang)");
  run_group(b.loads);
  b.loads.clear();
  ++b.completed;
}

void bulk_store(void* target, const void* stage, unsigned bytes) {
  if (bytes == 0 || bytes % 16 || reinterpret_cast<uintptr_t>(target) % 16 || reinterpret_cast<uintptr_t>(stage) % 16) {
    fail("a store that is empty, not 16-byte aligned or not a multiple of 16 bytes");
  }
  if (landing(stage, bytes)) fail("a store from a stage whose load is in flight");
  open_group.push_back({target, stage, bytes});
}

void bulk_commit() {
  groups.push_back(open_group);
  open_group.clear();
}

void bulk_wait_read_all_but_newest() {
  while (groups.size() > 1) {
    run_group(groups.front());
    groups.pop_front();
  }
}

void bulk_wait_all() {
  while (!groups.empty()) {
    run_group(groups.front());
    groups.pop_front();
  }
}
}  // namespace cuda
}  // namespace fastavg

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
    end_block();
  }
}
}  // namespace

extern "C" {

// One launch of update_kernel, as ops_cuda.cu's update() makes it (at most 4 averages, 2 rings), of
// `threads` per block (set_block_threads) and `unroll` (set_unroll), ring-only updates through
// bulk_ring_kernel in stages of `bulk_kb` KB if not 0 (set_bulk_rings); 0 for a (parameter, average)
// dtype pair the build lacks, as update() refuses it; -1 where the model of the TMA's copies found an
// error (emulate_bulk_error).
int emulate_update(const int64_t* table, int64_t rows, void* const* averages, const double* weights, int n_averages,
                   void* const* rings, int n_rings, int vectors_ok, int param, int average, unsigned blocks,
                   unsigned threads, int unroll, int bulk_kb) {
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
  if (bulk_kb > 0 && n_averages == 0) {
    bulk_error.clear();
    const unsigned stage_bytes = unsigned(bulk_kb) * 1024;
    if (stage_bytes > kMaxBulkStageBytes) fail("stages larger than the kernel's buffer");
    dispatch(Dtype(param), [&](auto p_tag) {
      with_count<1, kMaxRings>(n_rings, [&](auto nr) {
        run(blocks, threads, [&] { bulk_ring_kernel<decltype(p_tag), decltype(nr)::value>(args, stage_bytes); });
      });
    });
    return bulk_error.empty() ? 1 : -1;
  }
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

// LAWA alone as ops_cuda.cu's copy_rings gives it to the driver (set_driver_copies): the same list
// of copies (ring_copies.h), each a memcpy.
void emulate_driver_copies(const void* const* params, const int64_t* bytes, int64_t n_params, void* const* slots,
                           int n_slots) {
  const RingCopies copies = ring_copy_list(params, bytes, n_params, slots, n_slots);
  for (size_t i = 0; i < copies.sizes.size(); ++i) {
    std::memcpy(copies.destinations[i], copies.sources[i], copies.sizes[i]);
  }
}

int64_t emulate_balanced_blocks(int64_t items, int64_t most) { return balanced_blocks(items, most); }

const char* emulate_bulk_error() { return bulk_error.c_str(); }

// The bytes moved by vector loads and stores since the last call (FASTAVG_COUNT_VECTOR_BYTES).
int64_t emulate_take_vector_bytes() {
  const int64_t bytes = vector_bytes;
  vector_bytes = 0;
  return bytes;
}

// The Unroll instance of the update or swap kernel launched since the last call (FASTAVG_NOTE_UNROLL);
// 0 if none ran (bulk_ring_kernel, ring_mean_kernel and the driver's copies note nothing).
int emulate_take_unroll() {
  const int unroll = noted_unroll;
  noted_unroll = 0;
  return unroll;
}

}  // extern "C"
