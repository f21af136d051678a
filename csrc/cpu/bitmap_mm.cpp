// fips_kernels._cpu: the CPU backend's kernels (torch.ops.fips_kernels_cpu), docs/CPU.md.
//
//   bitmap_mm(x, values, bitmask, offsets, scales, bias, K, N, tk, tn, qbits, qgroup, activation,
//             path="auto", isa="")
//     y (M × N, fp32) = act(x · B + bias) for x (M × K, fp32, contiguous) and B (K × N) a bitmap
//     factor (docs/FORMATS.md) read as stored: float32/fp16/bf16, int8 or int4 values with their
//     scales, the bitmask, the tile offsets. Nothing dense is built or kept: the resident bytes
//     stay the compressed bytes.
//   bitmap_to_dense(values, bitmask, offsets, scales, K, N, tk, tn, qbits, qgroup)
//     B decoded to fp32 (reconstruct, and the speed mode's one-time rebuild).
//
// Two ways to run bitmap_mm (`path`):
//   rows  few input rows, AVX-512 VBMI2, 64-column tiles: each stored row of a tile is expanded
//         into registers and multiplied densely into up to 6 input rows (bitmap_rows_avx512.h);
//   walk  otherwise: the per-value loops of bitmap_mm_body.h, compiled as AVX-512, AVX2+FMA and
//         baseline copies (`isa` forces one, for tests).
// "auto" takes rows up to kRowsKernelMaxRows input rows where it can, walk beyond.
// Built without CUDA (a CppExtension, setup.py) whenever torch is importable at install time.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

extern "C" {
PyMODINIT_FUNC PyInit__cpu(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_cpu",
      "fips_kernels CPU kernels (registered under torch.ops.fips_kernels_cpu)",
      -1, nullptr, nullptr, nullptr, nullptr, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

namespace fips_kernels_cpu {

enum class ValueKind { kFloat, kHalf, kBFloat16, kInt8, kInt4 };
enum Activation { kNone = 0, kGelu = 1, kSilu = 2 };

static inline float bits_to_float(uint32_t f) {
  float out;
  std::memcpy(&out, &f, sizeof(out));
  return out;
}

static inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

static inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 31) return bits_to_float(sign | 0x7F800000u | (mant << 13));
  if (exp != 0) return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);
  int shifts = 0;  // subnormal: normalise
  while (!(mant & 0x400u)) {
    mant <<= 1;
    ++shifts;
  }
  return bits_to_float(sign | static_cast<uint32_t>(113 - shifts) << 23 | ((mant & 0x3FFu) << 13));
}

static inline float activate(float v, int activation) {
  if (activation == kGelu) return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
  if (activation == kSilu) return v / (1.f + std::exp(-v));
  return v;
}

