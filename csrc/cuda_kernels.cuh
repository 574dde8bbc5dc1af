// The CUDA kernels of fastavg's fused ops: device code over raw pointers, no torch headers.
// They sit apart from their launchers (ops_cuda.cu) so that a host compiler builds them too:
// tests/cuda_host/emulate.cpp runs them on the CPU, block by block and thread by thread, and CI
// checks their arithmetic, table walk and vector/scalar paths with no GPU.
//
// One launch per group walks the table of (address, flat offset, length, aligned) rows, each block
// every gridDim.x-th row; aligned rows move 16-byte vectors, the rest (misaligned views, tails) go
// element by element.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "fastavg_math.h"
#include "ops_cuda.h"

namespace fastavg {
namespace cuda {

// Threads per block: the most any launch uses (launch bounds: registers are allocated for it), and
// the default of update and swap launches (ops_cuda.cu says why 128); set_block_threads takes any
// multiple of 32 up to kThreads, which bench/kernel_sweep.py and fastavg-bench --native-launch time.
constexpr int kThreads = 256;
constexpr int kDefaultThreads = 128;

// Conversions as torch rounds them: 16-bit types through float, to nearest even.
template <typename T>
struct Num;
template <>
struct Num<__half> {
  static __device__ __forceinline__ float up(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half down(double x) { return __float2half_rn(static_cast<float>(x)); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float up(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 down(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }
};
template <>
struct Num<float> {
  static __device__ __forceinline__ float up(float x) { return x; }
  static __device__ __forceinline__ float down(double x) { return static_cast<float>(x); }
};
template <>
struct Num<double> {
  static __device__ __forceinline__ double up(double x) { return x; }
  static __device__ __forceinline__ double down(double x) { return x; }
};

// V elements moved as one aligned access of up to 16 bytes (or, for wider types, several).
template <typename T, int V>
struct alignas(sizeof(T) * V < 16 ? sizeof(T) * V : 16) Vec {
  T v[V];
};

// Elements per access: 16 bytes of the WIDEST type a kernel touches, so that every warp-wide load
// and store covers one contiguous span (bf16 parameters beside fp32 averages: 8-byte parameter
// loads, 16-byte average loads and stores). Sized by the parameters instead (8 elements), each
// thread's two 16-byte average accesses were 32 bytes apart: every warp-wide access touched half of
// each of 32 sectors (H200, run 3: the bf16 EMA at 86% of copy, Triton with this layout at 93%).
template <typename P, typename A>
constexpr int kAccessWidth = 16 / (sizeof(A) > sizeof(P) ? sizeof(A) : sizeof(P));

// Vectors per thread per pass: about 8 elements, as the Triton kernels' best measured blocks (1,024
// elements over 128 threads for EMA and LAWA; 512 with two or more averages, whose registers
// would otherwise cost occupancy). They are a block apart, all loaded before any is stored.
template <int V, int NA>
constexpr int kVectorsPerPass = NA >= 2 || V >= 8 ? 1 : 8 / V;

// A multiple of those vectors (set_unroll): 1, 2 or kMaxUnroll. Unroll 2, the default, puts two
// 16-byte loads in flight per thread where one would have one (LAWA alone, swap back: H200, run 6,
// LAWA 88.6% -> 89.7% of copy at 128 threads). 4 is there for the sweep: LAWA alone is the one
// update still under 90%. Compiled for the ring-only updates and the vector swaps only; the other
// kernels have one instance and ignore it.
constexpr int kDefaultUnroll = 2;
constexpr int kMaxUnroll = 4;
constexpr bool valid_unroll(int unroll) { return unroll == 1 || unroll == 2 || unroll == kMaxUnroll; }

template <typename A>
using Math = typename std::conditional<std::is_same<A, double>::value, double, float>::type;

// The weight of average k in the math type: read from the kernel's parameter space at each use
// rather than copied into registers (ptxas -v, sm_90: that took the run-time-count kernel for
// bf16 -> float from 40 registers to 32; registers decide how many blocks an SM holds).
template <typename M>
__device__ __forceinline__ M weight(const UpdateArgs& args, int k) {
  if constexpr (std::is_same<M, double>::value) {
    return args.weights[k];
  } else {
    return args.weights32[k];
  }
}

// The bytes each vector access moves, for tests/cuda_host/emulate.cpp: it counts them to check that
// aligned rows take the vector loops and misaligned ones do not. Element by element gives the same
// values, so nothing else in the host build would see a kernel that never vectorised, or one that
// vectorised a misaligned row (a fault on a GPU, not on an x86 host). Nothing in the CUDA build.
#ifndef FASTAVG_COUNT_VECTOR_BYTES
#define FASTAVG_COUNT_VECTOR_BYTES(bytes)
#endif
// And the Unroll instance each update and swap kernel launch runs, for the same file: a launcher
// that ignored set_unroll gives the same values, and the benchmark's "x4" rows would time x1.
#ifndef FASTAVG_NOTE_UNROLL
#define FASTAVG_NOTE_UNROLL(unroll)
#endif

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* base, int64_t i) {
  FASTAVG_COUNT_VECTOR_BYTES(sizeof(T) * V);
  return *reinterpret_cast<const Vec<T, V>*>(base + i * V);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* base, int64_t i, const Vec<T, V>& value) {
  FASTAVG_COUNT_VECTOR_BYTES(sizeof(T) * V);
  *reinterpret_cast<Vec<T, V>*>(base + i * V) = value;
}

// Loads and stores through a TABLE address (a parameter). The compiler takes pointers read from
// memory as generic, so a plain access compiles to LD / ST (sm_90 SASS), not LDG / STG as for the
// kernel-argument pointers; and the intrinsics that say "global" add a cache operator (__ldca:
// LDG.STRONG.SM; __ldg: the read-only path, wrong where the kernel writes p). So: plain weak
// ld.global / st.global, volatile so the load and store of one p element keep their order.
template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_global(const T* base, int64_t i) {
#if defined(__CUDA_ARCH__)
  const T* address = base + i * V;
  Vec<T, V> out;
  unsigned* w = reinterpret_cast<unsigned*>(&out);
  static_assert(sizeof(out) == 4 || sizeof(out) == 8 || sizeof(out) == 16, "4, 8 or 16 bytes");
  if constexpr (sizeof(out) == 16) {
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(address));
  } else if constexpr (sizeof(out) == 8) {
    asm volatile("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "l"(address));
  } else {
    asm volatile("ld.global.u32 %0, [%1];" : "=r"(w[0]) : "l"(address));
  }
  return out;
#else
  return load_vec<T, V>(base, i);
#endif
}

template <typename T, int V>
__device__ __forceinline__ void store_global(T* base, int64_t i, const Vec<T, V>& value) {
#if defined(__CUDA_ARCH__)
  T* address = base + i * V;
  const unsigned* w = reinterpret_cast<const unsigned*>(&value);
  static_assert(sizeof(value) == 4 || sizeof(value) == 8 || sizeof(value) == 16, "4, 8 or 16 bytes");
  if constexpr (sizeof(value) == 16) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(address), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
  } else if constexpr (sizeof(value) == 8) {
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(address), "r"(w[0]), "r"(w[1]) : "memory");
  } else {
    asm volatile("st.global.u32 [%0], %1;" ::"l"(address), "r"(w[0]) : "memory");
  }
#else
  store_vec<T, V>(base, i, value);
#endif
}

// A row's aligned part: how many whole V-vectors its vector loop moves (0 for a misaligned row).
template <int V>
__device__ __forceinline__ int64_t row_vectors(const int64_t* row, bool vectors_ok) {
  return (row[3] != 0 && vectors_ok) ? row[2] / V : 0;
}

// NA averages and NR rings due, fixed at compile time (one kernel per combination: the launcher
// picks it), so every loop below unrolls and each thread issues all its loads before any store.
template <typename P, typename A, int NA, int NR, int Unroll = 1>
__global__ void __launch_bounds__(kThreads) update_kernel(const __grid_constant__ UpdateArgs args) {
  static_assert(NA <= kMaxAverages && NR <= kMaxRings && NA + NR > 0, "one launch takes 1 to 4 + 2 buffers");
  using M = Math<A>;
  constexpr int V = NA > 0 ? kAccessWidth<P, A> : kAccessWidth<P, P>;
  constexpr int U = kVectorsPerPass<V, NA> * Unroll;
  FASTAVG_NOTE_UNROLL(Unroll);
  for (int64_t r = blockIdx.x; r < args.rows; r += gridDim.x) {
    const int64_t* row = args.table + 4 * r;
    const P* p = reinterpret_cast<const P*>(row[0]);
    const int64_t offset = row[1], length = row[2];
    const int64_t vectors = row_vectors<V>(row, args.vectors_ok);
    for (int64_t first = threadIdx.x; first < vectors; first += int64_t(blockDim.x) * U) {
      Vec<P, V> pv[U];
      Vec<A, V> av[U][NA > 0 ? NA : 1];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = first + int64_t(u) * blockDim.x;
        if (i >= vectors) break;
        pv[u] = load_global<P, V>(p, i);
#pragma unroll
        for (int k = 0; k < NA; ++k) av[u][k] = load_vec<A, V>(static_cast<const A*>(args.averages[k]) + offset, i);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = first + int64_t(u) * blockDim.x;
        if (i >= vectors) break;
#pragma unroll
        for (int k = 0; k < NR; ++k) store_vec<P, V>(static_cast<P*>(args.rings[k]) + offset, i, pv[u]);
        if constexpr (NA > 0) {
          M pm[V];
#pragma unroll
          for (int e = 0; e < V; ++e) pm[e] = static_cast<M>(Num<P>::up(pv[u].v[e]));
#pragma unroll
          for (int k = 0; k < NA; ++k) {
#pragma unroll
            for (int e = 0; e < V; ++e) {
              av[u][k].v[e] = Num<A>::down(
                  next_average(static_cast<M>(Num<A>::up(av[u][k].v[e])), pm[e], weight<M>(args, k), args.copies[k]));
            }
            store_vec<A, V>(static_cast<A*>(args.averages[k]) + offset, i, av[u][k]);
          }
        }
      }
    }
    for (int64_t j = vectors * V + threadIdx.x; j < length; j += blockDim.x) {
      const P pv = p[j];
#pragma unroll
      for (int k = 0; k < NR; ++k) static_cast<P*>(args.rings[k])[offset + j] = pv;
      const M pm = static_cast<M>(Num<P>::up(pv));
#pragma unroll
      for (int k = 0; k < NA; ++k) {
        A* a = static_cast<A*>(args.averages[k]) + offset + j;
        *a = Num<A>::down(next_average(static_cast<M>(Num<A>::up(*a)), pm, weight<M>(args, k), args.copies[k]));
      }
    }
  }
}

// ---- LAWA alone through the Tensor Memory Accelerator (sm_90): a question for the sweep ----
//
// Every update that writes as much as it reads runs at 90-92% of torch's copy_ on the H200, and
// LAWA alone (a copy of the parameters into a ring slot) at 89.8%; the copy itself is the driver's.
// bulk_ring_kernel copies with the TMA instead of 16-byte loads and stores: one thread per block
// moves each aligned row part in stages of `stage_bytes`, global -> shared -> global
// (cp.async.bulk), kBulkStages - 1 loads in flight while the last stage is stored. The other
// threads copy what the TMA cannot (misaligned rows, tails) element by element. Chosen only by
// set_bulk_rings (ops_cuda.cu), which also sets the stage size, for ring-only updates on sm_90 and
// later. The stages are dynamic shared memory: 8 KB stages take 32 KB a block (7 blocks per SM),
// 32 KB stages 128 KB (one): fewer, longer copies in flight, for the sweep to compare.
constexpr int kBulkStages = 4;
constexpr unsigned kMaxBulkStageBytes = 32768;

// The async copies, one thread issuing them. On sm_90 and later, the TMA's PTX. Where
// FASTAVG_BULK_MODEL is defined (tests/cuda_host/emulate.cpp), a host model that runs each copy
// as late as a GPU may, and fails a wait that would hang or return early.
#if defined(FASTAVG_BULK_MODEL)
void bulk_init(uint64_t* barrier);
void bulk_load(void* stage, const void* source, unsigned bytes, uint64_t* barrier);
void bulk_wait(uint64_t* barrier, unsigned parity);
void bulk_store(void* target, const void* stage, unsigned bytes);
void bulk_commit();
void bulk_wait_read_all_but_newest();
void bulk_wait_all();
#else
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FASTAVG_TMA 1
__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#endif
// A barrier for one stage: one arrival (the issuing thread's) and the bytes of its load per phase.
__device__ __forceinline__ void bulk_init(uint64_t* barrier) {
#if defined(FASTAVG_TMA)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(barrier)) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // visible to the TMA unit
#endif
}
// `bytes` from global `source` into `stage`; the barrier's phase completes when they have landed.
__device__ __forceinline__ void bulk_load(void* stage, const void* source, unsigned bytes, uint64_t* barrier) {
#if defined(FASTAVG_TMA)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(barrier)), "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   shared_address(stage)),
               "l"(source), "r"(bytes), "r"(shared_address(barrier))
               : "memory");
#endif
}
// Until the barrier's phase of this parity has completed: the stage's load has landed.
__device__ __forceinline__ void bulk_wait(uint64_t* barrier, unsigned parity) {
#if defined(FASTAVG_TMA)
  unsigned done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(shared_address(barrier)), "r"(parity)
        : "memory");
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the landed stage, to the store that reads it
#endif
}
// `bytes` of `stage` to global `target`, in the open group (bulk_commit closes it).
__device__ __forceinline__ void bulk_store(void* target, const void* stage, unsigned bytes) {
#if defined(FASTAVG_TMA)
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(target), "r"(shared_address(stage)),
               "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void bulk_commit() {
#if defined(FASTAVG_TMA)
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
#endif
}
// Until every committed group but the newest has read its stages: those stages may be refilled.
__device__ __forceinline__ void bulk_wait_read_all_but_newest() {
#if defined(FASTAVG_TMA)
  asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
#endif
}
// Until every committed group is done: a block may not exit while the TMA reads its shared memory.
__device__ __forceinline__ void bulk_wait_all() {
#if defined(FASTAVG_TMA)
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
#endif
}
#endif

