// CUDA implementation of fips_kernels_cuda::sparse_mm: out = act(A . B + bias)
// with B a packed factor decompressed in shared memory, never in global memory.
//
// The block program (staging, decode, fragments, epilogue) is spmm_tile.h,
// shared with the CPU emulation in sparse_mm_host.cpp. This file adds what
// only a GPU has: the cp.async ring (16-byte chunks, zero-filled past an
// array's end), mma.sync m16n8k16 with fp32 accumulation, the barriers, and
// the launch (device guard, current stream, split-K reduction in a fixed
// order so results are bitwise reproducible). The workspace comes from the
// caching allocator, so the op can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>

#include "sparse_mm.h"

namespace fips_kernels {
namespace {

using namespace spmm;

struct HalfCvt {
  __host__ __device__ static float to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  __host__ __device__ static uint16_t from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

struct BF16Cvt {
  __host__ __device__ static float to_float(uint16_t b) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  }
  __host__ __device__ static uint16_t from_float(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

__device__ __forceinline__ void cp_async16(uint8_t* dst, const uint8_t* src, int bytes) {
#if __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if __CUDA_ARCH__ >= 800
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // the launcher refuses GPUs below sm80; a build without sm80 code never gets here
#endif
}

// MT = BM / 16 row tiles of 16 and NF = 1 + gated factors: template
// parameters so the accumulators stay in registers.
template <typename Cvt, bool BF16, int MT, int NF>
__global__ void __launch_bounds__(THREADS) sparse_mm_kernel(const Params p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const Geom g = make_geom(p);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t nb = blockIdx.x, m0 = static_cast<int64_t>(blockIdx.y) * p.bm;
  const int z = blockIdx.z;
  uint8_t* bs = smem + STAGES * g.stage_bytes;  // NF decoded tiles, BS_BYTES apart

  float acc[NF][MT][2][4];
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[f][mt][nt][i] = 0.f;

  int64_t kb_begin, kb_end;
  split_range(p, z, &kb_begin, &kb_end);
  const int64_t nkb = kb_end > kb_begin ? kb_end - kb_begin : 0;
  const int slots = stage_slots(p, g);
  auto issue = [&](int s, int64_t kb) {
    for (int slot = tid; slot < slots; slot += THREADS) {
      const Copy c = slot_copy(p, g, slot, kb, nb, m0, s * g.stage_bytes);
      if (c.active) cp_async16(smem + c.dst, c.src, c.bytes);
    }
  };

  // Prologue: STAGES - 1 K blocks in flight. Every iteration commits a group,
  // empty or not, so wait_group<STAGES - 2> always means "block it is here".
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nkb) issue(s, kb_begin + s);
    cp_async_commit();
  }
  for (int64_t it = 0; it < nkb; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage it landed for every thread; the previous mma is done with Bs
    if (it + STAGES - 1 < nkb)
      issue(static_cast<int>((it + STAGES - 1) % STAGES), kb_begin + it + STAGES - 1);
    cp_async_commit();
    const int64_t kb = kb_begin + it;
    const uint8_t* stage = smem + (it % STAGES) * g.stage_bytes;
#pragma unroll
    for (int f = 0; f < NF; ++f) decode<Cvt>(p, g, stage, bs + f * BS_BYTES, tid, kb, nb, f);
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      uint32_t b[NF][2][2];
#pragma unroll
      for (int f = 0; f < NF; ++f)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) load_b_frag(bs + f * BS_BYTES, lane, warp, nt, ks, b[f][nt]);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        uint32_t a[4];
        load_a_frag(p, g, stage, lane, mt, ks, kb, m0, a);
#pragma unroll
        for (int f = 0; f < NF; ++f)
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) mma16816<BF16>(acc[f][mt][nt], a, b[f][nt]);
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        int row, col;
        c_coord(lane, warp, mt, nt, i, &row, &col);
        epilogue<Cvt>(p, m0 + row, nb * BN + col, z, acc[0][mt][nt][i], acc[NF - 1][mt][nt][i]);
      }
}

template <typename Cvt>
__global__ void reduce_kernel(const Params p) {
  const int64_t total = p.M * p.N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    reduce_one<Cvt>(p, i);
}

