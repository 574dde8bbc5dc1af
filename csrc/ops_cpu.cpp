// CPU kernels of fastavg's fused ops (schemas: register.cpp, semantics: fastavg/ops.py).
// Each parameter is walked once per call; the table argument is not needed on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "error_text.h"
#include "fastavg_math.h"

namespace fastavg {
namespace {

constexpr int64_t kBlock = 1024;    // elements converted once, then used by every average
constexpr int64_t kGrain = 1 << 15;  // fewest elements worth a parallel task of their own

// float for 16/32-bit averages (torch's opmath), double for double.
template <typename A>
using Math = typename std::conditional<std::is_same<A, double>::value, double, float>::type;

void check_group(at::TensorList params, const char* op) {
  for (const auto& p : params) {
    TORCH_CHECK(p.dim() == 1 && p.is_contiguous(), text(op, ": params must be 1-D contiguous views"));
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), text(op, ": params of one dtype"));
  }
}

int64_t total_numel(at::TensorList params) {
  int64_t n = 0;
  for (const auto& p : params) n += p.numel();
  return n;
}

// The parameters as one range [0, N), in the flat buffers' order: one parallel region over all of
// them, each task split at the parameters' boundaries. A region per parameter (148 for GPT-2 124M)
// paid a fork and a join each, and each join waited for the slower thread. GPT-2 124M shapes, 2-core
// AMD EPYC (AVX2), median of 8 runs alternated with the old build: fp32 EMA went from 0.98x to 1.03x
// torch's _foreach_lerp_ timed in the same process, bf16 EMA from 1.80x to 1.97x its cast + foreach.
template <typename T>
class FlatParams {
 public:
  explicit FlatParams(at::TensorList params) {
    data_.reserve(params.size());
    starts_.reserve(params.size() + 1);
    starts_.push_back(0);
    for (const auto& p : params) {
      data_.push_back(p.data_ptr<T>());
      starts_.push_back(starts_.back() + p.numel());
    }
  }

  int64_t numel() const { return starts_.back(); }

  // fn(p, base, begin, end) for each parameter overlapping the flat range [begin, end): p its
  // elements, base where it starts in the flat buffers, [begin, end) its own elements in that range.
  template <typename Fn>
  void for_each_piece(int64_t begin, int64_t end, Fn&& fn) const {
    // The last parameter starting at or before `begin` (empty parameters share their start with
    // the next one, so this is never one of them).
    size_t k = std::upper_bound(starts_.begin(), starts_.end(), begin) - starts_.begin() - 1;
    for (int64_t at = begin; at < end; ++k) {
      const int64_t stop = std::min(end, starts_[k + 1]);
      if (stop > at) fn(data_[k], starts_[k], at - starts_[k], stop - starts_[k]);
      at = stop;
    }
  }

 private:
  std::vector<T*> data_;
  std::vector<int64_t> starts_;
};

// The inner loops, on restrict pointers (with float parameters and float averages nothing else tells
// the compiler the buffers do not overlap). An extension builds for baseline x86-64 (SSE2) while
// ATen dispatches AVX2/AVX-512 kernels at run time: target_clones compiles these loops for AVX2
// and AVX-512 too and picks one when the library loads, so the .so still runs on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTAVG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTAVG_CLONES
#endif

template <typename T, typename U>
FASTAVG_CLONES void convert(T* __restrict__ dst, const U* __restrict__ src, int64_t n) {
  if constexpr (std::is_same_v<T, U>) {
    std::memcpy(dst, src, n * sizeof(T));  // c10::BFloat16 copies element by element otherwise
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
  }
}

// Copies into a buffer nothing reads again soon: a LAWA ring slot (read by averaged() or overwritten
// window x every steps later) or averaged()'s backup (read back after the evaluation). Non-temporal
// stores skip the read a cached store makes of each destination line before writing it: with that
// read, a copy moves 3 bytes per 2 it copies. LAWA alone on GPT-2 124M shapes (2-core AMD EPYC,
// bf16, 2 threads): 16 ms with memcpy, 11 ms with these 16-byte streaming stores. SSE2 is baseline
// x86-64; elsewhere memcpy. The stores are weakly ordered: stream_fence() before the task ends.
template <typename T>
void stream_copy(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
#if defined(__SSE2__)
  const int64_t head = std::min<int64_t>(bytes, (16 - reinterpret_cast<std::uintptr_t>(d) % 16) % 16);
  std::memcpy(d, s, head);
  int64_t j = head;
  for (; j + 16 <= bytes; j += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + j), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j)));
  }
  std::memcpy(d + j, s + j, bytes - j);
