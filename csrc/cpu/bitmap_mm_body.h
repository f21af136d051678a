// The inner loops of fips_kernels_cpu::bitmap_mm, included once per instruction set by
// bitmap_mm.cpp, each time in its own namespace under its own `#pragma GCC target` and with
// FIPS_VBYTES (the vector width in bytes) defined, so one binary carries an AVX-512, an AVX2
// and a baseline copy. GCC vector extensions only, no intrinsics and no std templates (a std
// template instantiated here would share its symbol with the other copies' and the linker
// would keep one of them, possibly for the wrong CPU).
//
// Loop order, per column tile (tile columns ≤ 64, tile rows ≤ 64):
//   1. per K tile: transpose the row-major bitmask into one 64-bit mask per column, and keep
//      each row's first value index (prefix popcounts): a stored value's index is then
//      offset + row_start[k] + popcount(row_mask[k] below column c);
//   2. per pass of MC input rows (MC = NV vectors, up to 8), per panel of reduction rows, per
//      column: walk the column's set bits in the panel, accumulating value · xT[k, rows] in
//      registers (the xT panel stays in L1); then bias, activation and the transposed store
//      into y (M × N). (Working the positions and values out once per call into a list, for
//      all passes, measured slower up to M = 128 and ~10 % faster at 640 rows: not kept.)

static constexpr int LANES = FIPS_VBYTES / 4;
typedef float vfloat __attribute__((vector_size(FIPS_VBYTES)));