// A block's rows (every gridDim.x-th) as chunks of at most `stage_bytes` of their aligned parts:
// where each comes from (a parameter) and goes (a byte offset into each ring slot).
template <typename P>
struct BulkChunks {
  static constexpr int V = kAccessWidth<P, P>;
  const UpdateArgs& args;
  unsigned stage_bytes;
  int64_t row;
  int64_t done;  // bytes of `row` already issued

  __device__ bool next(const char*& source, int64_t& target, unsigned& bytes) {
    for (; row < args.rows; row += gridDim.x, done = 0) {
      const int64_t* entry = args.table + 4 * row;
      const int64_t aligned_bytes = row_vectors<V>(entry, args.vectors_ok) * V * int64_t(sizeof(P));
      if (done < aligned_bytes) {
        const int64_t left = aligned_bytes - done;
        bytes = static_cast<unsigned>(left < stage_bytes ? left : stage_bytes);
        source = reinterpret_cast<const char*>(entry[0]) + done;
        target = entry[1] * int64_t(sizeof(P)) + done;
        done += bytes;
        return true;
      }
    }
    return false;
  }
};

// One thread's pipeline: chunk c lands in stage c % kBulkStages (the barrier's (c / kBulkStages)-th
// phase), is stored to every ring, and after the next chunk's store is issued, its stage is refilled
// with chunk c + kBulkStages once its own store has read it.
template <typename P, int NR>
__device__ __forceinline__ void bulk_copy_rows(const UpdateArgs& args, unsigned char* stages, unsigned stage_bytes,
                                               uint64_t* full) {
  for (int s = 0; s < kBulkStages; ++s) bulk_init(&full[s]);
  auto stage = [&](int s) { return stages + size_t(s) * stage_bytes; };
  BulkChunks<P> chunks{args, stage_bytes, blockIdx.x, 0};
  int64_t target[kBulkStages];
  unsigned bytes[kBulkStages];
  int64_t issued = 0;
  auto issue = [&]() {
    const char* source;
    int64_t to;
    unsigned n;
    if (!chunks.next(source, to, n)) return false;
    const int s = static_cast<int>(issued % kBulkStages);
    target[s] = to;
    bytes[s] = n;
    bulk_load(stage(s), source, n, &full[s]);
    ++issued;
    return true;
  };
  while (issued < kBulkStages && issue()) {
  }
  for (int64_t c = 0; c < issued; ++c) {
    const int s = static_cast<int>(c % kBulkStages);
    bulk_wait(&full[s], static_cast<unsigned>((c / kBulkStages) & 1));
#pragma unroll
    for (int k = 0; k < NR; ++k) bulk_store(static_cast<char*>(args.rings[k]) + target[s], stage(s), bytes[s]);
    bulk_commit();
    if (c > 0) {  // chunk c - 1's stores have read its stage: refill it
      bulk_wait_read_all_but_newest();
      issue();
    }
  }
  bulk_wait_all();
}

