// fips_kernels_cuda::sparse_mm: argument checks, and the CPU implementation,
// which runs the CUDA kernel's block program (spmm_tile.h) thread by thread
// and warp by warp: the same 16-byte staging with zero fill, the same decode
// into the n-major tile, the same mma.sync fragment registers, handed to an
// emulated m16n8k16 written from the PTX fragment tables. The CPU tests of
// this op are therefore tests of the GPU kernel's indexing.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "sparse_mm.h"

namespace fips_kernels {

namespace {

constexpr const char* kOp = "fips_kernels_cuda::sparse_mm";

void expect_shape(const at::Tensor& t, const char* name, std::vector<int64_t> want,
                  const std::string& why) {
  TORCH_CHECK(t.sizes().vec() == want, kOp, ": ", name, " must have shape ",
              c10::IntArrayRef(want), " (", why, "), got ", t.sizes());
}

// cp.async reads 16-byte chunks from 16-byte aligned array starts: a view that
// starts mid-allocation is copied once (a fresh allocation is aligned).
at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

}  // namespace

namespace {

// The checks of one factor's tensors (`who`: "" for sparse_mm, "gate " / "up " for the gated op).
void check_factor(const at::Tensor& A, const FactorTensors& t, const std::string& who,
                  const std::string& fmt, int64_t K, int64_t N, int64_t n, int64_t m, int64_t qbits,
                  int64_t qgroup, bool transpose) {
  using namespace spmm;
  using spmm::cdiv;
  const auto st = A.scalar_type();
  auto same_device = [&](const at::Tensor& x, const std::string& name) {
    TORCH_CHECK(x.device() == A.device(), kOp, ": ", who, name, " is on ", x.device(),
                " but A is on ", A.device(), " (all tensors must be on one device)");
  };
  const at::Tensor& values = t.values;
  same_device(values, "values");
  const int vb = qbits ? static_cast<int>(qbits) : 16;
  if (qbits) {
    TORCH_CHECK(values.scalar_type() == at::kChar, kOp, ": ", who, "int", qbits,
                " values must be stored as int8, got ", values.scalar_type());
  } else {
    TORCH_CHECK(values.scalar_type() == st, kOp, ": ", who, "values dtype must match A (", st, "), got ",
                values.scalar_type());
  }
  auto packed_rows = [&](int64_t rows) { return vb == 4 ? cdiv(rows, 2) : rows; };
  if (fmt == "dense") {
    if (transpose) {
      expect_shape(values, (who + "values").c_str(), {N, K}, "a transposed dense factor stores (N, K)");
    } else {
      expect_shape(values, (who + "values").c_str(), {packed_rows(K), N},
                   vb == 4 ? "int4 dense: ceil(K/2) byte rows of N" : "dense: (K, N)");
    }
  } else if (fmt == "nm") {
    expect_shape(values, (who + "values").c_str(), {packed_rows(nm::values_rows(K, n, m)), N},
                 "nm: G*n stored rows of N, G = ceil(K/m)" +
                     std::string(vb == 4 ? ", int4 packs two rows per byte row" : ""));
    TORCH_CHECK(t.aux0.has_value(), kOp, ": the nm format needs ", who, "aux0 (the packed indices)");
    same_device(*t.aux0, "aux0 (indices)");
    TORCH_CHECK(t.aux0->scalar_type() == at::kInt, kOp, ": ", who, "nm indices must be int32, got ",
                t.aux0->scalar_type());
    expect_shape(*t.aux0, (who + "aux0 (indices)").c_str(), {nm::index_rows(K, n, m), N},
                 "ceil(G*n/P) words of N, P entries per int32 word");
  } else {
    TORCH_CHECK(t.aux0.has_value() && t.aux1.has_value(), kOp,
                ": the bitmap format needs ", who, "aux0 (bitmask) and aux1 (offsets)");
    same_device(*t.aux0, "aux0 (bitmask)");
    same_device(*t.aux1, "aux1 (offsets)");
    TORCH_CHECK(t.aux0->scalar_type() == at::kInt && t.aux1->scalar_type() == at::kInt, kOp, ": ", who,
                "bitmap bitmask and offsets must be int32, got ", t.aux0->scalar_type(), " and ",
                t.aux1->scalar_type());
    const int64_t T = cdiv(K, BK) * cdiv(N, BN);
    expect_shape(*t.aux0, (who + "aux0 (bitmask)").c_str(), {T, BK, BN / 32},
                 "one (64, 2) word mask per 64x64 tile");
    expect_shape(*t.aux1, (who + "aux1 (offsets)").c_str(), {T + 1}, "T + 1 value offsets");
    TORCH_CHECK(values.dim() == 1, kOp, ": ", who, "bitmap values must be 1-D, got ", values.sizes());
  }
  if (qbits) {
    TORCH_CHECK(t.scales.has_value(), kOp, ": ", who, "int", qbits, " values need scales");
    same_device(*t.scales, "scales");
    TORCH_CHECK(t.scales->scalar_type() == st, kOp, ": ", who, "scales dtype must match A (", st, "), got ",
                t.scales->scalar_type());
    if (transpose) {
      expect_shape(*t.scales, (who + "scales").c_str(), {cdiv(N, qgroup), K},
                   "transposed: (ceil(N/qgroup), K)");
    } else {
      expect_shape(*t.scales, (who + "scales").c_str(), {cdiv(K, qgroup), N}, "(ceil(K/qgroup), N)");
    }
  } else {
    TORCH_CHECK(!t.scales.has_value(), kOp, ": ", who, "scales given but qbits is 0");
  }
  if (t.bias.has_value()) {
    same_device(*t.bias, "bias");
    TORCH_CHECK(t.bias->scalar_type() == st, kOp, ": ", who, "bias dtype must match A (", st, "), got ",
                t.bias->scalar_type());
    expect_shape(*t.bias, (who + "bias").c_str(), {N}, "one per output column");
  }
}

// Points a Factor at (contiguous, aligned) copies of the tensors, kept alive by the call.
void fill_factor(SparseMMCall& call, spmm::Factor& f, const FactorTensors& t, bool bitmap) {
  const at::Tensor values = contiguous_aligned(t.values);
  call.keep.push_back(values);
  f.values = static_cast<const uint8_t*>(values.data_ptr());
  f.v_bytes = values.numel() * values.element_size();
  if (t.aux0.has_value()) {
    at::Tensor a0 = contiguous_aligned(*t.aux0);
    call.keep.push_back(a0);
    f.aux0 = a0.data_ptr<int32_t>();
    f.aux0_bytes = a0.numel() * 4;
  }
  if (t.aux1.has_value() && bitmap) {
    at::Tensor a1 = t.aux1->contiguous();
    call.keep.push_back(a1);
    f.aux1 = a1.data_ptr<int32_t>();
  }
  if (t.scales.has_value()) {
    at::Tensor sc = t.scales->contiguous();
    call.keep.push_back(sc);
    f.scales = static_cast<const uint16_t*>(sc.data_ptr());
  }
  if (t.bias.has_value()) {
    at::Tensor b = t.bias->contiguous();
    call.keep.push_back(b);
    f.bias = static_cast<const uint16_t*>(b.data_ptr());
  }
}

}  // namespace

SparseMMCall prepare_sparse_mm(const at::Tensor& A_, const FactorTensors& first, const FactorTensors* up,
                               c10::string_view fmt_, int64_t K, int64_t N, int64_t p0, int64_t p1,
                               int64_t qbits, int64_t qgroup, bool transpose, c10::string_view activation,
                               int64_t split_k, std::optional<at::ScalarType> out_dtype, int64_t sm_count) {
  using namespace spmm;
  using spmm::cdiv;
  const std::string fmt(fmt_.data(), fmt_.size());
  const std::string act(activation.data(), activation.size());
  SparseMMCall call;
  Params& p = call.p;

  TORCH_CHECK(fmt == "dense" || fmt == "nm" || fmt == "bitmap", kOp, ": format must be 'dense', ",
              "'nm' or 'bitmap' (csr and ell have no CUDA kernel), got '", fmt, "'");
  TORCH_CHECK(act == "none" || act == "gelu" || act == "silu", kOp,
              ": activation must be 'none', 'gelu' or 'silu', got '", act, "'");
  TORCH_CHECK(!transpose || fmt == "dense", kOp, ": transpose=True is only for the dense format, got '",
              fmt, "'");
  TORCH_CHECK(!(transpose && qbits == 4), kOp, ": a transposed dense factor cannot be int4");
  TORCH_CHECK(!(transpose && up), kOp, ": the gated op has no transposed form");
  TORCH_CHECK(K >= 0 && N >= 0, kOp, ": K and N must be >= 0, got K=", K, ", N=", N);
  TORCH_CHECK(A_.dim() == 2, kOp, ": A must be 2-D (M, K), got ", A_.dim(), "-D with shape ",
              A_.sizes());
  const auto st = A_.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16, kOp,
              ": A must be float16 or bfloat16 (the kernel runs fp16/bf16 tensor cores), got ", st);
  TORCH_CHECK(A_.size(1) == K, kOp, ": A must be (M, K) with K=", K, ", got ", A_.sizes());
  TORCH_CHECK(qbits == 0 || qbits == 8 || qbits == 4, kOp, ": qbits must be 0, 8 or 4, got ", qbits);
  TORCH_CHECK(qbits == 0 || qgroup >= 1, kOp, ": qgroup must be >= 1, got ", qgroup);
  TORCH_CHECK(split_k >= 0 && split_k <= MAX_SPLIT, kOp, ": split_k must be in 0..", MAX_SPLIT,
              " (0 = choose), got ", split_k);
  const at::ScalarType out_type = out_dtype.value_or(st);
  TORCH_CHECK(out_type == st || out_type == at::kFloat, kOp, ": out_dtype must be A's dtype (", st,
              ") or float32, got ", out_type);
  int64_t n = 1, m = 2;
  if (fmt == "nm") {
    n = p0;
    m = p1;
    TORCH_CHECK(nm::valid_m(m), kOp, ": nm m must be one of 2, 4, 8, 16, got m=", m);
    TORCH_CHECK(n >= 1 && n <= m, kOp, ": nm needs 1 <= n <= m, got ", n, ":", m);
  } else if (fmt == "bitmap") {
    TORCH_CHECK(p0 == BK && p1 == BN, kOp, ": the CUDA kernel reads bitmap tiles of (", BK, ", ", BN,
                ") only, got (", p0, ", ", p1, ")");
  }
  check_factor(A_, first, up ? "gate " : "", fmt, K, N, n, m, qbits, qgroup, transpose);
  if (up) check_factor(A_, *up, "up ", fmt, K, N, n, m, qbits, qgroup, transpose);