static inline float load_float(const void* p, ValueKind kind, int64_t i) {
  if (kind == ValueKind::kHalf) return half_to_float(static_cast<const uint16_t*>(p)[i]);
  if (kind == ValueKind::kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

struct BitmapArgs {
  const float* xT;  // (K × ldx), rows M..ldx zero
  int64_t ldx;
  float* y;         // (M × N)
  int64_t M, K, N, tk, tn, qgroup;
  const uint32_t* bitmask;
  const int32_t* offsets;
  ValueKind value_kind;
  const float* values_f32;
  const uint16_t* values_u16;
  const int8_t* values_i8;
  const void* scales;
  ValueKind scale_kind;
  const void* bias;
  ValueKind bias_kind;
  int activation;

  int64_t words, kt, nt;  // bitmask words per tile row; tiles down K and across N
  float scale(int64_t i) const { return load_float(scales, scale_kind, i); }
  float bias_at(int64_t i) const { return load_float(bias, bias_kind, i); }
  // columns of strip j (the last one may be narrower than tn)
  int64_t strip_cols(int64_t j) const { return N - j * tn < tn ? N - j * tn : tn; }
  // The epilogue of strip j for input rows m0 .. m0+rows: y[m0 + q, col0 + c] = act(src[c·ld_c + q·ld_q]
  // + bias[c]), written row by row (contiguous stores; the bias converted once per call of it).
  void store(int64_t j, int64_t m0, int64_t rows, const float* src, int64_t ld_c, int64_t ld_q) const {
    const int64_t col0 = j * tn, cols = strip_cols(j);
    float b[64];
    for (int64_t c = 0; c < cols; ++c) b[c] = bias ? bias_at(col0 + c) : 0.f;
    for (int64_t q = 0; q < rows; ++q) {
      float* dst = y + (m0 + q) * N + col0;
      const float* row = src + q * ld_q;
      if (activation == 0) {
        for (int64_t c = 0; c < cols; ++c) dst[c] = row[c * ld_c] + b[c];
      } else {
        for (int64_t c = 0; c < cols; ++c) dst[c] = activate(row[c * ld_c] + b[c], activation);
      }
    }
  }
  // strip j's scales in fp32, (groups × tn), zero past N
  void strip_scales(int64_t j, int64_t groups, float* out) const {
    const int64_t col0 = j * tn, cols = strip_cols(j);
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t c = 0; c < tn; ++c) out[g * tn + c] = c < cols ? scale(g * N + col0 + c) : 0.f;
  }
};

// Reduction rows per panel of the replayed column walk (entry_strip in bitmap_mm_body.h): a
// panel's xT rows (32 × 128 floats) stay in L1 while every column of the strip adds from them.
static constexpr int ENTRY_PANEL = 32;

// Per-thread scratch of one column strip (kt tiles × 64): see bitmap_mm_body.h.
struct TileScratch {
  uint64_t* colmask;
  uint64_t* rowmask;
  int64_t* rowstart;
  int64_t* rowscale;
  float* scales;
  float* acc;  // (tn × MC) partial sums
  int32_t* entry_count;  // entry_strip's list: per (K tile, panel, column) its entries
  int32_t* entry_row;    // per entry: its reduction row k (the xT row of a pass's block)
  float* entry_val;      // per entry: the dequantised value
  int64_t groups;
};

#define FIPS_VBYTES 16
namespace baseline {
#include "bitmap_mm_body.h"
}  // namespace baseline
#undef FIPS_VBYTES

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FIPS_CPU_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
#define FIPS_VBYTES 32
namespace avx2 {
#include "bitmap_mm_body.h"
}  // namespace avx2
#undef FIPS_VBYTES
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi,bmi2,popcnt,prefer-vector-width=512")
#define FIPS_VBYTES 64
namespace avx512 {
#include "bitmap_mm_body.h"
}  // namespace avx512
#undef FIPS_VBYTES
#pragma GCC pop_options
#include "bitmap_rows_avx512.h"
#endif

using ColumnsFn = void (*)(const BitmapArgs&, int64_t, int64_t);
using RowsFn = int64_t (*)(int64_t);

// The best copy this CPU runs: avx512, avx2 or baseline.
static const char* best_isa() {
#ifdef FIPS_CPU_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
      __builtin_cpu_supports("popcnt"))
    return "avx2";
#endif
  return "baseline";
}

static int isa_rank(const std::string& isa) { return isa == "avx512" ? 2 : isa == "avx2" ? 1 : 0; }

// The copy a call runs: the best one, or `requested` (tests compare the copies) if this CPU has it.
static const char* isa_name(const std::string& requested = "") {
  static const char* best = best_isa();
  if (requested.empty()) return best;
  TORCH_CHECK(requested == "avx512" || requested == "avx2" || requested == "baseline",
              "fips_kernels_cpu: isa must be '', 'avx512', 'avx2' or 'baseline', got '", requested, "'");
  TORCH_CHECK(isa_rank(requested) <= isa_rank(best), "fips_kernels_cpu: isa '", requested,
              "' is not available on this CPU (best: ", best, ")");
  return requested == "avx512" ? "avx512" : requested == "avx2" ? "avx2" : "baseline";
}

// The walk's entry points in one ISA copy.
struct IsaCopy {
  ColumnsFn columns;
  RowsFn rows_per_pass;
};

static IsaCopy isa_copy(const char* isa) {
#ifdef FIPS_CPU_MULTI_ISA
  if (std::strcmp(isa, "avx512") == 0) return {avx512::bitmap_mm_columns, avx512::rows_per_pass};
  if (std::strcmp(isa, "avx2") == 0) return {avx2::bitmap_mm_columns, avx2::rows_per_pass};
#endif
  return {baseline::bitmap_mm_columns, baseline::rows_per_pass};
}

#ifdef FIPS_CPU_MULTI_ISA
static bool has_vbmi2() {
  static const bool yes = __builtin_cpu_supports("avx512vbmi2");
  return yes;
}