// NR rings due and nothing else (LAWA alone), each slot = the parameters, through kBulkStages stages
// of `stage_bytes` (a multiple of 16 up to kMaxBulkStageBytes) of dynamic shared memory. A build run
// on a GPU before sm_90 (no TMA) copies every element on the scalar path instead.
template <typename P, int NR>
__global__ void __launch_bounds__(kThreads) bulk_ring_kernel(const __grid_constant__ UpdateArgs args,
                                                             unsigned stage_bytes) {
  static_assert(NR >= 1 && NR <= kMaxRings, "1 or 2 rings");
  constexpr int V = kAccessWidth<P, P>;
#if defined(__CUDA_ARCH__) && !defined(FASTAVG_TMA)
  constexpr bool kBulk = false;
#else
  constexpr bool kBulk = true;
#endif
  if constexpr (kBulk) {
#if defined(__CUDA_ARCH__)
    extern __shared__ __align__(128) unsigned char bulk_stages[];
#else  // the host emulator: one thread at a time, so one buffer serves every block
    alignas(128) static unsigned char bulk_stages[kBulkStages * kMaxBulkStageBytes];
#endif
    __shared__ uint64_t full[kBulkStages];
    if (threadIdx.x == 0) bulk_copy_rows<P, NR>(args, bulk_stages, stage_bytes, full);
  }
  for (int64_t r = blockIdx.x; r < args.rows; r += gridDim.x) {
    const int64_t* row = args.table + 4 * r;
    const P* p = reinterpret_cast<const P*>(row[0]);
    const int64_t offset = row[1], length = row[2];
    const int64_t first = kBulk ? row_vectors<V>(row, args.vectors_ok) * V : 0;
    for (int64_t j = first + threadIdx.x; j < length; j += blockDim.x) {
      const P pv = p[j];
#pragma unroll
      for (int k = 0; k < NR; ++k) static_cast<P*>(args.rings[k])[offset + j] = pv;
    }
  }
}