#else
  std::memcpy(d, s, bytes);
#endif
}

// Orders a task's stream_copy stores before what follows (the end of the parallel region).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// The fence waits for the task's streamed stores to reach memory, so a task that copies little
// keeps cached stores: streaming every task, 148 small tensors' LAWA step (bench/step_overhead.py,
// host cost) went from 28-30 us to 40-46 us. A task is a share of the whole group (FlatParams), at
// least half of it on 2 cores, so only groups of a few tens of KB keep cached stores.
constexpr int64_t kStreamMinBytes = 32 << 10;

// One task's copies into a ring slot or backup: streamed when the task is large enough to pay for
// the fence, which the destructor issues after streamed stores only (a task with no ring, an EMA's,
// copies nothing); cached otherwise.
template <typename T>
class SinkCopies {
 public:
  explicit SinkCopies(int64_t task_elements)
      : stream_(task_elements * static_cast<int64_t>(sizeof(T)) >= kStreamMinBytes) {}
  SinkCopies(const SinkCopies&) = delete;
  SinkCopies& operator=(const SinkCopies&) = delete;
  ~SinkCopies() {
    if (streamed_) stream_fence();
  }
  void copy(T* dst, const T* src, int64_t n) {
    if (stream_) {
      stream_copy(dst, src, n);
      streamed_ = true;
    } else {
      convert(dst, src, n);
    }
  }

 private:
  const bool stream_;
  bool streamed_ = false;
};

template <typename A, typename M>
FASTAVG_CLONES void lerp_into(A* __restrict__ average, const M* __restrict__ p, int64_t n, M w) {
  for (int64_t j = 0; j < n; ++j) average[j] = static_cast<A>(lerp(static_cast<M>(average[j]), p[j], w));
}

// total[j] += row[j] in double: one ring row of a LAWA mean, a contiguous stream the compiler
// vectorises. Per element, with the rows in the inner loop, it did not: averaged() of LAWA(5) on
// GPT-2 124M bf16 took 340-365 ms here (2-core AMD EPYC) against 129 ms for an EMA; row by row,
// 214-252 ms.
template <typename R>
FASTAVG_CLONES void add_row(double* __restrict__ total, const R* __restrict__ row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) total[j] += static_cast<double>(row[j]);
}

// dst[j] = means[j] rounded to A (the averages' dtype), then to T.
template <typename T, typename A>
FASTAVG_CLONES void store_means(T* __restrict__ dst, const double* __restrict__ means, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(static_cast<A>(means[j]));
}

// The mean of a ring's first `count` rows over [begin, end): block by block, each block's rows
// summed in order k = 0, 1, ... (the sums of the per-element loop, bit for bit), then
// write(start, means_of_block_as_double, n).
template <typename R, typename Write>
void ring_means(const R* ring, int64_t stride, int64_t count, int64_t begin, int64_t end, Write&& write) {
  double total[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = std::min(kBlock, end - start);
    std::fill(total, total + n, 0.0);
    for (int64_t k = 0; k < count; ++k) add_row(total, ring + k * stride + start, n);
    for (int64_t j = 0; j < n; ++j) total[j] = mean(total[j], count);
    write(start, total, n);
  }
}

