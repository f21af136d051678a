// The block program of fips_kernels_cuda::sparse_mm: out = act(A · B + bias)
// with B (K x N) a packed factor (dense / nm / bitmap, float or int8/int4
// values) that is decompressed in shared memory and never written to global
// memory ("load as sparse, compute as dense").
//
// Everything here is a __host__ __device__ function of (thread, tile) so that
// the CPU implementation (sparse_mm_cpu.cpp) runs the *same* staging, decode,
// fragment and epilogue code as the CUDA kernel (sparse_mm.cu), one emulated
// thread or warp at a time; only cp.async, mma.sync and the barriers differ.
//
// One block: 4 warps, a BM x 64 output tile (BM = 16, 32, 64), K in blocks
// of 64. Per K block a stage holds the raw bytes of A's rows, the packed
// values (and nm index words / bitmap masks), copied by 16-byte cp.async
// chunks into a STAGES-deep ring; all threads then decode the stage into a
// dense n-major 64 x 64 tile Bs (fp16/bf16 bit patterns), and each warp runs
// mma.sync m16n8k16 over its 16 columns.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "nm_decode.h"

namespace fips_kernels {
namespace spmm {

constexpr int BK = 64;       // K block: whole N:M groups (m <= 16) and one bitmap tile row
constexpr int BN = 64;       // N block: one bitmap tile column; 16 columns per warp
constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;
constexpr int COLS_PER_WARP = BN / WARPS;  // 16 = two n8 mma tiles
constexpr int STAGES = 4;    // cp.async ring depth: three K blocks in flight while one is decoded
constexpr int CHUNK = 16;    // cp.async.cg size
// Decoded tile Bs is n-major (Bs[c][k]) so a B fragment register (two
// consecutive k of one column) is one aligned 32-bit load; the 8-half pad
// makes the 8 columns x 4 k-pairs of a fragment load hit 32 distinct banks.
constexpr int BS_PITCH = BK + 8;  // halves
constexpr int BS_BYTES = BN * BS_PITCH * 2;
constexpr int MAX_SPLIT = 64;

enum Fmt : int { kDense = 0, kNM = 1, kBitmap = 2 };
enum Act : int { kNone = 0, kGelu = 1, kSilu = 2 };

FIPS_NM_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
FIPS_NM_HD int round16(int64_t x) { return static_cast<int>((x + 15) & ~int64_t{15}); }

// One packed factor's arrays (device or host pointers).
struct Factor {
  const uint8_t* values;   // raw bytes of the factor's values
  int64_t v_bytes;         // size of the values allocation in bytes
  const int32_t* aux0;     // nm: indices; bitmap: bitmask
  int64_t aux0_bytes;
  const int32_t* aux1;     // bitmap: offsets (T + 1,)
  const uint16_t* scales;  // quantised: (ceil(K/qg), N) fp16/bf16 bits (transposed: (ceil(N/qg), K))
  const uint16_t* bias;    // (N,) fp16/bf16 bits or null
};

// Everything a block needs; plain data, passed by value to the kernel.
// Gated (Llama/Gemma gate and up): f[0] is the gate, f[1] the up factor, both
// with A's dtype, format, shape and pattern; out = silu(A·Bg + bg) * (A·Bu + bu).
struct Params {
  const uint8_t* A;        // (M, K) fp16/bf16, contiguous rows
  int64_t M, K, N;
  Factor f[2];
  void* out;               // (M, N) fp16/bf16 or fp32
  float* ws;               // split-K partials ((1 + gated) * split, M, N) fp32, or null
  int gated;
  int fmt, n, m, qbits, qgroup, transpose, act, out_fp32;
  int bm;                  // rows per block: 16, 32, 64
  int split;               // K splits (grid.z)
  int kb_per_split;        // K blocks per split
};

// Factor w (0 or 1) by a select rather than p.f[w]: a runtime index into the
// kernel's parameter struct would copy it to local memory.
FIPS_NM_HD Factor factor(const Params& p, int w) { return w ? p.f[1] : p.f[0]; }

// ---------------------------------------------------------------- stage layout

// Byte offsets of one stage's regions. Each region is `rows` rows of `pitch`
// bytes; a row holds a copied span whose start is rounded down to 16 bytes
// (cp.async needs 16-byte aligned source and destination), so the span's
// first byte sits at (start & 15) within its row.
// (Scalars, not arrays: a runtime index into a local or kernel-parameter
// array would put it in local memory on the GPU.)
struct Geom {
  int a_rows, a_pitch, a_off;
  int v_rows, v_pitch, v_off0;
  int i_rows, i_pitch, i_off0;  // nm index words, or the bitmap masks (one row)
  int f1;                       // factor 1's regions follow factor 0's, f1 bytes later
  int stage_bytes;
};

// Stage regions: 0 = A rows, 1 + 2w = values of factor w, 2 + 2w = its index words / masks.
FIPS_NM_HD int region_factor(int region) { return (region - 1) / 2; }
FIPS_NM_HD bool is_values(int region) { return region % 2 == 1; }

// Bits per stored value: 16 (fp16/bf16), 8 or 4.
FIPS_NM_HD int value_bits(const Params& p) { return p.qbits ? p.qbits : 16; }

// Stored nm rows per K block: (BK / m) groups of n.
FIPS_NM_HD int nm_rows_per_block(const Params& p) { return (BK / p.m) * p.n; }

// Bytes per column in a stored row of dense/nm values: int4 packs pairs along
// K (two rows per byte row), so a byte row still holds one byte per column.
FIPS_NM_HD int row_bytes_per_col(const Params& p) {
  const int vb = value_bits(p);
  return vb == 4 ? 1 : vb / 8;
}

FIPS_NM_HD Geom make_geom(const Params& p) {
  Geom g{};
  const int vb = value_bits(p);
  g.a_rows = p.bm;
  g.a_pitch = round16(BK * 2) + CHUNK;
  if (p.fmt == kDense && p.transpose) {  // stored (N, K): one row per output column
    g.v_rows = BN;
    g.v_pitch = round16(BK * vb / 8) + CHUNK;
  } else if (p.fmt == kDense) {  // (K, N), int4 packs two K rows per byte row
    g.v_rows = vb == 4 ? BK / 2 : BK;
    g.v_pitch = round16(BN * row_bytes_per_col(p)) + CHUNK;
  } else if (p.fmt == kNM) {
    const int J = nm_rows_per_block(p);  // even for m <= 16, so int4 rows pair up exactly
    g.v_rows = vb == 4 ? J / 2 : J;
    g.v_pitch = round16(BN * row_bytes_per_col(p)) + CHUNK;
    // j0 = (k0 / m) * n is a multiple of P except for m = 16 with odd n: one spare row.
    g.i_rows = static_cast<int>(cdiv(J, nm::entries_per_word(p.m))) + 1;
    g.i_pitch = round16(BN * 4) + CHUNK;
  } else {  // bitmap: the tile's values as one span, its 64 x 2 mask words as another
    g.v_rows = 1;
    g.v_pitch = round16(BK * BN * vb / 8) + 2 * CHUNK;
    g.i_rows = 1;
    g.i_pitch = BK * (BN / 32) * 4;
  }
  g.a_off = 0;
  int at = g.a_rows * g.a_pitch;
  const int per_factor = g.v_rows * g.v_pitch + g.i_rows * g.i_pitch;
  g.v_off0 = at;
  g.i_off0 = at + g.v_rows * g.v_pitch;
  g.stage_bytes = at + (1 + p.gated) * per_factor;
  g.f1 = per_factor;
  return g;
}

// Dynamic shared memory of a block: the stage ring, then one Bs per factor.
FIPS_NM_HD int smem_bytes(const Params& p) {
  return STAGES * make_geom(p).stage_bytes + (1 + p.gated) * BS_BYTES;
}

// ---------------------------------------------------------------- staging

// Where a region row's span lives in global memory.
struct Span {
  const uint8_t* base;  // allocation start (16-byte aligned)
  int64_t total;        // allocation bytes: chunks past it are zero-filled
  int64_t start;        // first byte of the span (from base)
  int64_t len;          // bytes wanted
};

// One cp.async: `bytes` (0..16) bytes from `src`, zero-filling the rest of
// the 16-byte destination chunk.
struct Copy {
  int dst;              // byte offset in the stage
  const uint8_t* src;
  int bytes;
  bool active;          // false: chunk past the span, nothing to do
};

FIPS_NM_HD Copy chunk_copy(const Span& s, int row_off, int ch) {
  Copy c{};
  const int64_t begin = s.start & ~int64_t{15};
  const int64_t need = (s.start - begin) + s.len;
  c.active = static_cast<int64_t>(ch) * CHUNK < need;
  if (!c.active) return c;
  const int64_t at = begin + static_cast<int64_t>(ch) * CHUNK;
  const int64_t left = s.total - at;
  c.bytes = left <= 0 ? 0 : left >= CHUNK ? CHUNK : static_cast<int>(left);
  c.src = c.bytes ? s.base + at : s.base;  // a zero-byte copy still names a valid address
  c.dst = row_off + ch * CHUNK;
  return c;
}

// Bitmap tile index and the values span [e0, e1) of stored elements.
FIPS_NM_HD int64_t bitmap_tile(const Params& p, int64_t kb, int64_t nb) {
  return kb * cdiv(p.N, BN) + nb;
}

// Span of region row `row` of stage for K block kb, column block nb.
FIPS_NM_HD Span region_span(const Params& p, int region, int row, int64_t kb, int64_t nb,
                            int64_t m0) {
  const int64_t k0 = kb * BK, n0 = nb * BN;
  const int vb = value_bits(p);
  Span s{};
  if (region == 0) {
    s.base = p.A;
    s.total = p.M * p.K * 2;
    s.start = ((m0 + row) * p.K + k0) * 2;
    s.len = BK * 2;
    return s;
  }
  const Factor f = factor(p, region_factor(region));
  if (is_values(region)) {
    s.base = f.values;
    s.total = f.v_bytes;
    if (p.fmt == kDense && p.transpose) {
      s.start = ((n0 + row) * p.K + k0) * vb / 8;
      s.len = BK * vb / 8;
    } else if (p.fmt == kDense || p.fmt == kNM) {
      // byte row of the stored values: K rows (dense) or G*n rows (nm); int4 halves them
      const int64_t row0 = p.fmt == kDense ? k0 : (k0 / p.m) * p.n;
      const int64_t brow = (vb == 4 ? row0 / 2 : row0) + row;
      s.start = (brow * p.N + n0) * row_bytes_per_col(p);
      s.len = BN * row_bytes_per_col(p);
    } else {
      const int64_t t = bitmap_tile(p, kb, nb);
      const int64_t e0 = f.aux1[t], e1 = f.aux1[t + 1];
      if (vb == 4) {
        s.start = e0 / 2;
        s.len = (e1 + 1) / 2 - e0 / 2;
      } else {
        s.start = e0 * (vb / 8);
        s.len = (e1 - e0) * (vb / 8);
      }
    }
    return s;
  }
  s.base = reinterpret_cast<const uint8_t*>(f.aux0);
  s.total = f.aux0_bytes;
  if (p.fmt == kNM) {
    const int64_t j0 = (k0 / p.m) * p.n;
    const int64_t wrow = j0 / nm::entries_per_word(p.m) + row;
    s.start = (wrow * p.N + n0) * 4;
    s.len = BN * 4;
  } else {  // bitmap masks of tile t: (BK, BN/32) words
    s.start = bitmap_tile(p, kb, nb) * (BK * (BN / 32)) * 4;
    s.len = BK * (BN / 32) * 4;
  }
  return s;
}

// Number of (region, row, chunk) slots of a stage; thread tid handles slots
// tid, tid + THREADS, ...
FIPS_NM_HD int stage_slots(const Params& p, const Geom& g) {
  return g.a_rows * (g.a_pitch / CHUNK) +
         (1 + p.gated) * (g.v_rows * (g.v_pitch / CHUNK) + g.i_rows * (g.i_pitch / CHUNK));
}

// Offset and pitch of a region in the stage.
FIPS_NM_HD int region_off(const Geom& g, int region) {
  return region == 0 ? g.a_off
                     : (is_values(region) ? g.v_off0 : g.i_off0) + region_factor(region) * g.f1;
}
FIPS_NM_HD int region_pitch(const Geom& g, int region) {
  return region == 0 ? g.a_pitch : is_values(region) ? g.v_pitch : g.i_pitch;
}

// The copy for slot `slot` of the stage of K block kb (stage memory at `stage_off`).
FIPS_NM_HD Copy slot_copy(const Params& p, const Geom& g, int slot, int64_t kb, int64_t nb,
                          int64_t m0, int stage_off) {
  const int a_slots = g.a_rows * (g.a_pitch / CHUNK);
  const int v_slots = g.v_rows * (g.v_pitch / CHUNK);
  const int f_slots = v_slots + g.i_rows * (g.i_pitch / CHUNK);
  int region;
  if (slot < a_slots) {
    region = 0;
  } else {
    slot -= a_slots;
    const int w = slot / f_slots;
    slot -= w * f_slots;
    if (slot < v_slots) {
      region = 1 + 2 * w;
    } else {
      slot -= v_slots;
      region = 2 + 2 * w;
    }
  }
  const int pitch = region_pitch(g, region), off = region_off(g, region);
  const int per_row = pitch / CHUNK;
  const int row = slot / per_row, ch = slot % per_row;
  if (region == 0 && m0 + row >= p.M) return Copy{};  // rows past M (15 of 16 at M = 1): a_elem reads 0
  return chunk_copy(region_span(p, region, row, kb, nb, m0), stage_off + off + row * pitch, ch);
}

// Byte offset (within the stage) of the first byte of a region row's span.
// region_span(...).start & 15, in 32-bit arithmetic (the decode and fragment
// loads ask for it per element; 64-bit multiplies cost several instructions
// on the GPU): products may wrap but keep their low bits, and every value
// divided is exact (< 2^32), so the result equals the 64-bit one.
FIPS_NM_HD int span_shift(const Params& p, int region, int row, uint32_t kb, uint32_t nb, uint32_t m0) {
  const uint32_t k0 = kb * BK, n0 = nb * BN;
  const uint32_t K = static_cast<uint32_t>(p.K), N = static_cast<uint32_t>(p.N);
  const uint32_t r = static_cast<uint32_t>(row);
  const int vb = value_bits(p);
  uint32_t start = 0;
  if (region == 0) {
    start = ((m0 + r) * K + k0) * 2u;
  } else if (is_values(region)) {
    if (p.fmt == kDense && p.transpose) {
      start = ((n0 + r) * K + k0) * static_cast<uint32_t>(vb / 8);
    } else if (p.fmt == kDense || p.fmt == kNM) {
      const uint32_t row0 = p.fmt == kDense ? k0 : (k0 / p.m) * p.n;
      const uint32_t brow = (vb == 4 ? row0 / 2 : row0) + r;
      start = (brow * N + n0) * static_cast<uint32_t>(row_bytes_per_col(p));
    } else {
      const uint32_t e0 = static_cast<uint32_t>(factor(p, region_factor(region)).aux1[bitmap_tile(p, kb, nb)]);
      start = vb == 4 ? e0 / 2 : e0 * static_cast<uint32_t>(vb / 8);
    }
  } else if (p.fmt == kNM) {
    const uint32_t j0 = (k0 / p.m) * p.n;
    start = ((j0 >> nm::log2_entries_per_word(p.m)) + r) * N * 4u + n0 * 4u;
  }  // bitmap masks: whole 512-byte tiles, always aligned
  return static_cast<int>(start & 15u);
}

FIPS_NM_HD int span_at(const Params& p, const Geom& g, int region, int row, int64_t kb,
                       int64_t nb, int64_t m0) {
  return region_off(g, region) + row * region_pitch(g, region) +
         span_shift(p, region, row, static_cast<uint32_t>(kb), static_cast<uint32_t>(nb),
                    static_cast<uint32_t>(m0));
}

// ---------------------------------------------------------------- decode

// Converts between fp32 and the 16-bit compute type (fp16 or bf16 bits).
// Cvt::to_float(uint16_t) and Cvt::from_float(float) are supplied by the
// CUDA and CPU sides (both round to nearest even).

// Loads and stores at addresses the callers keep naturally aligned. On the
// GPU a plain typed access (one LDS/STS); on the host memcpy (no aliasing UB).
template <typename T>
FIPS_NM_HD T ld(const uint8_t* at) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const T*>(at);
#else
  T v;
  memcpy(&v, at, sizeof(T));
  return v;
#endif
}

template <typename T>
FIPS_NM_HD void st(uint8_t* at, T v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<T*>(at) = v;
#else
  memcpy(at, &v, sizeof(T));
#endif
}

FIPS_NM_HD uint16_t load_u16(const uint8_t* s, int at) { return ld<uint16_t>(s + at); }
FIPS_NM_HD int32_t load_i32(const uint8_t* s, int at) { return ld<int32_t>(s + at); }

// Stored value at a byte offset, as the compute type's bits: a float value is
// copied bit for bit; a quantised one is q * scale rounded once (as the reference).
template <typename Cvt>
FIPS_NM_HD uint16_t value_bits_at(const Params& p, const uint16_t* scales, const uint8_t* stage,
                                  int at, int nibble, int64_t k, int64_t c) {
  if (p.qbits == 0) return load_u16(stage, at);
  int q;
  if (p.qbits == 8) {
    q = static_cast<int8_t>(stage[at]);
  } else {
    const int b = stage[at];
    const int nib = nibble ? (b >> 4) & 0xF : b & 0xF;
    q = nib - ((nib >> 3) << 4);
  }
  if (k >= p.K || c >= p.N) return 0;
  const int64_t srow = p.transpose ? c / p.qgroup : k / p.qgroup;
  const int64_t scol = p.transpose ? k : c;
  const int64_t sld = p.transpose ? p.K : p.N;
  const float s = Cvt::to_float(scales[srow * sld + scol]);
  return Cvt::from_float(static_cast<float>(q) * s);
}

FIPS_NM_HD void bs_store(uint8_t* bs, int c, int k, uint16_t v) {
  st<uint16_t>(bs + (c * BS_PITCH + k) * 2, v);
}

FIPS_NM_HD int popc32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  int n = 0;
  while (x) { x &= x - 1; ++n; }
  return n;
#endif
}