// The value mode 0 / 1 swaps in for one element, as P: the average, or the ring mean rounded to A.
template <typename P, typename A, int Mode>
__device__ __forceinline__ P swapped_in(const void* source, int64_t flat, int64_t stride, int64_t count) {
  if (Mode == 1) {
    const P* ring = static_cast<const P*>(source) + flat;
    double total = 0;
    for (int64_t k = 0; k < count; ++k) total += static_cast<double>(Num<P>::up(ring[k * stride]));
    return Num<P>::down(static_cast<double>(Num<A>::up(Num<A>::down(mean(total, count)))));
  }
  return Num<P>::down(static_cast<double>(Num<A>::up(static_cast<const A*>(source)[flat])));
}

// Mode 0: p = the average (read as vectors of kAccessWidth); 1: p = the ring mean (its elements
// read one by one, count per element: averaged() only); 2: p = backup (restore). Vectors per pass
// and their order as in update_kernel: every load of a pass before its stores.
template <typename P, typename A, int Mode, int Unroll = 1>
__global__ void __launch_bounds__(kThreads) swap_kernel(const int64_t* table, int64_t rows, P* backup,
                                                        const void* source, int64_t stride, int64_t count,
                                                        bool vectors_ok) {
  constexpr int V = Mode == 0 ? kAccessWidth<P, A> : kAccessWidth<P, P>;
  constexpr int U = kVectorsPerPass<V, 1> * Unroll;
  FASTAVG_NOTE_UNROLL(Unroll);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t* row = table + 4 * r;
    P* p = reinterpret_cast<P*>(row[0]);
    const int64_t offset = row[1], length = row[2];
    const int64_t vectors = row_vectors<V>(row, vectors_ok);
    for (int64_t first = threadIdx.x; first < vectors; first += int64_t(blockDim.x) * U) {
      Vec<P, V> old[U], out[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = first + int64_t(u) * blockDim.x;
        if (i >= vectors) break;
        if constexpr (Mode == 2) {
          out[u] = load_vec<P, V>(backup + offset, i);
        } else {
          old[u] = load_global<P, V>(p, i);
          if constexpr (Mode == 0) {
            const Vec<A, V> average = load_vec<A, V>(static_cast<const A*>(source) + offset, i);
#pragma unroll
            for (int e = 0; e < V; ++e) out[u].v[e] = Num<P>::down(static_cast<double>(Num<A>::up(average.v[e])));
          } else {
#pragma unroll
            for (int e = 0; e < V; ++e) out[u].v[e] = swapped_in<P, A, Mode>(source, offset + i * V + e, stride, count);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = first + int64_t(u) * blockDim.x;
        if (i >= vectors) break;
        if constexpr (Mode != 2) store_vec<P, V>(backup + offset, i, old[u]);
        store_global<P, V>(p, i, out[u]);
      }
    }
    for (int64_t j = vectors * V + threadIdx.x; j < length; j += blockDim.x) {
      if (Mode == 2) {
        p[j] = backup[offset + j];
      } else {
        backup[offset + j] = p[j];
        p[j] = swapped_in<P, A, Mode>(source, offset + j, stride, count);
      }
    }
  }
}

// Export only (averaged_params), not per step: element by element.
template <typename O, typename R>
__global__ void __launch_bounds__(kThreads) ring_mean_kernel(O* out, const R* ring, int64_t n, int64_t stride,
                                                             int64_t count) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) {
    double total = 0;
    for (int64_t k = 0; k < count; ++k) total += static_cast<double>(Num<R>::up(ring[k * stride + j]));
    out[j] = Num<O>::down(mean(total, count));
  }
}