template <typename P, typename A>
void update_impl(at::TensorList params, at::TensorList averages, at::ArrayRef<double> weights,
                 at::TensorList rings, at::IntArrayRef slots) {
  using M = Math<A>;
  std::vector<A*> avg;
  std::vector<M> w;
  std::vector<bool> copy;
  for (size_t k = 0; k < averages.size(); ++k) {
    avg.push_back(averages[k].data_ptr<A>());
    w.push_back(static_cast<M>(weights[k]));
    copy.push_back(weights[k] == 1.0);
  }
  std::vector<P*> slot;
  for (size_t k = 0; k < rings.size(); ++k) slot.push_back(rings[k].data_ptr<P>() + slots[k] * rings[k].stride(0));
  const FlatParams<P> flat(params);
  at::parallel_for(0, flat.numel(), kGrain, [&](int64_t task_begin, int64_t task_end) {
    SinkCopies<P> sink(task_end - task_begin);
    flat.for_each_piece(task_begin, task_end, [&](const P* p, int64_t base, int64_t begin, int64_t end) {
      if (avg.empty()) {  // rings alone: one copy of the whole range, nothing to convert
        for (size_t k = 0; k < slot.size(); ++k) sink.copy(slot[k] + base + begin, p + begin, end - begin);
        return;
      }
      M block[kBlock];
      for (int64_t start = begin; start < end; start += kBlock) {
        const int64_t n = std::min(kBlock, end - start);
        // Block by block, so the parameters are read from memory once for rings and averages alike.
        for (size_t k = 0; k < slot.size(); ++k) sink.copy(slot[k] + base + start, p + start, n);
        // Parameters already in the math type are read in place; others are converted once per block.
        const M* source = reinterpret_cast<const M*>(p + start);
        if (!std::is_same<P, M>::value) {
          convert(block, p + start, n);
          source = block;
        }
        for (size_t k = 0; k < avg.size(); ++k) {
          if (copy[k]) {
            convert(avg[k] + base + start, source, n);
          } else {
            lerp_into(avg[k] + base + start, source, n, w[k]);
          }
        }
      }
    });
  });
}

void update_cpu(at::TensorList params, const at::Tensor& table, at::TensorList averages,
                at::ArrayRef<double> weights, at::TensorList rings, at::IntArrayRef slots) {
  check_group(params, "update_");
  TORCH_CHECK(averages.size() == weights.size(), "update_: one weight per average");
  TORCH_CHECK(rings.size() == slots.size(), "update_: one slot per ring");
  if (params.empty() || (averages.empty() && rings.empty())) return;
  const int64_t n = total_numel(params);
  for (const auto& a : averages) {
    TORCH_CHECK(a.numel() == n && a.is_contiguous() && a.scalar_type() == averages[0].scalar_type(),
                "update_: averages must be contiguous (N,) buffers of one dtype");
  }
  for (size_t k = 0; k < rings.size(); ++k) {
    TORCH_CHECK(rings[k].dim() == 2 && rings[k].size(1) == n && rings[k].stride(1) == 1 &&
                    rings[k].scalar_type() == params[0].scalar_type(),
                "update_: rings must be (window, N) in the parameter dtype");
    TORCH_CHECK(slots[k] >= 0 && slots[k] < rings[k].size(0), "update_: ring slot out of range");
  }
  const auto avg_type = averages.empty() ? at::kFloat : averages[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "update_", [&] {
    using P = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, avg_type, "update_avg", [&] {
      update_impl<P, scalar_t>(params, averages, weights, rings, slots);
    });
  });
}

// backup = p; p = source (a flat average, or the mean of a ring's first `count` rows).
template <typename P, typename A, bool FromRing>
void swap_impl(at::TensorList params, P* backup, const void* source, int64_t stride, int64_t count) {
  const FlatParams<P> flat(params);
  at::parallel_for(0, flat.numel(), kGrain, [&](int64_t task_begin, int64_t task_end) {
    SinkCopies<P> sink(task_end - task_begin);
    flat.for_each_piece(task_begin, task_end, [&](P* p, int64_t base, int64_t begin, int64_t end) {
      sink.copy(backup + base + begin, p + begin, end - begin);
      if (!FromRing) {
        convert(p + begin, static_cast<const A*>(source) + base + begin, end - begin);
        return;
      }
      ring_means(static_cast<const P*>(source) + base, stride, count, begin, end,
                 [&](int64_t start, const double* means, int64_t n) { store_means<P, A>(p + start, means, n); });
    });
  });
}

