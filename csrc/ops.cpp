// fips_kernels._C: operator schemas, input validation, CPU implementations.
//
// The library is registered with the dispatcher (TORCH_LIBRARY) when the
// shared object is loaded; `import fips_kernels._C` loads it. No pybind11 and
// no libtorch_python API is used, so the module can be built against the
// CPython limited API (one wheel for all CPython versions).
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/irange.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cstdint>
#include <vector>

#include "nm_decode.h"
#include "reconstruct_nm.h"

// The value dtypes of the op: float32, float16, bfloat16 (not double: the
// input checks reject it, so no kernel is instantiated for it).
#define FIPS_DISPATCH_VALUE_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)      \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

extern "C" {
// An empty module: importing it only loads this shared object, which runs the
// TORCH_LIBRARY static initialisers below and so registers the operators.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "fips_kernels compiled operators (registered under torch.ops.fips_kernels_cuda)",
      -1,       // m_size
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  return PyModule_Create(&module_def);
}
}

namespace fips_kernels {

// Validates the arguments of reconstruct_nm (see prepare_reconstruct_nm).
static void check_reconstruct_nm_inputs(const at::Tensor& U, const at::Tensor& values,
                                 const at::Tensor& indices, int64_t K, int64_t N,
                                 int64_t n, int64_t m, bool contract) {
  constexpr const char* op = "fips_kernels_cuda::reconstruct_nm";
  TORCH_CHECK(nm::valid_m(m), op, ": m must be one of 2, 4, 8, 16, got m=", m);
  TORCH_CHECK(n >= 1 && n <= m, op, ": n must satisfy 1 <= n <= m, got n=", n,
              ", m=", m);
  TORCH_CHECK(K >= 0 && N >= 0, op, ": K and N must be >= 0, got K=", K,
              ", N=", N);

  TORCH_CHECK(U.dim() == 2, op, ": U must be 2-D (d x r), got ", U.dim(),
              "-D with shape ", U.sizes());
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D (G*n x N), got ",
              values.dim(), "-D with shape ", values.sizes());
  TORCH_CHECK(indices.dim() == 2, op,
              ": indices must be 2-D (ceil(G*n/P) x N), got ", indices.dim(),
              "-D with shape ", indices.sizes());

  const auto st = U.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": U must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(values.scalar_type() == st, op,
              ": values dtype must match U dtype (", st, "), got ",
              values.scalar_type());
  TORCH_CHECK(indices.scalar_type() == at::kInt, op,
              ": indices must be int32, got ", indices.scalar_type());

  TORCH_CHECK(values.device() == U.device() && indices.device() == U.device(),
              op, ": all tensors must be on the same device, got U on ",
              U.device(), ", values on ", values.device(), ", indices on ",
              indices.device());

  const int64_t vrows = nm::values_rows(K, n, m);
  const int64_t irows = nm::index_rows(K, n, m);
  TORCH_CHECK(values.size(0) == vrows && values.size(1) == N, op,
              ": values must have shape (G*n, N) = (", vrows, ", ", N,
              ") for K=", K, ", N=", N, ", n=", n, ", m=", m, ", got ",
              values.sizes());
  TORCH_CHECK(indices.size(0) == irows && indices.size(1) == N, op,
              ": indices must have shape (ceil(G*n/P), N) = (", irows, ", ", N,
              ") for K=", K, ", N=", N, ", n=", n, ", m=", m, " (P=",
              nm::entries_per_word(m), "), got ", indices.sizes());
  if (contract) {
    TORCH_CHECK(U.size(1) == N, op,
                ": contract=True needs U of shape (d, N) with N=", N,
                " (the rank r), got U of shape ", U.sizes());
  } else {
    TORCH_CHECK(U.size(1) == K, op,
                ": contract=False needs U of shape (d, K) with K=", K,
                " (the rank r), got U of shape ", U.sizes());
  }
}

ReconstructNmCall prepare_reconstruct_nm(const at::Tensor& U, const at::Tensor& values,
                                         const at::Tensor& indices, int64_t K, int64_t N,
                                         int64_t n, int64_t m, bool contract) {
  check_reconstruct_nm_inputs(U, values, indices, K, N, n, m, contract);
  ReconstructNmCall call;
  call.U = U.contiguous();
  call.values = values.contiguous();
  call.indices = indices.contiguous();
  call.d = call.U.size(0);
  call.out = contract ? at::empty({call.d, K}, call.U.options())
                      : at::empty({N, call.d}, call.U.options());
  call.done = call.out.numel() == 0;  // no launch with an empty grid
  if (!call.done && (contract ? N : K) == 0) {  // empty reduction: zeros
    call.out.zero_();
    call.done = true;
  }
  return call;
}