// Every dtype code as its CUDA type, for a generic lambda.
template <typename F>
void dispatch(Dtype dtype, F&& f) {
  switch (dtype) {
    case kHalf: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    case kFloat: f(float{}); break;
    case kDouble: f(double{}); break;
  }
}

// Whether averages of type A hold parameters of type P exactly, as fastavg requires (the same
// type, or float / double wider than P): the only pairs compiled.
template <typename P, typename A>
constexpr bool holds() {
  return std::is_same<A, P>::value || (std::is_floating_point<A>::value && sizeof(A) > sizeof(P));
}

// f(P{}, A{}) for a supported (parameter, average) pair; false for any other pair.
template <typename F>
bool dispatch_pair(Dtype param, Dtype average, F&& f) {
  bool supported = false;
  dispatch(param, [&](auto p_tag) {
    using P = decltype(p_tag);  // named here: in the inner lambda, decltype(p_tag) can be a reference (g++)
    dispatch(average, [&](auto a_tag) {
      using A = decltype(a_tag);
      if constexpr (holds<P, A>()) {
        supported = true;
        f(P{}, A{});
      }
    });
  });
  return supported;
}

// f(std::integral_constant<int, n>{}) for a run-time n in [First, Last]: a compile-time count.
template <int First, int Last, typename F>
void with_count(int n, F&& f) {
  if constexpr (First <= Last) {
    if (n == First) {
      f(std::integral_constant<int, First>{});
    } else {
      with_count<First + 1, Last>(n, f);
    }
  }
}