// Up to this many input rows the AVX-512 row-expanding kernel (bitmap_rows_avx512.h) runs by
// default; beyond, the per-value loops (the crossover measured on Zen 4, docs/CPU.md).
constexpr int64_t kRowsKernelMaxRows = 64;
#endif

static ValueKind float_kind(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return ValueKind::kFloat;
    case at::kHalf: return ValueKind::kHalf;
    case at::kBFloat16: return ValueKind::kBFloat16;
    default:
      TORCH_CHECK(false, "fips_kernels_cpu::bitmap_mm: ", what, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

static void check_cpu_contiguous(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "fips_kernels_cpu::bitmap_mm: ", what, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "fips_kernels_cpu::bitmap_mm: ", what, " must be contiguous");
}

// x (M × K) → (passes × K × mc): pass p holds rows p·mc .. p·mc+mc of x transposed, rows past M zero.
// In blocks of 64 reduction rows, so that the 64 destination lines a source row spreads over stay in L1.
static void pack_passes(const float* x, float* out, int64_t M, int64_t K, int64_t mc) {
  const int64_t passes = (M + mc - 1) / mc;
  at::parallel_for(0, passes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t rows = M - p * mc < mc ? M - p * mc : mc;
      float* dst = out + p * K * mc;
      for (int64_t k0 = 0; k0 < K; k0 += 64) {
        const int64_t k1 = k0 + 64 < K ? k0 + 64 : K;
        for (int64_t q = 0; q < mc; ++q) {
          if (q < rows) {
            const float* src = x + (p * mc + q) * K;
            for (int64_t k = k0; k < k1; ++k) dst[k * mc + q] = src[k];
          } else {
            for (int64_t k = k0; k < k1; ++k) dst[k * mc + q] = 0.f;
          }
        }
      }
    }
  });
}