FIPS_NM_HD int popc64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __popcll(x);
#else
  return popc32(static_cast<uint32_t>(x)) + popc32(static_cast<uint32_t>(x >> 32));
#endif
}

// Thread tid's share of decoding factor w (0, or 1 = up of the gated form) of
// the stage of K block kb into its tile bs (all of it is written: zeros for
// pruned entries, rows k >= K and columns the tile lacks).
template <typename Cvt>
FIPS_NM_HD void decode(const Params& p, const Geom& g, const uint8_t* stage, uint8_t* bs,
                       int tid, int64_t kb, int64_t nb, int w) {
  const int vreg = 1 + 2 * w, ireg = 2 + 2 * w;  // this factor's stage regions
  const uint16_t* scales = factor(p, w).scales;
  const int64_t k0 = kb * BK, n0 = nb * BN;
  const int vb = value_bits(p);
  if (p.fmt == kDense) {
    // item -> (k, c) with k fastest: consecutive threads write consecutive halves of Bs
    for (int item = tid; item < BK * BN; item += THREADS) {
      const int kl = item % BK, cl = item / BK;
      const int64_t k = k0 + kl, c = n0 + cl;
      uint16_t v = 0;
      if (k < p.K) {
        if (p.transpose) {
          const int at = span_at(p, g, vreg, cl, kb, nb, 0) + kl * vb / 8;
          v = value_bits_at<Cvt>(p, scales, stage, at, 0, k, c);
        } else {
          const int row = vb == 4 ? kl / 2 : kl;
          const int at = span_at(p, g, vreg, row, kb, nb, 0) + cl * row_bytes_per_col(p);
          v = value_bits_at<Cvt>(p, scales, stage, at, kl & 1, k, c);
        }
      }
      bs_store(bs, cl, kl, v);
    }
  } else if (p.fmt == kNM) {
    const int groups = BK / p.m;
    const int bits = nm::bits_per_entry(p.m);
    const int shift = nm::log2_entries_per_word(p.m);
    const int64_t j0 = (k0 / p.m) * p.n;
    const int64_t w0 = j0 >> shift;
    for (int item = tid; item < groups * BN; item += THREADS) {
      const int gl = item / BN, cl = item % BN;
      const int64_t c = n0 + cl;
      // Zero the group's m rows, then scatter its n kept values: the same
      // thread does both, so no barrier, and no per-thread array (which the
      // GPU would place in local memory).
      for (int r = 0; r < p.m; ++r) bs_store(bs, cl, gl * p.m + r, 0);
      for (int t = 0; t < p.n; ++t) {
        const int jl = gl * p.n + t;
        const int64_t j = j0 + jl;
        const int wrow = static_cast<int>((j >> shift) - w0);
        const int32_t word = load_i32(stage, span_at(p, g, ireg, wrow, kb, nb, 0) + cl * 4);
        const int pos = nm::entry_of_word(word, static_cast<int>(j & ((1 << shift) - 1)), bits);
        const int row = vb == 4 ? jl / 2 : jl;
        const int at = span_at(p, g, vreg, row, kb, nb, 0) + cl * row_bytes_per_col(p);
        const int kl = gl * p.m + pos;
        if (k0 + kl < p.K) bs_store(bs, cl, kl, value_bits_at<Cvt>(p, scales, stage, at, jl & 1, k0 + kl, c));
      }
    }
  } else {
    // bitmap: one (row, 32-column word) per item; the tile's values are
    // stored row-major, so a row's first value follows all set bits of the
    // rows before it.
    constexpr int words = BN / 32;  // 2: the 64-bit row load below relies on it
    static_assert(BN == 64, "bitmap decode reads a tile row's mask as one 64-bit word");
    const int mask_at = g.i_off0 + w * g.f1;  // the mask span starts 16-byte aligned
    const int64_t t = bitmap_tile(p, kb, nb);
    const int64_t e0 = factor(p, w).aux1[t];
    const int v_at = span_at(p, g, vreg, 0, kb, nb, 0);
    for (int item = tid; item < BK * words; item += THREADS) {
      const int r = item / words, wd = item % words;  // row, mask word
      int before = 0;
      // a row's two mask words are one aligned 64-bit load
      for (int rr = 0; rr < r; ++rr) before += popc64(ld<uint64_t>(stage + mask_at + rr * 8));
      for (int ww = 0; ww < wd; ++ww)
        before += popc32(static_cast<uint32_t>(load_i32(stage, mask_at + (r * words + ww) * 4)));
      const uint32_t word = static_cast<uint32_t>(load_i32(stage, mask_at + (r * words + wd) * 4));
      const int64_t k = k0 + r;
      for (int b = 0; b < 32; ++b) {
        const int cl = wd * 32 + b;
        uint16_t v = 0;
        if ((word >> b) & 1u) {
          const int64_t e = e0 + before + popc32(word & ((1u << b) - 1u));  // b < 32
          int at;
          int nibble = 0;
          if (vb == 4) {
            at = v_at + static_cast<int>((e >> 1) - (e0 >> 1));
            nibble = static_cast<int>(e & 1);
          } else {
            at = v_at + static_cast<int>((e - e0) * (vb / 8));
          }
          v = k < p.K ? value_bits_at<Cvt>(p, scales, stage, at, nibble, k, n0 + cl) : uint16_t{0};
        }
        bs_store(bs, cl, r, v);
      }
    }
  }
}