static inline vfloat vload(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// Vectors per pass for M input rows: the fewest of 1, 2, 4, 8 that cover M (8 beyond).
static int64_t vectors_per_pass(int64_t M) {
  const int64_t v = (M + LANES - 1) / LANES;
  return v <= 1 ? 1 : v <= 2 ? 2 : v <= 4 ? 4 : 8;
}

static int64_t rows_per_pass(int64_t M) { return vectors_per_pass(M) * LANES; }

template <int NV, int QBITS, typename LoadValue>
static void column_strip(const BitmapArgs& a, int64_t j, TileScratch& s,
                         LoadValue load_value) {
  constexpr int MC = NV * LANES;
  const int64_t words = a.words, kt = a.kt, nt = a.nt;
  const int64_t cols = a.strip_cols(j);
  // step 1: the strip's column masks, row masks and row starts (kt × 64 each)
  for (int64_t ti = 0; ti < kt; ++ti) {
    const int64_t t = ti * nt + j;
    const uint32_t* mask = a.bitmask + t * a.tk * words;
    uint64_t* colmask = s.colmask + ti * 64;
    uint64_t* rowmask = s.rowmask + ti * 64;
    int64_t* rowstart = s.rowstart + ti * 64;
    int64_t* rowscale = s.rowscale + ti * 64;
    for (int c = 0; c < 64; ++c) colmask[c] = 0;
    int64_t pos = a.offsets[t];
    for (int64_t kk = 0; kk < a.tk; ++kk) {
      uint64_t row = mask[kk * words];
      if (words > 1) row |= static_cast<uint64_t>(mask[kk * words + 1]) << 32;
      rowmask[kk] = row;
      rowstart[kk] = pos;
      rowscale[kk] = QBITS ? ((ti * a.tk + kk) / a.qgroup) * a.tn : 0;
      pos += __builtin_popcountll(row);
      while (row) {
        colmask[__builtin_ctzll(row)] |= 1ull << kk;
        row &= row - 1;
      }
    }
  }
  if (QBITS) a.strip_scales(j, s.groups, s.scales);
  // step 2. Accumulators: NV vectors per slot, SLOTS slots taken in turn by consecutive stored
  // values, so that at least four independent FMA chains hide the FMA latency. The reduction
  // axis is walked in panels of up to 32 rows, so that the panel of xT (32 × MC floats) stays
  // in L1; each column's partial sums go to a (tn × MC) buffer between panels.
  constexpr int SLOTS = NV >= 4 ? 1 : 4 / NV;
  // panel rows: the xT panel (rows × MC floats) and the partial sums (tn × MC) share L1 (16
  // rows at 128 columns measured no faster)
  constexpr int PANEL = 32;
  const int64_t halves = (a.tk + PANEL - 1) / PANEL;
  for (int64_t m0 = 0; m0 < a.M; m0 += MC) {
    const int64_t mc = (a.M - m0) < MC ? (a.M - m0) : MC;
    for (int64_t i = 0; i < cols * MC; ++i) s.acc[i] = 0.f;
    const float* xcol = a.xT + (m0 / MC) * a.K * MC;  // this pass's packed (K × MC) block
    for (int64_t ti = 0; ti < kt; ++ti) {
      const uint64_t* rowmask = s.rowmask + ti * 64;
      const int64_t* rowstart = s.rowstart + ti * 64;
      const int64_t* rowscale = s.rowscale + ti * 64;
      const float* xtile = xcol + ti * a.tk * MC;
      for (int64_t half = 0; half < halves; ++half) {
        const uint64_t panel = halves == 1 ? ~0ull : ((~0ull >> (64 - PANEL)) << (half * PANEL));
        for (int64_t c = 0; c < cols; ++c) {
          uint64_t bits = s.colmask[ti * 64 + c] & panel;
          if (!bits) continue;
          const uint64_t below = c ? (~0ull >> (64 - c)) : 0ull;
          float* accmem = s.acc + c * MC;
          vfloat acc[NV * SLOTS];
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[v] = vload(accmem + v * LANES);
#pragma GCC unroll 16
          for (int v = NV; v < NV * SLOTS; ++v) acc[v] = vfloat{};
          while (bits) {
#pragma GCC unroll 4
            for (int slot = 0; slot < SLOTS; ++slot) {
              if (slot > 0 && !bits) break;
              const int kk = __builtin_ctzll(bits);
              bits &= bits - 1;
              float value = load_value(rowstart[kk] + __builtin_popcountll(rowmask[kk] & below));
              if (QBITS) value *= s.scales[rowscale[kk] + c];
              const float* xrow = xtile + kk * MC;
#pragma GCC unroll 16
              for (int v = 0; v < NV; ++v) acc[slot * NV + v] += value * vload(xrow + v * LANES);
            }
          }
#pragma GCC unroll 4
          for (int slot = 1; slot < SLOTS; ++slot)
#pragma GCC unroll 16
            for (int v = 0; v < NV; ++v) acc[v] += acc[slot * NV + v];
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) __builtin_memcpy(accmem + v * LANES, &acc[v], sizeof(vfloat));
        }
      }
    }
    a.store(j, m0, mc, s.acc, MC, 1);  // epilogue: bias, activation, the transposed store
  }
}

// Few input rows (one or two vectors per pass): walk the stored values in their own order (row
// by row inside a tile, no bit transposition, no position arithmetic) and add value · xT[k, rows]
// into the column's L1-resident partial sums. Per stored value this is ~10 instructions against
// ~20 for the column walk, whose register accumulation only pays off with more rows per pass.
template <int NV, int QBITS, typename LoadValue>
static void row_walk_strip(const BitmapArgs& a, int64_t j, TileScratch& s,
                           LoadValue load_value) {
  if (QBITS) a.strip_scales(j, s.groups, s.scales);
  constexpr int MC = NV * LANES;
  for (int64_t m0 = 0; m0 < a.M; m0 += MC) {
    const int64_t mc = (a.M - m0) < MC ? (a.M - m0) : MC;
    for (int64_t i = 0; i < a.tn * MC; ++i) s.acc[i] = 0.f;
    const float* xblock = a.xT + (m0 / MC) * a.K * MC;
    for (int64_t ti = 0; ti < a.kt; ++ti) {
      const int64_t t = ti * a.nt + j;
      const uint32_t* mask = a.bitmask + t * a.tk * a.words;
      int64_t pos = a.offsets[t];
      for (int64_t kk = 0; kk < a.tk; ++kk) {
        const int64_t k = ti * a.tk + kk;
        if (k >= a.K) break;
        vfloat xv[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) xv[v] = vload(xblock + k * MC + v * LANES);
        const float* srow = QBITS ? s.scales + (k / a.qgroup) * a.tn : nullptr;
        for (int64_t w = 0; w < a.words; ++w) {
          uint32_t bits = mask[kk * a.words + w];
          while (bits) {
            const int64_t c = w * 32 + __builtin_ctz(bits);
            bits &= bits - 1;
            float value = load_value(pos++);
            if (QBITS) value *= srow[c];
            float* accmem = s.acc + c * MC;
#pragma GCC unroll 16
            for (int v = 0; v < NV; ++v) {
              vfloat acc = vload(accmem + v * LANES) + value * xv[v];
              __builtin_memcpy(accmem + v * LANES, &acc, sizeof(vfloat));
            }
          }
        }
      }
    }
    a.store(j, m0, mc, s.acc, MC, 1);
  }
}