  const at::Tensor A = contiguous_aligned(A_);
  call.keep = {A};
  const int64_t M = A.size(0);
  call.out = at::empty({M, N}, A.options().dtype(out_type));
  call.bf16 = st == at::kBFloat16;

  p.A = static_cast<const uint8_t*>(A.data_ptr());
  p.M = M;
  p.K = K;
  p.N = N;
  fill_factor(call, p.f[0], first, fmt == "bitmap");
  p.gated = up ? 1 : 0;
  if (up) fill_factor(call, p.f[1], *up, fmt == "bitmap");
  p.out = call.out.data_ptr();
  p.fmt = fmt == "dense" ? kDense : fmt == "nm" ? kNM : kBitmap;
  p.n = static_cast<int>(n);
  p.m = static_cast<int>(m);
  p.qbits = static_cast<int>(qbits);
  p.qgroup = static_cast<int>(qbits ? qgroup : 1);
  p.transpose = transpose ? 1 : 0;
  p.act = up ? kSilu : act == "gelu" ? kGelu : act == "silu" ? kSilu : kNone;
  p.out_fp32 = out_type == at::kFloat ? 1 : 0;
  // Decode (M <= 16) fills one 16-row mma tile; larger M trades smem for reuse of each decoded B tile.
  // The gated kernel keeps two sets of accumulators, so it stops at 32 rows (register budget).
  p.bm = M <= 16 ? 16 : (M <= 32 || up) ? 32 : 64;