// ---------------------------------------------------------------- fragments
// mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row): reg 0 (g, 2t..2t+1), reg 1 (g+8, 2t..), reg 2 (g, 2t+8..), reg 3 (g+8, 2t+8..)
//   B (16x8, col):  reg 0 (k 2t..2t+1, n g), reg 1 (k 2t+8..2t+9, n g)
//   C (16x8, f32):  c0, c1 (g, 2t, 2t+1), c2, c3 (g+8, 2t, 2t+1)
// The low half of a register holds the lower column (A) or k (B).

FIPS_NM_HD uint32_t pack2(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// A element (row i of the block, column kk of the K block) from the stage;
// columns past K read the next row's bytes, and rows past M are never staged,
// so both are masked to zero here.
FIPS_NM_HD uint16_t a_elem(const Params& p, const Geom& g, const uint8_t* stage, int i, int kk,
                           int64_t kb, int64_t m0) {
  if (kb * BK + kk >= p.K || m0 + i >= p.M) return 0;
  return load_u16(stage, span_at(p, g, 0, i, kb, 0, m0) + kk * 2);
}

FIPS_NM_HD void load_a_frag(const Params& p, const Geom& g, const uint8_t* stage, int lane,
                            int mt, int ks, int64_t kb, int64_t m0, uint32_t a[4]) {
  const int gi = lane >> 2, t = lane & 3;
  const int r0 = mt * 16 + gi, c0 = ks * 16 + 2 * t;
  a[0] = pack2(a_elem(p, g, stage, r0, c0, kb, m0), a_elem(p, g, stage, r0, c0 + 1, kb, m0));
  a[1] = pack2(a_elem(p, g, stage, r0 + 8, c0, kb, m0), a_elem(p, g, stage, r0 + 8, c0 + 1, kb, m0));
  a[2] = pack2(a_elem(p, g, stage, r0, c0 + 8, kb, m0), a_elem(p, g, stage, r0, c0 + 9, kb, m0));
  a[3] = pack2(a_elem(p, g, stage, r0 + 8, c0 + 8, kb, m0),
               a_elem(p, g, stage, r0 + 8, c0 + 9, kb, m0));
}

FIPS_NM_HD void load_b_frag(const uint8_t* bs, int lane, int warp, int nt, int ks, uint32_t b[2]) {
  const int c = warp * COLS_PER_WARP + nt * 8 + (lane >> 2);
  const int k = ks * 16 + 2 * (lane & 3);
  b[0] = ld<uint32_t>(bs + (c * BS_PITCH + k) * 2);
  b[1] = ld<uint32_t>(bs + (c * BS_PITCH + k + 8) * 2);
}

// Output coordinates of accumulator element i (0..3) of tile (mt, nt).
FIPS_NM_HD void c_coord(int lane, int warp, int mt, int nt, int i, int* row, int* col) {
  *row = mt * 16 + (lane >> 2) + (i >= 2 ? 8 : 0);
  *col = warp * COLS_PER_WARP + nt * 8 + 2 * (lane & 3) + (i & 1);
}

// ---------------------------------------------------------------- epilogue

FIPS_NM_HD float activate(float x, int act) {
  if (act == kGelu) return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
  if (act == kSilu) return x / (1.0f + expf(-x));
  return x;
}

// bias + activation (gated: silu(gate + bg) * (up + bu)) and the store.
template <typename Cvt>
FIPS_NM_HD void store_out(const Params& p, int64_t row, int64_t col, float acc, float acc_up) {
  float v = acc;
  if (p.f[0].bias) v += Cvt::to_float(p.f[0].bias[col]);
  v = activate(v, p.act);
  if (p.gated) {
    float u = acc_up;
    if (p.f[1].bias) u += Cvt::to_float(p.f[1].bias[col]);
    v *= u;
  }
  if (p.out_fp32) {
    static_cast<float*>(p.out)[row * p.N + col] = v;
  } else {
    static_cast<uint16_t*>(p.out)[row * p.N + col] = Cvt::from_float(v);
  }
}

// Accumulator element -> output (split == 1) or the split's fp32 partial.
// The up partials follow all gate partials: ws[(gated * split + split_idx), M, N].
template <typename Cvt>
FIPS_NM_HD void epilogue(const Params& p, int64_t row, int64_t col, int split_idx, float acc,
                         float acc_up) {
  if (row >= p.M || col >= p.N) return;
  if (p.split > 1) {
    p.ws[(static_cast<int64_t>(split_idx) * p.M + row) * p.N + col] = acc;
    if (p.gated) p.ws[(static_cast<int64_t>(p.split + split_idx) * p.M + row) * p.N + col] = acc_up;
  } else {
    store_out<Cvt>(p, row, col, acc, acc_up);
  }
}

// Fixed-order reduction of the split partials (bitwise reproducible).
template <typename Cvt>
FIPS_NM_HD void reduce_one(const Params& p, int64_t idx) {
  float acc = 0.f, acc_up = 0.f;
  for (int s = 0; s < p.split; ++s) acc += p.ws[s * p.M * p.N + idx];
  if (p.gated)
    for (int s = 0; s < p.split; ++s) acc_up += p.ws[(p.split + s) * p.M * p.N + idx];
  store_out<Cvt>(p, idx / p.N, idx % p.N, acc, acc_up);
}

// K blocks [kb_begin, kb_end) of split z.
FIPS_NM_HD void split_range(const Params& p, int z, int64_t* kb_begin, int64_t* kb_end) {
  const int64_t kbs = cdiv(p.K, BK);
  *kb_begin = static_cast<int64_t>(z) * p.kb_per_split;
  int64_t e = *kb_begin + p.kb_per_split;
  *kb_end = e < kbs ? e : kbs;
}

}  // namespace spmm
}  // namespace fips_kernels