namespace {

// out[p, q] = sum_{k < L} X[p, k] * Y[q, k], fp32 accumulation in k order
// (each output is a sequential sum; four outputs are computed side by side
// only to overlap their add latencies).
template <typename scalar_t>
void rowdot_gemm(const float* X, const float* Y, scalar_t* out, int64_t P,
                 int64_t Q, int64_t L) {
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (const auto p : c10::irange(begin, end)) {
      const float* x = X + p * L;
      int64_t q = 0;
      for (; q + 4 <= Q; q += 4) {
        const float* y0 = Y + q * L;
        const float* y1 = y0 + L;
        const float* y2 = y1 + L;
        const float* y3 = y2 + L;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        for (const auto k : c10::irange(L)) {
          const float xk = x[k];
          a0 += xk * y0[k];
          a1 += xk * y1[k];
          a2 += xk * y2[k];
          a3 += xk * y3[k];
        }
        out[p * Q + q + 0] = static_cast<scalar_t>(a0);
        out[p * Q + q + 1] = static_cast<scalar_t>(a1);
        out[p * Q + q + 2] = static_cast<scalar_t>(a2);
        out[p * Q + q + 3] = static_cast<scalar_t>(a3);
      }
      for (; q < Q; ++q) {
        const float* y = Y + q * L;
        float acc = 0.f;
        for (const auto k : c10::irange(L)) {
          acc += x[k] * y[k];
        }
        out[p * Q + q] = static_cast<scalar_t>(acc);
      }
    }
  });
}

at::Tensor reconstruct_nm_cpu(const at::Tensor& U_, const at::Tensor& values_,
                              const at::Tensor& indices_, int64_t K, int64_t N,
                              int64_t n, int64_t m, bool contract) {
  TORCH_CHECK(U_.device().is_cpu(),
              "fips_kernels_cuda::reconstruct_nm (CPU): expected CPU tensors, got ",
              U_.device());
  const ReconstructNmCall call = prepare_reconstruct_nm(U_, values_, indices_, K, N, n, m, contract);
  if (call.done) {
    return call.out;
  }
  const at::Tensor& U = call.U;
  const at::Tensor& values = call.values;
  const at::Tensor& indices = call.indices;
  const at::Tensor& out = call.out;
  const int64_t d = call.d;

  const int64_t J = nm::values_rows(K, n, m);
  const int32_t* idx = indices.data_ptr<int32_t>();

  FIPS_DISPATCH_VALUE_TYPES(U.scalar_type(), "reconstruct_nm_cpu", [&] {
        const scalar_t* u = U.data_ptr<scalar_t>();
        const scalar_t* val = values.data_ptr<scalar_t>();
        std::vector<float> Uf(static_cast<size_t>(U.numel()));
        for (const auto e : c10::irange(U.numel())) {
          Uf[e] = static_cast<float>(u[e]);
        }
        // Dense B in fp32, zero-filled then scattered from the kept values
        // (the same order of operations as the CUDA kernel's shared tile).
        // Expand wants it as (N x K) (B transposed), contract as (K x N), so
        // that both products are dot products of contiguous rows.
        std::vector<float> Bd(static_cast<size_t>(K * N), 0.f);
        for (const auto c : c10::irange(N)) {
          for (const auto j : c10::irange(J)) {
            const int64_t row = nm::row_of_entry(idx, N, j, c, n, m);
            if (row >= K) {
              continue;  // padding of the last group
            }
            const float v = static_cast<float>(val[j * N + c]);
            if (contract) {
              Bd[row * N + c] = v;
            } else {
              Bd[c * K + row] = v;
            }
          }
        }
        scalar_t* o = out.data_ptr<scalar_t>();
        if (contract) {
          // W (d x K): W[i, c] = sum_k U[i, k] * B[c, k]
          rowdot_gemm<scalar_t>(Uf.data(), Bd.data(), o, d, K, N);
        } else {
          // W (N x d): W[c, i] = sum_k B[k, c] * U[i, k]
          rowdot_gemm<scalar_t>(Bd.data(), Uf.data(), o, N, d, K);
        }
      });
  return out;
}

}  // namespace

TORCH_LIBRARY(fips_kernels_cuda, m) {
  // The fake (meta) implementations are registered from Python, in this module.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
  m.set_python_module("fips_kernels._extension");
#else
  m.impl_abstract_pystub("fips_kernels._extension");
#endif
  m.def(
      "reconstruct_nm(Tensor U, Tensor values, Tensor indices, int K, int N, "
      "int n, int m, bool contract) -> Tensor");
  // act(A . B + bias) with B (K x N) a packed dense / nm / bitmap factor
  // (docs/FORMATS.md), decompressed in shared memory; see csrc/spmm_tile.h.
  m.def(
      "sparse_mm(Tensor A, Tensor values, Tensor? aux0, Tensor? aux1, Tensor? scales, "
      "Tensor? bias, str fmt, int K, int N, int p0, int p1, int qbits, int qgroup, "
      "bool transpose, str activation, int split_k, ScalarType? out_dtype) -> Tensor");
  // silu(A . B_gate + b_gate) * (A . B_up + b_up): both factors decoded in one
  // K loop, A read once (Llama/Gemma gate and up projections).
  m.def(
      "sparse_mm_gated(Tensor A, Tensor values, Tensor? aux0, Tensor? aux1, Tensor? scales, "
      "Tensor? bias, Tensor up_values, Tensor? up_aux0, Tensor? up_aux1, Tensor? up_scales, "
      "Tensor? up_bias, str fmt, int K, int N, int p0, int p1, int qbits, int qgroup, int split_k, "
      "ScalarType? out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(fips_kernels_cuda, CPU, m) {
  m.impl("reconstruct_nm", &reconstruct_nm_cpu);
}

}  // namespace fips_kernels
