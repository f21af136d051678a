// CUDA implementation of fips_kernels_cuda::reconstruct_nm.
//
// Rebuilds the torch-layout dense weight of a FiPS layer from the dense base U
// (d x r) and a factor B (K x N) stored in the `nm` format (docs/FORMATS.md):
//   contract=False (expand):   W (N x d) = (U . B)^T,   W[c, i] = sum_k U[i, k] B[k, c]
//   contract=True  (contract): W (d x K) = U . B^T,     W[i, c] = sum_k U[i, k] B[c, k]
//
// Both are one GEMM  out[row, col] = sum_red A[row, red] * Bm[red, col]:
//   expand:   rows = N (c), cols = d (i), red = K;  A[c, k] = B[k, c] (sparse), Bm[k, i] = U[i, k]
//   contract: rows = d (i), cols = K (c), red = N;  A[i, k] = U[i, k],          Bm[k, c] = B[c, k] (sparse)
// The sparse operand's reduction-or-column axis is B's K axis, always the one
// the N:M groups run along, so a tile covers whole groups.
//
// Tiling: a 256-thread block owns a 64 x 64 output tile and walks the
// reduction in steps of 32. Per step it stages both operands in shared memory
// as fp32: the dense U tile (coalesced loads along r) and the decompressed B
// tile (each thread owns one (group, column) pair: it zero-fills the group's m
// rows, then scatters its n kept values; loads of values/indices are
// coalesced along N). Then each warp computes 8 rows x 64 columns, each
// thread 8 x 2 outputs with fp32 FMAs, reading A as broadcast float4s and Bm as
// conflict-free scalars. The output tile is written once; a warp stores 32
// consecutive elements of a row at a time.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>

#include "nm_decode.h"
#include "reconstruct_nm.h"

// The value dtypes of the op: float32, float16, bfloat16 (not double: the
// input checks reject it, so no kernel is instantiated for it).
#define FIPS_DISPATCH_VALUE_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)      \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fips_kernels {

