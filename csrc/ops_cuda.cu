// CUDA kernels of fastavg's fused ops: plain CUDA over raw pointers (no torch headers), so every
// source compiles with nvcc anywhere; cuda_binding.cpp binds them to torch. One launch per group walks
// the table of (address, flat offset, length, aligned) rows with a grid of the blocks resident at once;
// aligned rows move 16-byte vectors, the rest (misaligned views, tails) go element by element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "fastavg_math.h"
#include "ops_cuda.h"

namespace fastavg {
namespace cuda {
namespace {

constexpr int kThreads = 256;

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

// V elements moved as one (or, for wider types, several) aligned 16-byte access.
template <typename T, int V>
struct alignas(16) Vec {
  T v[V];
};

template <typename A>
using Math = typename std::conditional<std::is_same<A, double>::value, double, float>::type;

// The weight of average k in the math type: read from the kernel's parameter space at each use
// rather than held in registers (ptxas -v: 40 -> 32 registers for bf16 -> float, so 8 blocks of
// 256 threads fit an SM).
template <typename M>
__device__ __forceinline__ M weight(const UpdateArgs& args, int k) {
  if constexpr (std::is_same<M, double>::value) {
    return args.weights[k];
  } else {
    return args.weights32[k];
  }
}

template <typename P, typename A>
__global__ void __launch_bounds__(kThreads) update_kernel(const __grid_constant__ UpdateArgs args) {
  using M = Math<A>;
  constexpr int V = 16 / sizeof(P);
  for (int64_t r = blockIdx.x; r < args.rows; r += gridDim.x) {
    const int64_t* row = args.table + 4 * r;
    const P* p = reinterpret_cast<const P*>(row[0]);
    const int64_t offset = row[1], length = row[2];
    const int64_t vec_end = (row[3] != 0 && args.vectors_ok) ? length / V * V : 0;
    for (int64_t j = int64_t(threadIdx.x) * V; j < vec_end; j += int64_t(blockDim.x) * V) {
      const Vec<P, V> pv = *reinterpret_cast<const Vec<P, V>*>(p + j);
#pragma unroll
      for (int k = 0; k < kMaxRings; ++k) {
        if (k < args.n_rings) *reinterpret_cast<Vec<P, V>*>(static_cast<P*>(args.rings[k]) + offset + j) = pv;
      }
      M pm[V];
#pragma unroll
      for (int e = 0; e < V; ++e) pm[e] = static_cast<M>(Num<P>::up(pv.v[e]));
#pragma unroll
      for (int k = 0; k < kMaxAverages; ++k) {
        if (k >= args.n_averages) continue;
        auto* slot = reinterpret_cast<Vec<A, V>*>(static_cast<A*>(args.averages[k]) + offset + j);
        Vec<A, V> av = *slot;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          av.v[e] = Num<A>::down(next_average(static_cast<M>(Num<A>::up(av.v[e])), pm[e], weight<M>(args, k), args.copies[k]));
        }
        *slot = av;
      }
    }
    for (int64_t j = vec_end + threadIdx.x; j < length; j += blockDim.x) {
      const P pv = p[j];
#pragma unroll
      for (int k = 0; k < kMaxRings; ++k) {
        if (k < args.n_rings) static_cast<P*>(args.rings[k])[offset + j] = pv;
      }
      const M pm = static_cast<M>(Num<P>::up(pv));
#pragma unroll
      for (int k = 0; k < kMaxAverages; ++k) {
        if (k >= args.n_averages) continue;
        A* a = static_cast<A*>(args.averages[k]) + offset + j;
        *a = Num<A>::down(next_average(static_cast<M>(Num<A>::up(*a)), pm, weight<M>(args, k), args.copies[k]));
      }
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

template <typename P, typename A, int Mode>
__global__ void __launch_bounds__(kThreads) swap_kernel(const int64_t* table, int64_t rows, P* backup,
                                                        const void* source, int64_t stride, int64_t count,
                                                        bool vectors_ok) {
  constexpr int V = 16 / sizeof(P);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t* row = table + 4 * r;
    P* p = reinterpret_cast<P*>(row[0]);
    const int64_t offset = row[1], length = row[2];
    const int64_t vec_end = (row[3] != 0 && vectors_ok) ? length / V * V : 0;
    for (int64_t j = int64_t(threadIdx.x) * V; j < vec_end; j += int64_t(blockDim.x) * V) {
      auto* pv = reinterpret_cast<Vec<P, V>*>(p + j);
      auto* bv = reinterpret_cast<Vec<P, V>*>(backup + offset + j);
      if (Mode == 2) {
        *pv = *bv;
        continue;
      }
      *bv = *pv;
      Vec<P, V> out;
#pragma unroll
      for (int e = 0; e < V; ++e) out.v[e] = swapped_in<P, A, Mode>(source, offset + j + e, stride, count);
      *pv = out;
    }
    for (int64_t j = vec_end + threadIdx.x; j < length; j += blockDim.x) {
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

template <typename F>
void dispatch(Dtype dtype, F&& f) {
  switch (dtype) {
    case kHalf: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    case kFloat: f(float{}); break;
    case kDouble: f(double{}); break;
  }
}

// A persistent grid, balanced: no more blocks than are resident at once, each walking an equal
// share of the rows (GPT-2's 1,995 rows over 1,056 slots: 998 blocks of 2 rows, not 1,056 of which
// 117 finish after one). Each block walks every gridDim.x-th row, so a block that waits for a free
// slot runs its rows after the others' and stretches the launch: a fixed 8 blocks per SM put a
// quarter of the grid in a second wave when update_kernel<bf16, float> took 40 registers (6 blocks
// per SM; H200: EMA at 76% of copy while the 32-register fp32 kernel reached 100%).
template <typename Kernel>
unsigned blocks_for(Kernel kernel, int64_t work, int device) {
  int sms = 0, per_sm = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0) != cudaSuccess) {
    cudaGetLastError();  // clear it, so the launch check reports only the launch
    per_sm = 1;
  }
  const int64_t most = int64_t(sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1);
  const int64_t items = work > 1 ? work : 1;
  const int64_t rounds = (items + most - 1) / most;
  return static_cast<unsigned>((items + rounds - 1) / rounds);
}

const char* last_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace

const char* update(UpdateArgs args, Dtype param, Dtype average, int device, void* stream) {
  if (args.rows == 0) return nullptr;
  for (int k = 0; k < kMaxAverages; ++k) {
    args.weights32[k] = static_cast<float>(args.weights[k]);
    args.copies[k] = args.weights[k] == 1.0;
  }
  dispatch(param, [&](auto p_tag) {
    using P = decltype(p_tag);
    dispatch(average, [&](auto a_tag) {
      using A = decltype(a_tag);
      const unsigned blocks = blocks_for(update_kernel<P, A>, args.rows, device);
      update_kernel<P, A><<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
    });
  });
  return last_error();
}

const char* swap(const int64_t* table, int64_t rows, void* backup, const void* source, int64_t stride, int64_t count,
                 Dtype param, Dtype average, int mode, bool vectors_ok, int device, void* stream) {
  if (rows == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  dispatch(param, [&](auto p_tag) {
    using P = decltype(p_tag);
    dispatch(average, [&](auto a_tag) {
      using A = decltype(a_tag);
      P* b = static_cast<P*>(backup);
      auto launch = [&](auto kernel) {
        kernel<<<blocks_for(kernel, rows, device), kThreads, 0, s>>>(table, rows, b, source, stride, count, vectors_ok);
      };
      if (mode == 0) launch(swap_kernel<P, A, 0>);
      if (mode == 1) launch(swap_kernel<P, A, 1>);
      if (mode == 2) launch(swap_kernel<P, A, 2>);
    });
  });
  return last_error();
}

const char* ring_mean(void* out, const void* ring, int64_t n, int64_t stride, int64_t count, Dtype out_dtype,
                      Dtype ring_dtype, int device, void* stream) {
  if (n == 0) return nullptr;
  dispatch(out_dtype, [&](auto o_tag) {
    using O = decltype(o_tag);
    dispatch(ring_dtype, [&](auto r_tag) {
      using R = decltype(r_tag);
      const unsigned blocks = blocks_for(ring_mean_kernel<O, R>, (n + kThreads - 1) / kThreads, device);
      ring_mean_kernel<O, R><<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<O*>(out), static_cast<const R*>(ring), n, stride, count);
    });
  });
  return last_error();
}

}  // namespace cuda
}  // namespace fastavg
