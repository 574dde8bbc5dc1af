// Binds the CUDA launchers (ops_cuda.cu) to torch as TORCH_LIBRARY_IMPL(fastavg_native, CUDA).
// The current stream and device come through the generic c10 API (no c10/cuda or ATen/cuda
// headers, from torch 2.11 on), so this file compiles against a CPU build of torch too (CI does that).
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>
#include <torch/version.h>

// c10::Stream::native_handle() came with torch 2.11. Before it, the stream comes from c10/cuda, whose
// headers need CUDA's: a CUDA build has them (CI compiles this file against a CPU torch >= 2.11).
#if TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 11
#include <c10/cuda/CUDAStream.h>
#define FASTAVG_STREAM_FROM_C10_CUDA
#endif

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "error_text.h"
#include "ops_cuda.h"

namespace fastavg {
namespace {

cuda::Dtype code(at::ScalarType type) {
  switch (type) {
    case at::kHalf: return cuda::kHalf;
    case at::kBFloat16: return cuda::kBFloat16;
    case at::kFloat: return cuda::kFloat;
    case at::kDouble: return cuda::kDouble;
    default: TORCH_CHECK(false, text("fastavg_native: unsupported dtype ", type));
  }
}

void* current_stream(const at::Device& device) {
#ifdef FASTAVG_STREAM_FROM_C10_CUDA
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
#else
  return c10::impl::VirtualGuardImpl(device.type()).getStream(device).native_handle();
#endif
}

bool aligned16(const void* pointer) { return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0; }

void check_launch(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, text("fastavg_native::", op, ": CUDA launch failed: ", error));
}

int64_t total_numel(at::TensorList params) {
  int64_t n = 0;
  for (const auto& p : params) n += p.numel();
  return n;
}

void check_table(const at::Tensor& table, at::TensorList params, const char* op) {
  TORCH_CHECK(table.is_cuda() && table.scalar_type() == at::kLong && table.dim() == 2 && table.size(1) == 4 &&
                  table.is_contiguous(),
              text(op, ": table must be the group's (rows, 4) int64 table on its CUDA device"));
  for (const auto& p : params) {
    TORCH_CHECK(p.device() == table.device() && p.scalar_type() == params[0].scalar_type(),
                text(op, ": params must share the table's device and one dtype"));
  }
}

void* slot_address(const at::Tensor& ring, int64_t slot) {
  return static_cast<char*>(ring.data_ptr()) + slot * ring.stride(0) * ring.element_size();
}

// The parameters into each ring's slot through one cudaMemcpyBatchAsync (ops_cuda.cu's copy_rings).
void copy_rings_by_driver(at::TensorList params, at::TensorList rings, at::IntArrayRef slots, int mode,
                          const at::Device& device, void* stream) {
  std::vector<const void*> sources;
  std::vector<int64_t> bytes;
  for (const auto& p : params) {
    sources.push_back(p.data_ptr());
    bytes.push_back(static_cast<int64_t>(p.nbytes()));
  }
  std::vector<void*> slot_addresses;
  for (size_t k = 0; k < rings.size(); ++k) {
    slot_addresses.push_back(slot_address(rings[k], slots[k]));
  }
  check_launch(cuda::copy_rings(sources.data(), bytes.data(), static_cast<int64_t>(sources.size()),
                                slot_addresses.data(), static_cast<int>(slot_addresses.size()), mode, device.index(),
                                stream),
               "update_");
}

void update_cuda(at::TensorList params, const at::Tensor& table, at::TensorList averages, at::ArrayRef<double> weights,
                 at::TensorList rings, at::IntArrayRef slots) {
  TORCH_CHECK(averages.size() == weights.size() && rings.size() == slots.size(), "update_: lists of unequal length");
  if (params.empty() || (averages.empty() && rings.empty())) return;
  check_table(table, params, "update_");
  const int64_t n = total_numel(params);
  for (const auto& a : averages) {
    TORCH_CHECK(a.device() == table.device() && a.numel() == n && a.is_contiguous() &&
                    a.scalar_type() == averages[0].scalar_type(),
                "update_: averages must be contiguous (N,) buffers of one dtype on the group's device");
  }
  for (size_t k = 0; k < rings.size(); ++k) {
    TORCH_CHECK(rings[k].device() == table.device() && rings[k].dim() == 2 && rings[k].size(1) == n &&
                    rings[k].stride(1) == 1 && rings[k].scalar_type() == params[0].scalar_type(),
                "update_: rings must be (window, N) in the parameter dtype on the group's device");
    TORCH_CHECK(slots[k] >= 0 && slots[k] < rings[k].size(0), "update_: ring slot out of range");
  }
  c10::DeviceGuard guard(table.device());
  void* stream = current_stream(table.device());
  const auto param_code = code(params[0].scalar_type());
  // Rings alone: the kernels then read no average; the parameter dtype is a pair every build has.
  const auto average_code = averages.empty() ? param_code : code(averages[0].scalar_type());
  const int driver_mode = cuda::driver_copies();
  // LAWA alone as the driver's copies (set_driver_copies), except into a CUDA graph being captured.
  if (averages.empty() && driver_mode != 0 && !cuda::capturing(stream)) {
    copy_rings_by_driver(params, rings, slots, driver_mode, table.device(), stream);
    return;
  }
  // At most 4 averages and 2 rings per launch; more (rare) take further launches.
  const size_t launches = std::max((averages.size() + cuda::kMaxAverages - 1) / cuda::kMaxAverages,
                                   (rings.size() + cuda::kMaxRings - 1) / cuda::kMaxRings);
  for (size_t l = 0; l < launches; ++l) {
    cuda::UpdateArgs args{};
    args.table = table.data_ptr<int64_t>();
    args.rows = table.size(0);
    args.vectors_ok = true;
    for (size_t k = l * cuda::kMaxAverages; k < std::min(averages.size(), (l + 1) * cuda::kMaxAverages); ++k) {
      args.averages[args.n_averages] = averages[k].data_ptr();
      args.weights[args.n_averages++] = weights[k];
      args.vectors_ok &= aligned16(averages[k].data_ptr());
    }
    for (size_t k = l * cuda::kMaxRings; k < std::min(rings.size(), (l + 1) * cuda::kMaxRings); ++k) {
      void* slot = slot_address(rings[k], slots[k]);
      args.rings[args.n_rings++] = slot;
      args.vectors_ok &= aligned16(slot);
    }
    if (args.n_averages == 0 && args.n_rings == 0) continue;
    check_launch(cuda::update(args, param_code, average_code, table.device().index(), stream), "update_");
  }
}

void swap(at::TensorList params, const at::Tensor& table, const at::Tensor& backup, const void* source,
          int64_t stride, int64_t count, at::ScalarType average_type, int mode, bool source_aligned, const char* op) {
  if (params.empty()) return;
  check_table(table, params, op);
  TORCH_CHECK(backup.device() == table.device() && backup.numel() == total_numel(params) && backup.is_contiguous() &&
                  backup.scalar_type() == params[0].scalar_type(),
              text(op, ": backup must be a contiguous (N,) buffer in the parameter dtype on the group's device"));
  c10::DeviceGuard guard(table.device());
  const bool vectors_ok = aligned16(backup.data_ptr()) && source_aligned;
  check_launch(cuda::swap(table.data_ptr<int64_t>(), table.size(0), backup.data_ptr(), source, stride, count,
                          code(params[0].scalar_type()), code(average_type), mode, vectors_ok, table.device().index(),
                          current_stream(table.device())),
               op);
}

void swap_in_cuda(at::TensorList params, const at::Tensor& table, const at::Tensor& backup, const at::Tensor& average) {
  TORCH_CHECK(average.numel() == backup.numel() && average.is_contiguous() && average.device() == backup.device(),
              "swap_in_: average must be a contiguous (N,) buffer on the group's device");
  swap(params, table, backup, average.data_ptr(), 0, 1, average.scalar_type(), 0, aligned16(average.data_ptr()),
       "swap_in_");
}

void check_ring(const at::Tensor& ring, int64_t n, int64_t count, const char* op) {
  TORCH_CHECK(ring.is_cuda() && ring.dim() == 2 && ring.size(1) == n && ring.stride(1) == 1,
              text(op, ": ring must be (window, N) on the GPU"));
  TORCH_CHECK_VALUE(count >= 1 && count <= ring.size(0),
                    text(op, ": count must be in [1, ", ring.size(0), "], got ", count));
}

void swap_in_ring_cuda(at::TensorList params, const at::Tensor& table, const at::Tensor& backup, const at::Tensor& ring,
                       int64_t count, at::ScalarType dtype) {
  check_ring(ring, backup.numel(), count, "swap_in_ring_");
  TORCH_CHECK(ring.scalar_type() == backup.scalar_type(), "swap_in_ring_: the ring holds the parameter dtype");
  // Every other buffer's device is checked against the table's (swap): a ring on another GPU would
  // be read through its address there, an illegal access where peer access is off.
  TORCH_CHECK(ring.device() == table.device(), "swap_in_ring_: ring must be on the group's device");
  // The ring's elements are read one by one (count of them per element), so its alignment does not matter.
  swap(params, table, backup, ring.data_ptr(), ring.stride(0), count, dtype, 1, true, "swap_in_ring_");
}

void restore_cuda(at::TensorList params, const at::Tensor& table, const at::Tensor& backup) {
  swap(params, table, backup, backup.data_ptr(), 0, 1, backup.scalar_type(), 2, true, "restore_");
}

void ring_mean_cuda(const at::Tensor& out, const at::Tensor& ring, int64_t count) {
  check_ring(ring, out.numel(), count, "ring_mean_");
  TORCH_CHECK(out.is_contiguous() && out.device() == ring.device(), "ring_mean_: out must be contiguous, on the ring's device");
  c10::DeviceGuard guard(out.device());
  check_launch(cuda::ring_mean(out.data_ptr(), ring.data_ptr(), out.numel(), ring.stride(0), count,
                               code(out.scalar_type()), code(ring.scalar_type()), out.device().index(),
                               current_stream(out.device())),
               "ring_mean_");
}

// The hooks pass on the launchers' -1 for a setting the kernels cannot run; fastavg/bench/
// native_launch.py raises ValueError for it. (They used to throw, with the number in the message:
// that crashed the H200 image's processes, error_text.h says why.)
int64_t set_block_threads(int64_t threads) {
  return threads == static_cast<int>(threads) ? cuda::set_block_threads(static_cast<int>(threads)) : -1;
}

int64_t set_unroll(int64_t factor) {
  return factor == static_cast<int>(factor) ? cuda::set_unroll(static_cast<int>(factor)) : -1;
}

int64_t set_block_per_row(int64_t on) {
  return on == static_cast<int>(on) ? cuda::set_block_per_row(static_cast<int>(on)) : -1;
}

int64_t set_bulk_rings(int64_t stage_kb) {
  return stage_kb == static_cast<int>(stage_kb) ? cuda::set_bulk_rings(static_cast<int>(stage_kb)) : -1;
}

int64_t set_driver_copies(int64_t mode) {
  return mode == static_cast<int>(mode) ? cuda::set_driver_copies(static_cast<int>(mode)) : -1;
}

// "" where the kernels run on CUDA device `device`, else CUDA's reason (ops_cuda.h). A string, not
// an error: fastavg/native_backend.py turns it into the reason available_backends() gives.
std::string kernels_missing(int64_t device) {
  c10::DeviceGuard guard(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
  const char* why = cuda::kernels_missing();
  return why == nullptr ? std::string() : std::string(why);
}

}  // namespace

// Whether this build's CUDA kernels run on a device (not an op of fastavg/ops.py's SCHEMAS either).
TORCH_LIBRARY(fastavg_native_cuda, m) { m.def("kernels_missing(int device) -> str", &kernels_missing); }

// Tuning hooks for bench/kernel_sweep.py, not part of the ops (fastavg/ops.py's SCHEMAS): the
// threads per block, the vectors per thread per pass, and the grid (one block per row or not) of later
// update and swap launches, and the TMA's or the driver's copies for LAWA alone; each returns the
// previous setting, or -1 for one the kernels cannot run (nothing changed).
TORCH_LIBRARY(fastavg_native_tuning, m) {
  m.def("set_block_threads(int threads) -> int", &set_block_threads);
  m.def("set_unroll(int factor) -> int", &set_unroll);
  m.def("set_block_per_row(int on) -> int", &set_block_per_row);
  m.def("set_bulk_rings(int stage_kb) -> int", &set_bulk_rings);
  m.def("set_driver_copies(int mode) -> int", &set_driver_copies);
}

TORCH_LIBRARY_IMPL(fastavg_native, CUDA, m) {
  m.impl("update_", &update_cuda);
  m.impl("swap_in_", &swap_in_cuda);
  m.impl("swap_in_ring_", &swap_in_ring_cuda);
  m.impl("restore_", &restore_cuda);
  m.impl("ring_mean_", &ring_mean_cuda);
}

}  // namespace fastavg