void swap_in_cpu(at::TensorList params, const at::Tensor& table, const at::Tensor& backup, const at::Tensor& average) {
  check_group(params, "swap_in_");
  if (params.empty()) return;
  const int64_t n = total_numel(params);
  TORCH_CHECK(backup.numel() == n && backup.is_contiguous() && backup.scalar_type() == params[0].scalar_type(),
              "swap_in_: backup must be a contiguous (N,) buffer in the parameter dtype");
  TORCH_CHECK(average.numel() == n && average.is_contiguous(), "swap_in_: average must be a contiguous (N,) buffer");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "swap_in_", [&] {
    using P = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, average.scalar_type(), "swap_in_avg", [&] {
      swap_impl<P, scalar_t, false>(params, backup.data_ptr<P>(), average.data_ptr(), 0, 1);
    });
  });
}

void check_ring(const at::Tensor& ring, int64_t n, int64_t count, const char* op) {
  TORCH_CHECK(ring.dim() == 2 && ring.size(1) == n && ring.stride(1) == 1, text(op, ": ring must be (window, N)"));
  TORCH_CHECK_VALUE(count >= 1 && count <= ring.size(0),
                    text(op, ": count must be in [1, ", ring.size(0), "], got ", count));
}

void swap_in_ring_cpu(at::TensorList params, const at::Tensor& table, const at::Tensor& backup, const at::Tensor& ring,
                      int64_t count, at::ScalarType dtype) {
  check_group(params, "swap_in_ring_");
  if (params.empty()) return;
  const int64_t n = total_numel(params);
  check_ring(ring, n, count, "swap_in_ring_");
  // Read as the parameter type: another dtype's ring would be read at the wrong offsets, past its end.
  TORCH_CHECK(ring.scalar_type() == params[0].scalar_type(), "swap_in_ring_: the ring holds the parameter dtype");
  TORCH_CHECK(backup.numel() == n && backup.is_contiguous() && backup.scalar_type() == params[0].scalar_type(),
              "swap_in_ring_: backup must be a contiguous (N,) buffer in the parameter dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "swap_in_ring_", [&] {
    using P = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "swap_in_ring_avg", [&] {
      swap_impl<P, scalar_t, true>(params, backup.data_ptr<P>(), ring.data_ptr(), ring.stride(0), count);
    });
  });
}

void restore_cpu(at::TensorList params, const at::Tensor& table, const at::Tensor& backup) {
  check_group(params, "restore_");
  if (params.empty()) return;
  TORCH_CHECK(backup.numel() == total_numel(params) && backup.is_contiguous() &&
                  backup.scalar_type() == params[0].scalar_type(),
              "restore_: backup must be a contiguous (N,) buffer in the parameter dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "restore_", [&] {
    const scalar_t* b = backup.data_ptr<scalar_t>();
    const FlatParams<scalar_t> flat(params);
    at::parallel_for(0, flat.numel(), kGrain, [&](int64_t task_begin, int64_t task_end) {
      flat.for_each_piece(task_begin, task_end, [&](scalar_t* p, int64_t base, int64_t begin, int64_t end) {
        convert(p + begin, b + base + begin, end - begin);
      });
    });
  });
}

void ring_mean_cpu(const at::Tensor& out, const at::Tensor& ring, int64_t count) {
  const int64_t n = out.numel();
  TORCH_CHECK(out.is_contiguous(), "ring_mean_: out must be contiguous");
  check_ring(ring, n, count, "ring_mean_");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ring.scalar_type(), "ring_mean_", [&] {
    using R = scalar_t;
    const R* r = ring.data_ptr<R>();
    const int64_t stride = ring.stride(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "ring_mean_out", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        ring_means(r, stride, count, begin, end, [&](int64_t start, const double* means, int64_t m) {
          store_means<scalar_t, scalar_t>(o + start, means, m);
        });
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastavg_native, CPU, m) {
  m.impl("update_", &update_cpu);
  m.impl("swap_in_", &swap_in_cpu);
  m.impl("swap_in_ring_", &swap_in_ring_cpu);
  m.impl("restore_", &restore_cpu);
  m.impl("ring_mean_", &ring_mean_cpu);
}

}  // namespace fastavg