// Device facts by attribute queries (cheap; ATen/cuda/CUDAContext.h would pull
// in cuSPARSE/cuBLAS headers that a bare toolkit may lack).
struct DeviceFacts {
  int major, minor, sms, smem_optin;
};

DeviceFacts device_facts(int device) {
  DeviceFacts f{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.minor, cudaDevAttrComputeCapabilityMinor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return f;
}

template <typename Cvt, bool BF16, int MT, int NF>
void launch_main(const SparseMMCall& call, int smem, const DeviceFacts& dev, cudaStream_t stream) {
  auto kernel = sparse_mm_kernel<Cvt, BF16, MT, NF>;
  if (smem > 48 * 1024) {
    TORCH_CHECK(smem <= dev.smem_optin, "fips_kernels_cuda::sparse_mm: needs ", smem,
                " bytes of shared memory per block, this GPU allows ", dev.smem_optin);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  const dim3 grid(static_cast<unsigned>(call.grid_n), static_cast<unsigned>(call.grid_m),
                  static_cast<unsigned>(call.p.split));
  kernel<<<grid, THREADS, smem, stream>>>(call.p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Cvt, bool BF16>
void launch(const SparseMMCall& call, const DeviceFacts& dev, cudaStream_t stream) {
  const int smem = smem_bytes(call.p);
  if (call.p.gated) {  // at most 32 rows per block (prepare_sparse_mm): two accumulator sets
    if (call.p.bm == 16) {
      launch_main<Cvt, BF16, 1, 2>(call, smem, dev, stream);
    } else {
      launch_main<Cvt, BF16, 2, 2>(call, smem, dev, stream);
    }
  } else {
    switch (call.p.bm) {
      case 16: launch_main<Cvt, BF16, 1, 1>(call, smem, dev, stream); break;
      case 32: launch_main<Cvt, BF16, 2, 1>(call, smem, dev, stream); break;
      default: launch_main<Cvt, BF16, 4, 1>(call, smem, dev, stream); break;
    }
  }
  if (call.p.split > 1) {
    const int64_t total = call.p.M * call.p.N;
    const int threads = 256;
    const int64_t want = (total + threads - 1) / threads;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(want, 65535));
    reduce_kernel<Cvt><<<blocks, threads, 0, stream>>>(call.p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Capability of A's device (the caller holds a device guard for A's device).
DeviceFacts checked_device(const at::Tensor& A) {
  const DeviceFacts dev = device_facts(A.device().index());
  TORCH_CHECK(dev.major >= 8, "fips_kernels_cuda::sparse_mm: needs compute capability 8.0 or newer ",
              "(cp.async, mma.sync bf16), device ", A.device().index(), " is ", dev.major, ".", dev.minor);
  return dev;
}

at::Tensor run_cuda(const SparseMMCall& call, const DeviceFacts& dev) {
  if (call.out.numel() == 0) return call.out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (call.bf16) {
    launch<BF16Cvt, true>(call, dev, stream);
  } else {
    launch<HalfCvt, false>(call, dev, stream);
  }
  return call.out;
}

const at::Tensor& cuda_input(const at::Tensor& A) {
  TORCH_CHECK(A.is_cuda(), "fips_kernels_cuda::sparse_mm (CUDA): A must be a CUDA tensor, got ", A.device());
  return A;
}

struct CudaDevice {
  struct Scope {
    const c10::cuda::CUDAGuard guard;  // A's device for the whole call
    const DeviceFacts dev;
    const int64_t sms;
    explicit Scope(const at::Tensor& A) : guard(cuda_input(A).device()), dev(checked_device(A)), sms(dev.sms) {}
  };
  static at::Tensor run(const SparseMMCall& call, const Scope& scope) { return run_cuda(call, scope.dev); }
};

}  // namespace

TORCH_LIBRARY_IMPL(fips_kernels_cuda, CUDA, m) {
  m.impl("sparse_mm", &sparse_mm_entry<CudaDevice>);
  m.impl("sparse_mm_gated", &sparse_mm_gated_entry<CudaDevice>);
}

}  // namespace fips_kernels
