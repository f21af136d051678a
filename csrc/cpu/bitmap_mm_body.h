// The inner loops of fips_kernels_cpu::bitmap_mm, included once per instruction set by
// bitmap_mm.cpp, each time in its own namespace under its own `#pragma GCC target` and with
// FIPS_VBYTES (the vector width in bytes) defined, so one binary carries an AVX-512, an AVX2
// and a baseline copy. GCC vector extensions only, no intrinsics and no std templates (a std
// template instantiated here would share its symbol with the other copies' and the linker
// would keep one of them, possibly for the wrong CPU).
//
// Loop order, per column strip (tile columns ≤ 64, tile rows ≤ 64), for more input rows than
// the AVX-512 row kernel (bitmap_rows_avx512.h) takes:
//   * one or two vectors of rows per pass: row_walk_strip, the values in their stored order;
//   * one pass of up to 8 vectors (column_strip): per K tile, transpose the row-major bitmask
//     into one 64-bit mask per column and keep each row's first value index (prefix
//     popcounts): a stored value's index is then offset + row_start[k] + popcount(row_mask[k]
//     below column c); per panel of reduction rows, per column, walk the column's set bits,
//     accumulating value · xT[k, rows] in registers (the xT panel stays in L1);
//   * two passes or more (entry_strip): the same walk, but each value's xT row and its
//     dequantised value are worked out once per strip into a list that every pass replays
//     (one load, one broadcast and 8 FMAs per value): faster than column_strip from two
//     passes on in development A/B timings (MiniLM's factors, every copy), a few per cent
//     slower in one pass, where the list is used once (docs/CPU.md);
// then bias and the store into y (M × N): 16 × 16 blocks transposed in registers where the
// vectors hold 16 floats (store_columns).

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