  call.grid_n = cdiv(N, BN);
  call.grid_m = cdiv(M, p.bm);
  TORCH_CHECK(call.grid_m <= 65535, kOp, ": M=", M, " rows need ", call.grid_m,
              " row blocks, above the grid limit of 65535 (split the batch)");
  const int64_t kbs = cdiv(K, BK);
  int64_t split = split_k;
  if (split == 0) {
    // Enough blocks for two waves over the multiprocessors, but at least
    // two K blocks per split so the cp.async ring has something to overlap.
    const int64_t tiles = std::max<int64_t>(1, call.grid_n * call.grid_m);
    split = std::min<int64_t>({cdiv(2 * std::max<int64_t>(sm_count, 1), tiles),
                               std::max<int64_t>(kbs / 2, 1), 16});
    split = std::max<int64_t>(split, 1);
  }
  const int64_t per = kbs == 0 ? 1 : cdiv(kbs, std::min(split, kbs));
  p.kb_per_split = static_cast<int>(per);
  p.split = static_cast<int>(kbs == 0 ? 1 : cdiv(kbs, per));
  if (p.split > 1 && M > 0 && N > 0) {
    call.ws = at::empty({(1 + p.gated) * p.split, M, N}, A.options().dtype(at::kFloat));
    p.ws = call.ws.data_ptr<float>();
  }
  return call;
}