// Checks every argument of bitmap_mm / bitmap_to_dense and returns them as raw pointers.
static BitmapArgs bitmap_args(const char* op, const at::Tensor& x, const at::Tensor& values,
                              const at::Tensor& bitmask, const at::Tensor& offsets,
                              const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& bias,
                              int64_t K, int64_t N, int64_t tk, int64_t tn, int64_t qbits, int64_t qgroup,
                              int64_t activation) {
  TORCH_CHECK(K >= 0 && N >= 0, op, ": K and N must be >= 0, got K=", K, ", N=", N);
  TORCH_CHECK(tk >= 1 && tk <= 64 && (tn == 32 || tn == 64), op,
              ": the CPU kernel takes tiles of 1..64 rows and 32 or 64 columns, got (", tk, ", ", tn, ")");
  TORCH_CHECK(activation >= 0 && activation <= 2, op, ": activation must be 0 (none), 1 (gelu) or 2 (silu), got ",
              activation);
  check_cpu_contiguous(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K, op,
              ": x must be float32 (M × K=", K, "), got ", x.scalar_type(), " ", x.sizes());
  const int64_t M = x.size(0);
  const int64_t kt = (K + tk - 1) / tk, nt = (N + tn - 1) / tn;
  check_cpu_contiguous(bitmask, "bitmask");
  check_cpu_contiguous(offsets, "offsets");
  check_cpu_contiguous(values, "values");
  TORCH_CHECK(bitmask.scalar_type() == at::kInt && bitmask.dim() == 3 && bitmask.size(0) == kt * nt &&
                  bitmask.size(1) == tk && bitmask.size(2) == tn / 32,
              op, ": bitmask must be int32 (", kt * nt, ", ", tk, ", ", tn / 32, "), got ", bitmask.scalar_type(),
              " ", bitmask.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.dim() == 1 && offsets.size(0) == kt * nt + 1, op,
              ": offsets must be int32 (", kt * nt + 1, ",), got ", offsets.scalar_type(), " ", offsets.sizes());
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D, got ", values.sizes());
  BitmapArgs a{};
  a.M = M, a.K = K, a.N = N, a.tk = tk, a.tn = tn, a.qgroup = qgroup > 0 ? qgroup : 1;
  a.words = tn / 32, a.kt = kt, a.nt = nt;
  a.activation = static_cast<int>(activation);
  int64_t capacity = values.size(0);
  if (qbits == 0) {
    a.value_kind = float_kind(values, "values");
    if (a.value_kind == ValueKind::kFloat) a.values_f32 = values.data_ptr<float>();
    else a.values_u16 = static_cast<const uint16_t*>(values.data_ptr());
    TORCH_CHECK(!scales.has_value(), op, ": scales are given but qbits is 0 (float values)");
  } else {
    TORCH_CHECK(qbits == 8 || qbits == 4, op, ": qbits must be 0, 8 or 4, got ", qbits);
    TORCH_CHECK(qgroup >= 1, op, ": qgroup must be >= 1, got ", qgroup);
    TORCH_CHECK(values.scalar_type() == at::kChar, op, ": int", qbits, " values must be stored as int8, got ",
                values.scalar_type());
    a.value_kind = qbits == 8 ? ValueKind::kInt8 : ValueKind::kInt4;
    a.values_i8 = values.data_ptr<int8_t>();
    if (qbits == 4) capacity *= 2;
    TORCH_CHECK(scales.has_value(), op, ": int", qbits, " values need scales");
    const at::Tensor& s = *scales;
    check_cpu_contiguous(s, "scales");
    const int64_t groups = (K + qgroup - 1) / qgroup;
    TORCH_CHECK(s.dim() == 2 && s.size(0) == groups && s.size(1) == N, op, ": scales must be (", groups, ", ", N,
                "), got ", s.sizes());
    a.scale_kind = float_kind(s, "scales");
    a.scales = s.data_ptr();
  }
  if (bias.has_value()) {
    check_cpu_contiguous(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be (", N, ",), got ", bias->sizes());
    a.bias_kind = float_kind(*bias, "bias");
    a.bias = bias->data_ptr();
  }
  const int32_t* off = offsets.data_ptr<int32_t>();
  TORCH_CHECK(kt * nt == 0 || (off[0] == 0 && off[kt * nt] <= capacity), op,
              ": offsets must start at 0 and end within the ", capacity, " stored values, got ", off[0], " and ",
              off[kt * nt]);
  a.bitmask = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  a.offsets = off;
  return a;
}

at::Tensor bitmap_mm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                     const at::Tensor& offsets, const std::optional<at::Tensor>& scales,
                     const std::optional<at::Tensor>& bias, int64_t K, int64_t N, int64_t tk, int64_t tn,
                     int64_t qbits, int64_t qgroup, int64_t activation, const std::string& path,
                     const std::string& isa) {
  TORCH_CHECK(path == "auto" || path == "rows" || path == "walk", "fips_kernels_cpu::bitmap_mm: path must be "
              "'auto', 'rows' or 'walk', got '", path, "'");
  const char* copy = isa_name(isa);
  BitmapArgs a = bitmap_args("fips_kernels_cpu::bitmap_mm", x, values, bitmask, offsets, scales, bias, K, N, tk,
                             tn, qbits, qgroup, activation);
  const int64_t M = x.size(0);
  const int64_t nt = (N + tn - 1) / tn;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  a.y = y.data_ptr<float>();
  bool rows_ok = false;
  const char* rows_why = "this build has no AVX-512 code (GCC on x86-64 only)";
#ifdef FIPS_CPU_MULTI_ISA
  rows_ok = std::strcmp(copy, "avx512") == 0 && has_vbmi2() && tn == 64 && a.value_kind != ValueKind::kInt4;
  rows_why = "it needs AVX-512 VBMI2, 64-column tiles and float, fp16, bf16 or int8 values";
  if (rows_ok && (path == "rows" || (path == "auto" && M <= kRowsKernelMaxRows))) {
    const float* xp = x.data_ptr<float>();
    at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) { avx512rows::columns(a, xp, begin, end); });
    return y;
  }
#endif
  TORCH_CHECK(path != "rows" || rows_ok, "fips_kernels_cpu::bitmap_mm: path 'rows' cannot run: ", rows_why);
  // xT packed pass by pass: (passes × K × MC), rows past M zero (see bitmap_mm_body.h)
  const IsaCopy fns = isa_copy(copy);
  const int64_t mc = fns.rows_per_pass(M);
  const int64_t passes = (M + mc - 1) / mc;
  at::Tensor packed = at::empty({passes, K, mc}, x.options());
  pack_passes(x.data_ptr<float>(), packed.data_ptr<float>(), M, K, mc);
  a.ldx = mc;
  a.xT = packed.data_ptr<float>();
  const ColumnsFn columns = fns.columns;
  // one column tile costs about nnz(tile column) · M FMAs: a grain of one tile keeps threads busy
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) { columns(a, begin, end); });
  return y;
}