// The epilogue of the column walks: partial sums held per column (acc[c · MC + q]) stored into
// the rows of y. With 16-float vectors and no activation, 16 × 16 blocks are transposed in
// registers (four rounds of two-source shuffles, each swapping the off-diagonal blocks of
// half the previous size) and written a row at a time; the ragged edges, other vector widths
// and activations go through BitmapArgs::store, one value at a time.
#if FIPS_VBYTES == 64 && (defined(__clang__) || __GNUC__ >= 12)
#define FIPS_SWAP_ROUND(H, r)                                                                    \
  for (int i = 0; i < 16; ++i) {                                                               \
    if (i & H) continue;                                                                       \
    const vfloat lo = r[i], hi = r[i + H];                                                     \
    r[i] = __builtin_shufflevector(lo, hi, FIPS_LO_##H);                                       \
    r[i + H] = __builtin_shufflevector(lo, hi, FIPS_HI_##H);                                   \
  }
// round H: the row with bit H clear keeps its columns with bit H clear and takes the partner's
// (column − H); the row with bit H set takes the partner's (column + H) and keeps the rest
#define FIPS_LO_8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define FIPS_HI_8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define FIPS_LO_4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define FIPS_HI_4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define FIPS_LO_2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define FIPS_HI_2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define FIPS_LO_1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define FIPS_HI_1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
static inline void transpose16(vfloat* r) {
  FIPS_SWAP_ROUND(8, r)
  FIPS_SWAP_ROUND(4, r)
  FIPS_SWAP_ROUND(2, r)
  FIPS_SWAP_ROUND(1, r)
}
#undef FIPS_SWAP_ROUND
#undef FIPS_LO_8
#undef FIPS_HI_8
#undef FIPS_LO_4
#undef FIPS_HI_4
#undef FIPS_LO_2
#undef FIPS_HI_2
#undef FIPS_LO_1
#undef FIPS_HI_1
#endif

static void store_columns(const BitmapArgs& a, int64_t j, int64_t m0, int64_t rows, const float* acc,
                          int64_t MC) {
#if FIPS_VBYTES == 64 && (defined(__clang__) || __GNUC__ >= 12)  // transpose16 is defined
  const int64_t cols = a.strip_cols(j);
  if (a.activation == 0 && cols >= 16 && rows >= 16) {
    const int64_t col0 = j * a.tn, cfull = cols / 16 * 16, qfull = rows / 16 * 16;
    float b[64];
    for (int64_t c = 0; c < cols; ++c) b[c] = a.bias ? a.bias_at(col0 + c) : 0.f;
    for (int64_t cb = 0; cb < cfull; cb += 16) {
      const vfloat bv = vload(b + cb);
      for (int64_t qb = 0; qb < qfull; qb += 16) {
        vfloat r[16];
        for (int i = 0; i < 16; ++i) r[i] = vload(acc + (cb + i) * MC + qb);
        transpose16(r);
        for (int i = 0; i < 16; ++i) {
          const vfloat out = r[i] + bv;
          __builtin_memcpy(a.y + (m0 + qb + i) * a.N + col0 + cb, &out, sizeof(vfloat));
        }
      }
    }
    for (int64_t q = 0; q < rows; ++q) {  // the ragged edges: columns past cfull, rows past qfull
      float* dst = a.y + (m0 + q) * a.N + col0;
      for (int64_t c = q < qfull ? cfull : 0; c < cols; ++c) dst[c] = acc[c * MC + q] + b[c];
    }
    return;
  }
#endif
  a.store(j, m0, rows, acc, MC, 1);
}

// Step 1 of the column walks: the strip's column masks, row masks, row starts and scale rows
// (kt × 64 each).
template <int QBITS>
static void strip_masks(const BitmapArgs& a, int64_t j, TileScratch& s) {
  const int64_t words = a.words, kt = a.kt, nt = a.nt;
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
}

template <int NV, int QBITS, typename LoadValue>
static void column_strip(const BitmapArgs& a, int64_t j, TileScratch& s,
                         LoadValue load_value) {
  constexpr int MC = NV * LANES;
  const int64_t kt = a.kt;
  const int64_t cols = a.strip_cols(j);
  strip_masks<QBITS>(a, j, s);
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
    store_columns(a, j, m0, mc, s.acc, MC);  // epilogue: bias, activation, the transposed store
  }
}

// Many input rows (two passes or more): the column walk's positions and dequantised values are
// worked out once per strip into a list of (xT row, value) entries, ordered by K tile,
// panel and column, which every pass then replays: per stored value one entry load, one
// broadcast and NV FMAs, instead of the position arithmetic and dequantisation once per pass.
template <int NV, int QBITS, typename LoadValue>
static void entry_strip(const BitmapArgs& a, int64_t j, TileScratch& s, LoadValue load_value) {
  constexpr int MC = NV * LANES;
  constexpr int PANEL = ENTRY_PANEL;
  const int64_t kt = a.kt;
  const int64_t cols = a.strip_cols(j);
  if (QBITS) a.strip_scales(j, s.groups, s.scales);
  const int64_t halves = (a.tk + PANEL - 1) / PANEL;
  // The list, filled in the values' own (row-major) order: panel p's column c holds
  // entry_count[p · 64 + c] entries from (p · 64 + c) · PANEL on (a panel has PANEL rows, so a
  // column never needs more: no counting pass, no bit transposition, no position arithmetic).
  for (int64_t ti = 0; ti < kt; ++ti) {
    const int64_t t = ti * a.nt + j;
    const uint32_t* mask = a.bitmask + t * a.tk * a.words;
    int64_t pos = a.offsets[t];
    for (int64_t half = 0; half < halves; ++half) {
      const int64_t p = ti * halves + half;
      int32_t* count = s.entry_count + p * 64;
      for (int c = 0; c < 64; ++c) count[c] = 0;
      const int64_t rows = (a.K - ti * a.tk) < a.tk ? (a.K - ti * a.tk) : a.tk;
      const int64_t k0 = half * PANEL, k1 = (k0 + PANEL) < rows ? (k0 + PANEL) : rows;
      for (int64_t kk = k0; kk < k1; ++kk) {
        const int64_t k = ti * a.tk + kk;
        uint64_t row = mask[kk * a.words];
        if (a.words > 1) row |= static_cast<uint64_t>(mask[kk * a.words + 1]) << 32;
        const float* srow = QBITS ? s.scales + (k / a.qgroup) * a.tn : nullptr;
        while (row) {
          const int c = __builtin_ctzll(row);
          row &= row - 1;
          float value = load_value(pos++);
          if (QBITS) value *= srow[c];
          const int64_t e = (p * 64 + c) * PANEL + count[c]++;
          s.entry_row[e] = static_cast<int32_t>(k);
          s.entry_val[e] = value;
        }
      }
    }
  }
  for (int64_t m0 = 0; m0 < a.M; m0 += MC) {
    const int64_t mc = (a.M - m0) < MC ? (a.M - m0) : MC;
    for (int64_t i = 0; i < cols * MC; ++i) s.acc[i] = 0.f;
    const float* xblock = a.xT + (m0 / MC) * a.K * MC;
    for (int64_t p = 0; p < kt * halves; ++p) {
      const int32_t* count = s.entry_count + p * 64;
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t e0 = (p * 64 + c) * PANEL, e1 = e0 + count[c];
        if (e0 == e1) continue;
        float* accmem = s.acc + c * MC;
        vfloat acc[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[v] = vload(accmem + v * LANES);
        for (int64_t e = e0; e < e1; ++e) {
          const float value = s.entry_val[e];
          const float* xrow = xblock + static_cast<int64_t>(s.entry_row[e]) * MC;
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[v] += value * vload(xrow + v * LANES);
        }
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) __builtin_memcpy(accmem + v * LANES, &acc[v], sizeof(vfloat));
      }
    }
    store_columns(a, j, m0, mc, s.acc, MC);
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
  const int64_t nv = vectors_per_pass(a.M);
  TileScratch s;
  s.colmask = new uint64_t[kt * 64 + 1];
  s.rowmask = new uint64_t[kt * 64 + 1];
  s.rowstart = new int64_t[kt * 64 + 1];
  s.rowscale = new int64_t[kt * 64 + 1];
  s.scales = new float[groups * a.tn + 1];
  s.groups = groups;
  s.acc = new float[a.tn * 8 * LANES];
  // entry_strip's list: room for every position of the strip (64 per panel row and column)
  const bool replay = nv == 8 && a.M > 8 * LANES;
  const int64_t panels = replay ? kt * ((a.tk + ENTRY_PANEL - 1) / ENTRY_PANEL) : 0;
  s.entry_count = new int32_t[panels * 64 + 1];
  s.entry_row = new int32_t[panels * 64 * ENTRY_PANEL + 1];
  s.entry_val = new float[panels * 64 * ENTRY_PANEL + 1];
  for (int64_t j = j_begin; j < j_end; ++j) {
    if (nv == 1)
      row_walk_strip<1, QBITS>(a, j, s, load_value);
    else if (nv == 2)
      row_walk_strip<2, QBITS>(a, j, s, load_value);
    else if (nv == 4)
      column_strip<4, QBITS>(a, j, s, load_value);
    else if (!replay)  // one pass: positions worked out as the walk goes
      column_strip<8, QBITS>(a, j, s, load_value);
    else  // two passes or more: worked out once into a list that every pass replays
      entry_strip<8, QBITS>(a, j, s, load_value);
  }
  delete[] s.acc;
  delete[] s.entry_count;
  delete[] s.entry_row;
  delete[] s.entry_val;
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