namespace {

struct HalfCvt {
  static float to_float(uint16_t b) { return static_cast<float>(c10::Half(b, c10::Half::from_bits())); }
  static uint16_t from_float(float f) { return c10::Half(f).x; }
};

struct BF16Cvt {
  static float to_float(uint16_t b) {
    return static_cast<float>(c10::BFloat16(b, c10::BFloat16::from_bits()));
  }
  static uint16_t from_float(float f) { return c10::BFloat16(f).x; }
};

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d = A (16x16) . B (16x8) + c,
// reading each lane's registers by the PTX ISA's fragment tables.
template <typename Cvt>
void mma_m16n8k16(const uint32_t a[32][4], const uint32_t b[32][2], float c[32][4]) {
  float A[16][16], B[16][8];
  auto half = [](uint32_t r, int h) { return Cvt::to_float(static_cast<uint16_t>(h ? r >> 16 : r & 0xFFFF)); };
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = half(a[lane][0], h);
      A[g + 8][2 * t + h] = half(a[lane][1], h);
      A[g][2 * t + 8 + h] = half(a[lane][2], h);
      A[g + 8][2 * t + 8 + h] = half(a[lane][3], h);
      B[2 * t + h][g] = half(b[lane][0], h);
      B[2 * t + 8 + h][g] = half(b[lane][1], h);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      float s = 0.f;
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      c[lane][i] += s;
    }
  }
}

