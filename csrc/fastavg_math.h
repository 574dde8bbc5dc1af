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
// old value (NaN * 0 is NaN). Two spellings of one formula, for the two compilers:
// - GPU: the lerp computed either way, then the copy selects p. Spelled as on the CPU, nvcc 13
//   branched around each element's lerp and reloaded the weight inside the branch (sm_90 SASS of
//   the bf16 -> fp32 EMA kernel: 17 branches, now 9, none per element); EMA+SWA+LAWA took 34
//   registers, now 32 (8 blocks of 256 threads per SM, not 6).
// - CPU: the select around the call, which g++ compiles to faster loops (2 cores, GPT-2 124M,
//   bf16 EMA+SWA+LAWA: 1.57x and 1.72x the stock foreach path in two runs; spelled as on the
//   GPU, 1.24x and 1.37x).
// (tests/cuda_host/emulate.cpp defines FASTAVG_GPU_SPELLING: it runs the CUDA kernels on the CPU.)
template <typename T>
FASTAVG_HD T next_average(T average, T p, T w, bool copy) {
#if defined(__CUDA_ARCH__) || defined(FASTAVG_GPU_SPELLING)
  const T lerped = lerp(average, p, w);
  return copy ? p : lerped;
#else
  return copy ? p : lerp(average, p, w);
#endif
}

// The LAWA mean: summed in double, divided once (exact for any window: no drift).
FASTAVG_HD double mean(double total, long long count) { return total / static_cast<double>(count); }

}  // namespace fastavg