// bitmap_to_dense: the factor decoded to fp32 (K × N), dequantised. The CPU backend's path for
// few input rows, where one pass of scalar decoding plus torch's dense GEMM beats the per-value
// loop of bitmap_mm; the result is a per-call workspace, never kept (docs/CPU.md).
template <typename LoadValue>
static void decode_tiles(const BitmapArgs& a, float* out, int64_t t_begin, int64_t t_end, LoadValue load_value) {
  const int64_t words = a.tn / 32, nt = (a.N + a.tn - 1) / a.tn;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t ti = t / nt, tj = t % nt;
    const uint32_t* mask = a.bitmask + t * a.tk * words;
    int64_t pos = a.offsets[t];
    for (int64_t kk = 0; kk < a.tk; ++kk) {
      const int64_t k = ti * a.tk + kk;
      if (k >= a.K) break;
      float* row = out + k * a.N + tj * a.tn;
      const int64_t srow = (k / a.qgroup) * a.N + tj * a.tn;
      for (int64_t w = 0; w < words; ++w) {
        uint32_t bits = static_cast<uint32_t>(mask[kk * words + w]);
        while (bits) {
          const int64_t c = w * 32 + __builtin_ctz(bits);
          bits &= bits - 1;
          float v = load_value(pos++);
          if (a.scales) v *= a.scale(srow + c);
          row[c] = v;
        }
      }
    }
  }
}

at::Tensor bitmap_to_dense(const at::Tensor& values, const at::Tensor& bitmask, const at::Tensor& offsets,
                           const std::optional<at::Tensor>& scales, int64_t K, int64_t N, int64_t tk, int64_t tn,
                           int64_t qbits, int64_t qgroup) {
  at::Tensor x = at::empty({0, K}, at::TensorOptions().dtype(at::kFloat));  // no input rows: checks only
  BitmapArgs a = bitmap_args("fips_kernels_cpu::bitmap_to_dense", x, values, bitmask, offsets, scales, {}, K, N,
                             tk, tn, qbits, qgroup, 0);
  at::Tensor out = at::zeros({K, N}, x.options());
  const int64_t tiles = ((K + tk - 1) / tk) * ((N + tn - 1) / tn);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    switch (a.value_kind) {
      case ValueKind::kFloat: decode_tiles(a, o, begin, end, [&](int64_t p) { return a.values_f32[p]; }); break;
      case ValueKind::kHalf:
        decode_tiles(a, o, begin, end, [&](int64_t p) { return half_to_float(a.values_u16[p]); });
        break;
      case ValueKind::kBFloat16:
        decode_tiles(a, o, begin, end, [&](int64_t p) { return bf16_to_float(a.values_u16[p]); });
        break;
      case ValueKind::kInt8:
        decode_tiles(a, o, begin, end, [&](int64_t p) { return static_cast<float>(a.values_i8[p]); });
        break;
      case ValueKind::kInt4:
        decode_tiles(a, o, begin, end, [&](int64_t p) {
          const int byte = a.values_i8[p >> 1];
          const int nib = (p & 1) ? ((byte >> 4) & 0xF) : (byte & 0xF);
          return static_cast<float>(nib >= 8 ? nib - 16 : nib);
        });
        break;
    }
  });
  return out;
}

std::string isa() { return isa_name(); }

bool has_rows_kernel() {
#ifdef FIPS_CPU_MULTI_ISA
  return std::strcmp(isa_name(), "avx512") == 0 && has_vbmi2();
#else
  return false;
#endif
}

}  // namespace fips_kernels_cpu

TORCH_LIBRARY(fips_kernels_cpu, m) {
  m.def("bitmap_mm(Tensor x, Tensor values, Tensor bitmask, Tensor offsets, Tensor? scales, Tensor? bias, "
        "int K, int N, int tk, int tn, int qbits, int qgroup, int activation, str path=\"auto\", str isa=\"\") "
        "-> Tensor");
  m.def("bitmap_to_dense(Tensor values, Tensor bitmask, Tensor offsets, Tensor? scales, int K, int N, int tk, "
        "int tn, int qbits, int qgroup) -> Tensor");
  m.def("isa() -> str", &fips_kernels_cpu::isa);
  m.def("has_rows_kernel() -> bool", &fips_kernels_cpu::has_rows_kernel);
}

TORCH_LIBRARY_IMPL(fips_kernels_cpu, CPU, m) {
  m.impl("bitmap_mm", &fips_kernels_cpu::bitmap_mm);
  m.impl("bitmap_to_dense", &fips_kernels_cpu::bitmap_to_dense);
}