// One thread block of the CUDA kernel, in the kernel's order of operations.
template <typename Cvt>
void run_block(const spmm::Params& p, int64_t nb, int64_t mb, int z) {
  using namespace spmm;
  const Geom g = make_geom(p);
  std::vector<uint64_t> mem(static_cast<size_t>(smem_bytes(p) + 7) / 8);  // 16-byte alignment is
  uint8_t* smem = reinterpret_cast<uint8_t*>(mem.data());                  // not needed on the host
  const int nf = 1 + p.gated;  // factors: one decoded tile and one accumulator set each
  uint8_t* bs0 = smem + STAGES * g.stage_bytes;
  const int64_t m0 = mb * p.bm;
  const int MT = p.bm / 16;
  std::vector<float> acc(static_cast<size_t>(nf) * WARPS * 32 * MT * 2 * 4, 0.f);
  auto A_at = [&](int f, int w, int lane, int mt, int nt) {
    return &acc[((((f * WARPS + w) * 32 + lane) * MT + mt) * 2 + nt) * 4];
  };

  int64_t kb_begin, kb_end;
  split_range(p, z, &kb_begin, &kb_end);
  const int64_t nkb = std::max<int64_t>(kb_end - kb_begin, 0);
  const int slots = stage_slots(p, g);
  auto issue = [&](int s, int64_t kb) {
    for (int tid = 0; tid < THREADS; ++tid) {
      for (int slot = tid; slot < slots; slot += THREADS) {
        const Copy c = slot_copy(p, g, slot, kb, nb, m0, s * g.stage_bytes);
        if (!c.active) continue;
        memset(smem + c.dst, 0, CHUNK);
        if (c.bytes) memcpy(smem + c.dst, c.src, c.bytes);
      }
    }
  };
  for (int s = 0; s < STAGES - 1; ++s)
    if (s < nkb) issue(s, kb_begin + s);
  uint32_t a[32][4], b[32][2];
  float c[32][4];
  for (int64_t it = 0; it < nkb; ++it) {
    if (it + STAGES - 1 < nkb) issue(static_cast<int>((it + STAGES - 1) % STAGES), kb_begin + it + STAGES - 1);
    const int64_t kb = kb_begin + it;
    const uint8_t* stage = smem + (it % STAGES) * g.stage_bytes;
    for (int f = 0; f < nf; ++f)
      for (int tid = 0; tid < THREADS; ++tid) decode<Cvt>(p, g, stage, bs0 + f * BS_BYTES, tid, kb, nb, f);
    for (int w = 0; w < WARPS; ++w) {
      for (int ks = 0; ks < BK / 16; ++ks) {
        for (int mt = 0; mt < MT; ++mt) {
          for (int lane = 0; lane < 32; ++lane) load_a_frag(p, g, stage, lane, mt, ks, kb, m0, a[lane]);
          for (int f = 0; f < nf; ++f) {
            for (int nt = 0; nt < 2; ++nt) {
              for (int lane = 0; lane < 32; ++lane) {
                load_b_frag(bs0 + f * BS_BYTES, lane, w, nt, ks, b[lane]);
                memcpy(c[lane], A_at(f, w, lane, mt, nt), sizeof(c[lane]));
              }
              mma_m16n8k16<Cvt>(a, b, c);
              for (int lane = 0; lane < 32; ++lane) memcpy(A_at(f, w, lane, mt, nt), c[lane], sizeof(c[lane]));
            }
          }
        }
      }
    }
  }
  for (int w = 0; w < WARPS; ++w)
    for (int lane = 0; lane < 32; ++lane)
      for (int mt = 0; mt < MT; ++mt)
        for (int nt = 0; nt < 2; ++nt)
          for (int i = 0; i < 4; ++i) {
            int row, col;
            c_coord(lane, w, mt, nt, i, &row, &col);
            epilogue<Cvt>(p, m0 + row, nb * BN + col, z, A_at(0, w, lane, mt, nt)[i],
                          p.gated ? A_at(1, w, lane, mt, nt)[i] : 0.f);
          }
}

template <typename Cvt>
void run_all(const SparseMMCall& call) {
  const spmm::Params& p = call.p;
  const int64_t blocks = call.grid_n * call.grid_m * p.split;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t nb = blk % call.grid_n;
      const int64_t mb = (blk / call.grid_n) % call.grid_m;
      const int z = static_cast<int>(blk / (call.grid_n * call.grid_m));
      run_block<Cvt>(p, nb, mb, z);
    }
  });
  if (p.split > 1) {
    at::parallel_for(0, p.M * p.N, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) spmm::reduce_one<Cvt>(p, i);
    });
  }
}

at::Tensor run_cpu(const SparseMMCall& call) {
  if (call.out.numel() == 0) return call.out;
  if (call.bf16) {
    run_all<BF16Cvt>(call);
  } else {
    run_all<HalfCvt>(call);
  }
  return call.out;
}

// The CPU twin: 4 "multiprocessors", so small problems still exercise split-K in the CPU tests.
struct CpuDevice {
  struct Scope {
    int64_t sms = 4;
    explicit Scope(const at::Tensor& A) {
      TORCH_CHECK(A.device().is_cpu(), kOp, " (CPU): expected CPU tensors, got A on ", A.device());
    }
  };
  static at::Tensor run(const SparseMMCall& call, const Scope&) { return run_cpu(call); }
};

}  // namespace

TORCH_LIBRARY_IMPL(fips_kernels_cuda, CPU, m) {
  m.impl("sparse_mm", &sparse_mm_entry<CpuDevice>);
  m.impl("sparse_mm_gated", &sparse_mm_gated_entry<CpuDevice>);
}

}  // namespace fips_kernels
