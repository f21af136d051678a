// Host side of fips_kernels_cuda::sparse_mm, shared by the CPU emulation
// (sparse_mm_host.cpp) and the CUDA launcher (sparse_mm.cu): argument
// checks with readable messages, the split-K choice, and the Params a block
// program reads.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

#include "spmm_tile.h"

namespace fips_kernels {

struct SparseMMCall {
  spmm::Params p{};
  at::Tensor out;                 // (M, N)
  at::Tensor ws;                  // (split, M, N) fp32 when split > 1
  std::vector<at::Tensor> keep;   // contiguous / realigned inputs the Params point into
  bool bf16 = false;
  int64_t grid_n = 0, grid_m = 0; // blocks along N and M (grid.z = p.split)
};

// One factor's tensors as the ops receive them.
struct FactorTensors {
  at::Tensor values;
  std::optional<at::Tensor> aux0, aux1, scales, bias;
};

// Validates the op's arguments (TORCH_CHECK naming the argument, its shape,
// dtype or device) and describes the launch; `up` given: the gated form
// silu(A·B + b) * (A·B_up + b_up) (activation is then ignored). `sm_count`
// is the number of multiprocessors split-K should fill when split_k == 0.
// Never reads device memory: the bitmap offsets are trusted (SparseFactor
// validates them).
SparseMMCall prepare_sparse_mm(const at::Tensor& A, const FactorTensors& first, const FactorTensors* up,
                               c10::string_view fmt, int64_t K, int64_t N, int64_t p0, int64_t p1,
                               int64_t qbits, int64_t qgroup, bool transpose, c10::string_view activation,
                               int64_t split_k, std::optional<at::ScalarType> out_dtype, int64_t sm_count);

// The two operators' entry points for one device type. `Device::Scope scope(A)`
// checks A's device (on CUDA it also holds the device guard and the device's
// facts for the whole call) and gives `scope.sms`, the multiprocessors split-K
// fills; `Device::run(call, scope)` launches the block program.
template <class Device>
at::Tensor sparse_mm_entry(const at::Tensor& A, const at::Tensor& values, const std::optional<at::Tensor>& aux0,
                           const std::optional<at::Tensor>& aux1, const std::optional<at::Tensor>& scales,
                           const std::optional<at::Tensor>& bias, c10::string_view fmt, int64_t K, int64_t N,
                           int64_t p0, int64_t p1, int64_t qbits, int64_t qgroup, bool transpose,
                           c10::string_view activation, int64_t split_k, std::optional<at::ScalarType> out_dtype) {
  const typename Device::Scope scope(A);
  return Device::run(prepare_sparse_mm(A, {values, aux0, aux1, scales, bias}, nullptr, fmt, K, N, p0, p1, qbits,
                                       qgroup, transpose, activation, split_k, out_dtype, scope.sms),
                     scope);
}

template <class Device>
at::Tensor sparse_mm_gated_entry(const at::Tensor& A, const at::Tensor& values,
                                 const std::optional<at::Tensor>& aux0, const std::optional<at::Tensor>& aux1,
                                 const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& up_values, const std::optional<at::Tensor>& up_aux0,
                                 const std::optional<at::Tensor>& up_aux1, const std::optional<at::Tensor>& up_scales,
                                 const std::optional<at::Tensor>& up_bias, c10::string_view fmt, int64_t K,
                                 int64_t N, int64_t p0, int64_t p1, int64_t qbits, int64_t qgroup, int64_t split_k,
                                 std::optional<at::ScalarType> out_dtype) {
  const typename Device::Scope scope(A);
  const FactorTensors up{up_values, up_aux0, up_aux1, up_scales, up_bias};
  return Device::run(prepare_sparse_mm(A, {values, aux0, aux1, scales, bias}, &up, fmt, K, N, p0, p1, qbits,
                                       qgroup, false, "silu", split_k, out_dtype, scope.sms),
                     scope);
}

}  // namespace fips_kernels