// The update_kernel instance for the averages and rings in `args`: f(kernel). `unroll` (1, 2 or 4:
// set_unroll) applies to ring-only updates; the others have one instance.
template <typename P, typename A, typename F>
void with_update_kernel(const UpdateArgs& args, int unroll, F&& f) {
  with_count<0, kMaxAverages>(args.n_averages, [&](auto na) {
    constexpr int NA = decltype(na)::value;  // named here, not in the inner lambda (see dispatch_pair)
    with_count<0, kMaxRings>(args.n_rings, [&](auto nr) {
      constexpr int NR = decltype(nr)::value;
      if constexpr (NA == 0 && NR > 0) {
        if (unroll == kMaxUnroll) return f(update_kernel<P, A, NA, NR, kMaxUnroll>);
        if (unroll == 2) return f(update_kernel<P, A, NA, NR, 2>);
      }
      if constexpr (NA + NR > 0) f(update_kernel<P, A, NA, NR>);
    });
  });
}

// The swap_kernel instance for `mode` (0: from an average, 1: from a ring, 2: restore): f(kernel).
// `unroll` applies to modes 0 and 2 (mode 1 reads its ring element by element).
template <typename P, typename A, int Mode, typename F>
void with_swap_unroll(int unroll, F&& f) {
  if (unroll == kMaxUnroll) return f(swap_kernel<P, A, Mode, kMaxUnroll>);
  if (unroll == 2) return f(swap_kernel<P, A, Mode, 2>);
  f(swap_kernel<P, A, Mode>);
}

template <typename P, typename A, typename F>
void with_swap_kernel(int mode, int unroll, F&& f) {
  if (mode == 0) with_swap_unroll<P, A, 0>(unroll, f);
  if (mode == 1) f(swap_kernel<P, A, 1>);
  if (mode == 2) with_swap_unroll<P, A, 2>(unroll, f);
}

// What update_kernel reads besides the caller's arguments: each weight rounded for float math,
// and which weights are 1 (a first update: a copy).
inline void finish_update_args(UpdateArgs& args) {
  for (int k = 0; k < kMaxAverages; ++k) {
    args.weights32[k] = static_cast<float>(args.weights[k]);
    args.copies[k] = args.weights[k] == 1.0;
  }
}

// Blocks for `items` rows walked with a stride of the grid, at most `most` resident at once, each
// walking an equal share: 1,995 rows over 1,056 slots take 998 blocks of 2 rows, not 1,056 of which
// 117 finish after one row.
inline int64_t balanced_blocks(int64_t items, int64_t most) {
  items = items > 1 ? items : 1;
  most = most > 1 ? most : 1;
  const int64_t rounds = (items + most - 1) / most;
  return (items + rounds - 1) / rounds;
}

}  // namespace cuda
}  // namespace fastavg
