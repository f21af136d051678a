// The host-side preparation of fips_kernels_cuda::reconstruct_nm, shared by its
// CPU (ops.cpp) and CUDA (reconstruct_nm.cu) implementations.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fips_kernels {

// Checked, contiguous inputs and the output of one call: (N x d) for expand,
// (d x K) for contract. `done` when nothing is left to compute (the output is
// empty, or the reduction is and the output has been zero-filled).
struct ReconstructNmCall {
  at::Tensor U, values, indices, out;
  int64_t d = 0;
  bool done = false;
};

// Raises (TORCH_CHECK) naming the argument that is wrong; device checks are the
// caller's (each implementation accepts its own device type).
ReconstructNmCall prepare_reconstruct_nm(const at::Tensor& U, const at::Tensor& values,
                                         const at::Tensor& indices, int64_t K, int64_t N,
                                         int64_t n, int64_t m, bool contract);

}  // namespace fips_kernels
