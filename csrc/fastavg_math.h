// Every update formula of fastavg, shared by the CPU and CUDA kernels so the two cannot disagree.
#pragma once

#if defined(__CUDACC__)
#define FASTAVG_HD __host__ __device__ __forceinline__
#else
#define FASTAVG_HD inline
#endif

namespace fastavg {

// ATen's two-sided lerp (exact at both ends): tracks torch.lerp's rounding.
template <typename T>
FASTAVG_HD T lerp(T average, T p, T w) {
  const T diff = p - average;
  return w < T(0.5) ? average + w * diff : p - diff * (T(1) - w);
}

// One due update of an EMA/SWA average: weight 1 is a first update, a copy that never reads the
// old value (NaN * 0 is NaN).
template <typename T>
FASTAVG_HD T next_average(T average, T p, T w, bool copy) {
  return copy ? p : lerp(average, p, w);
}

// The LAWA mean: summed in double, divided once (exact for any window: no drift).
FASTAVG_HD double mean(double total, long long count) { return total / static_cast<double>(count); }

}  // namespace fastavg