template <int QBITS, typename LoadValue>
static void columns_by_width(const BitmapArgs& a, int64_t j_begin, int64_t j_end, LoadValue load_value) {
  // MC (input rows per pass, rows_per_pass): xT comes packed as (passes × K × MC), rows past M
  // zero, so a partial pass computes and drops them, and a pass's panel is contiguous (a
  // power-of-two row stride would map a panel's rows onto few L1 sets).
  const int64_t kt = a.kt;
  const int64_t groups = QBITS ? (a.K + a.qgroup - 1) / a.qgroup : 0;
  TileScratch s;
  s.colmask = new uint64_t[kt * 64 + 1];
  s.rowmask = new uint64_t[kt * 64 + 1];
  s.rowstart = new int64_t[kt * 64 + 1];
  s.rowscale = new int64_t[kt * 64 + 1];
  s.scales = new float[groups * a.tn + 1];
  s.groups = groups;
  s.acc = new float[a.tn * 8 * LANES];
  const int64_t nv = vectors_per_pass(a.M);
  for (int64_t j = j_begin; j < j_end; ++j) {
    if (nv == 1)
      row_walk_strip<1, QBITS>(a, j, s, load_value);
    else if (nv == 2)
      row_walk_strip<2, QBITS>(a, j, s, load_value);
    else if (nv == 4)
      column_strip<4, QBITS>(a, j, s, load_value);
    else
      column_strip<8, QBITS>(a, j, s, load_value);
  }
  delete[] s.acc;
  delete[] s.colmask;
  delete[] s.rowmask;
  delete[] s.rowstart;
  delete[] s.rowscale;
  delete[] s.scales;
}

static void bitmap_mm_columns(const BitmapArgs& a, int64_t j_begin, int64_t j_end) {
  switch (a.value_kind) {
    case ValueKind::kFloat:
      columns_by_width<0>(a, j_begin, j_end, [&](int64_t p) { return a.values_f32[p]; });
      break;
    case ValueKind::kHalf:
      columns_by_width<0>(a, j_begin, j_end, [&](int64_t p) { return half_to_float(a.values_u16[p]); });
      break;
    case ValueKind::kBFloat16:
      columns_by_width<0>(a, j_begin, j_end, [&](int64_t p) { return bf16_to_float(a.values_u16[p]); });
      break;
    case ValueKind::kInt8:
      columns_by_width<8>(a, j_begin, j_end, [&](int64_t p) { return static_cast<float>(a.values_i8[p]); });
      break;
    case ValueKind::kInt4:
      columns_by_width<4>(a, j_begin, j_end, [&](int64_t p) {
        const int byte = a.values_i8[p >> 1];
        const int nib = (p & 1) ? ((byte >> 4) & 0xF) : (byte & 0xF);
        return static_cast<float>(nib >= 8 ? nib - 16 : nib);
      });
      break;
  }
}