namespace {

constexpr int kTileRows = 64;  // output rows per block
constexpr int kTileCols = 64;  // output columns per block
constexpr int kTileRed = 32;   // reduction step (a multiple of every m <= 16)
constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerThread = kTileRows / kWarps;  // 8: one warp per 8 rows
constexpr int kColsPerThread = kTileCols / 32;      // 2: lane, lane + 32
// A is read as float4 (rows kRowsPerThread*warp ...), so its row stride is a
// multiple of 4; Bm's stride is odd so that column-wise stores do not conflict.
constexpr int kStrideA = kTileRows + 4;
constexpr int kStrideB = kTileCols + 1;

static_assert(kTileRed % 16 == 0, "reduction tile must hold whole groups");
static_assert(kTileCols % 16 == 0, "column tile must hold whole groups");
static_assert(kRowsPerThread % 4 == 0, "A is read as float4");
static_assert(kTileRows == kWarps * kRowsPerThread, "row tiling");
static_assert(kTileCols == 32 * kColsPerThread, "column tiling");

// Stage the dense tile U[i0 : i0+64, k0 : k0+32] into S[k][i - i0] (fp32,
// zero outside U). Lanes run along k: coalesced global loads.
template <typename scalar_t, int kStride>
__device__ __forceinline__ void load_u_tile(float (*S)[kStride],
                                            const scalar_t* __restrict__ U,
                                            int64_t d, int64_t r, int64_t i0,
                                            int64_t k0) {
  for (int e = threadIdx.x; e < 64 * kTileRed; e += kThreads) {
    const int kk = e % kTileRed;
    const int ii = e / kTileRed;
    const int64_t i = i0 + ii;
    const int64_t k = k0 + kk;
    S[kk][ii] = (i < d && k < r) ? static_cast<float>(U[i * r + k]) : 0.f;
  }
}

// Decompress B[k0 : k0 + 32, c0 : c0 + 64] (rows along B's K axis, the grouped
// one) of the nm-packed factor into S[k - k0][c - c0] (expand: A^T, i.e.
// A[c, k] stored transposed). One thread per (group, column): zero-fill the
// group's m rows, then scatter the n kept values. Rows >= K are skipped.
template <typename scalar_t, int kStride>
__device__ __forceinline__ void decode_tile_expand(
    float (*S)[kStride], const scalar_t* __restrict__ values,
    const int32_t* __restrict__ indices, int64_t K, int64_t N, int64_t G, int n,
    int m, int64_t k0, int64_t c0) {
  const int groups = kTileRed / m;
  const int64_t g0 = k0 / m;
  for (int e = threadIdx.x; e < groups * kTileRows; e += kThreads) {
    const int cc = e % kTileRows;  // lanes along N: coalesced
    const int gl = e / kTileRows;
    const int kbase = gl * m;
#pragma unroll 4
    for (int q = 0; q < m; ++q) {
      S[kbase + q][cc] = 0.f;
    }
    const int64_t c = c0 + cc;
    const int64_t g = g0 + gl;
    if (c < N && g < G) {
      for (int t = 0; t < n; ++t) {
        const int64_t j = g * n + t;
        const int q = nm::read_entry(indices, N, j, c, m);
        if (g * m + q < K) {
          S[kbase + q][cc] = static_cast<float>(values[j * N + c]);
        }
      }
    }
  }
}

// Decompress B[c0 : c0 + 64, k0 : k0 + 32] (c along B's grouped K axis, k
// along B's N axis) into S[k - k0][c - c0] (contract: Bm[k, c] = B[c, k]).
// One thread per (group, column k of B); lanes along N: coalesced.
template <typename scalar_t, int kStride>
__device__ __forceinline__ void decode_tile_contract(
    float (*S)[kStride], const scalar_t* __restrict__ values,
    const int32_t* __restrict__ indices, int64_t K, int64_t N, int64_t G, int n,
    int m, int64_t k0, int64_t c0) {
  const int groups = kTileCols / m;
  const int64_t g0 = c0 / m;
  for (int e = threadIdx.x; e < groups * kTileRed; e += kThreads) {
    const int kk = e % kTileRed;
    const int gl = e / kTileRed;
    const int cbase = gl * m;
#pragma unroll 4
    for (int q = 0; q < m; ++q) {
      S[kk][cbase + q] = 0.f;
    }
    const int64_t k = k0 + kk;
    const int64_t g = g0 + gl;
    if (k < N && g < G) {
      for (int t = 0; t < n; ++t) {
        const int64_t j = g * n + t;
        const int q = nm::read_entry(indices, N, j, k, m);
        if (g * m + q < K) {
          S[kk][cbase + q] = static_cast<float>(values[j * N + k]);
        }
      }
    }
  }
}

template <typename scalar_t, bool kContract>
__global__ void __launch_bounds__(kThreads, 2)
    reconstruct_nm_kernel(const scalar_t* __restrict__ U,
                          const scalar_t* __restrict__ values,
                          const int32_t* __restrict__ indices,
                          scalar_t* __restrict__ out, int64_t d, int64_t K,
                          int64_t N, int64_t G, int n, int m) {
  __shared__ __align__(16) float As[kTileRed][kStrideA];  // A[row, red] as [red][row]
  __shared__ float Bs[kTileRed][kStrideB];                // Bm[red, col]

  const int64_t rows = kContract ? d : N;
  const int64_t cols = kContract ? K : d;
  const int64_t red = kContract ? N : K;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;

  float acc[kRowsPerThread][kColsPerThread];
#pragma unroll
  for (int a = 0; a < kRowsPerThread; ++a) {
#pragma unroll
    for (int b = 0; b < kColsPerThread; ++b) {
      acc[a][b] = 0.f;
    }
  }

  for (int64_t k0 = 0; k0 < red; k0 += kTileRed) {
    if constexpr (kContract) {
      load_u_tile<scalar_t, kStrideA>(As, U, d, N, row0, k0);
      decode_tile_contract<scalar_t, kStrideB>(Bs, values, indices, K, N, G, n,
                                               m, k0, col0);
    } else {
      decode_tile_expand<scalar_t, kStrideA>(As, values, indices, K, N, G, n, m,
                                             k0, row0);
      load_u_tile<scalar_t, kStrideB>(Bs, U, d, K, col0, k0);
    }
    __syncthreads();

#pragma unroll 8
    for (int kk = 0; kk < kTileRed; ++kk) {
      float a_frag[kRowsPerThread];
#pragma unroll
      for (int a = 0; a < kRowsPerThread; a += 4) {
        const float4 v =
            *reinterpret_cast<const float4*>(&As[kk][warp * kRowsPerThread + a]);
        a_frag[a + 0] = v.x;
        a_frag[a + 1] = v.y;
        a_frag[a + 2] = v.z;
        a_frag[a + 3] = v.w;
      }
      float b_frag[kColsPerThread];
#pragma unroll
      for (int b = 0; b < kColsPerThread; ++b) {
        b_frag[b] = Bs[kk][lane + 32 * b];
      }
#pragma unroll
      for (int a = 0; a < kRowsPerThread; ++a) {
#pragma unroll
        for (int b = 0; b < kColsPerThread; ++b) {
          acc[a][b] = fmaf(a_frag[a], b_frag[b], acc[a][b]);
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int a = 0; a < kRowsPerThread; ++a) {
    const int64_t row = row0 + warp * kRowsPerThread + a;
    if (row >= rows) {
      break;
    }
#pragma unroll
    for (int b = 0; b < kColsPerThread; ++b) {
      const int64_t col = col0 + lane + 32 * b;
      if (col < cols) {
        out[row * cols + col] = static_cast<scalar_t>(acc[a][b]);
      }
    }
  }
}

at::Tensor reconstruct_nm_cuda(const at::Tensor& U_, const at::Tensor& values_,
                               const at::Tensor& indices_, int64_t K, int64_t N,
                               int64_t n, int64_t m, bool contract) {
  TORCH_CHECK(U_.is_cuda(),
              "fips_kernels_cuda::reconstruct_nm (CUDA): expected CUDA tensors, got ",
              U_.device());
  const c10::cuda::CUDAGuard device_guard(U_.device());
  // Not ATen/cuda/CUDAContext.h (getDeviceProperties): it pulls in the
  // cuBLAS/cuSPARSE headers, which a minimal CUDA toolkit does not have.
  int cc_major = 0;
  int cc_minor = 0;
  const int device = static_cast<int>(U_.device().index());
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc_minor, cudaDevAttrComputeCapabilityMinor, device));
  TORCH_CHECK(cc_major >= 8,
              "fips_kernels_cuda::reconstruct_nm needs compute capability >= 8.0, got ",
              cc_major, ".", cc_minor);

  const ReconstructNmCall call = prepare_reconstruct_nm(U_, values_, indices_, K, N, n, m, contract);
  if (call.done) {
    return call.out;  // no launch with an empty grid or reduction
  }
  const at::Tensor& U = call.U;
  const at::Tensor& values = call.values;
  const at::Tensor& indices = call.indices;
  const at::Tensor& out = call.out;
  const int64_t d = call.d;

  const int64_t rows = contract ? d : N;
  const int64_t cols = contract ? K : d;
  const int64_t grid_y = (rows + kTileRows - 1) / kTileRows;
  const int64_t grid_x = (cols + kTileCols - 1) / kTileCols;
  TORCH_CHECK(grid_y <= 65535 && grid_x <= 2147483647LL,
              "fips_kernels_cuda::reconstruct_nm: output of ", rows, " x ", cols,
              " is too large for the launch grid (at most ", 65535 * kTileRows,
              " rows)");
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  const int64_t G = nm::num_groups(K, m);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  FIPS_DISPATCH_VALUE_TYPES(U.scalar_type(), "reconstruct_nm_cuda", [&] {
        const scalar_t* u = U.data_ptr<scalar_t>();
        const scalar_t* v = values.data_ptr<scalar_t>();
        const int32_t* idx = indices.data_ptr<int32_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        if (contract) {
          reconstruct_nm_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
              u, v, idx, o, d, K, N, G, static_cast<int>(n), static_cast<int>(m));
        } else {
          reconstruct_nm_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
              u, v, idx, o, d, K, N, G, static_cast<int>(n), static_cast<int>(m));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fips_kernels_cuda, CUDA, m) {
  m.impl("reconstruct_nm", &reconstruct_nm_cuda);
}

}  // namespace fips_kernels
