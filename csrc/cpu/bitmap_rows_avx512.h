// Few input rows on AVX-512 (VBMI2): each stored row of a 64-column tile is expanded from its
// packed values into four 16-lane registers in a handful of instructions (vpexpandb / vexpandps
// under the row's 64-bit mask) and multiplied densely into MB input rows held in registers.
// The tile's zeros are multiplied too (twice the useful FMAs at s = 0.5), but nothing is done per
// stored value, which is what bounds the per-value loops when few rows share each value.
// Included by bitmap_mm.cpp after BitmapArgs; compiled only for GCC on x86-64.
#include <immintrin.h>

#define FIPS_AVX512_TARGET \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512vbmi2,f16c,avx2,fma,bmi,bmi2,popcnt")))

namespace avx512rows {

FIPS_AVX512_TARGET static inline void load_row(const BitmapArgs& a, uint64_t mask, int64_t& pos,
                                               const float* srow, __m512 out[4]) {
  switch (a.value_kind) {
    case ValueKind::kInt8: {
      const __m512i q = _mm512_maskz_expandloadu_epi8(mask, a.values_i8 + pos);
      for (int v = 0; v < 4; ++v)
        out[v] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(q, v)));
      break;
    }
    case ValueKind::kHalf:
    case ValueKind::kBFloat16: {
      int64_t p = pos;
      for (int h = 0; h < 2; ++h) {
        const __mmask32 m = static_cast<__mmask32>(mask >> (32 * h));
        const __m512i v16 = _mm512_maskz_expandloadu_epi16(m, a.values_u16 + p);
        p += __builtin_popcount(m);
        for (int v = 0; v < 2; ++v) {
          const __m256i half = _mm512_extracti64x4_epi64(v16, v);
          out[2 * h + v] = a.value_kind == ValueKind::kHalf
                               ? _mm512_cvtph_ps(half)
                               : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
        }
      }
      break;
    }
    default: {  // float32
      int64_t p = pos;
      for (int v = 0; v < 4; ++v) {
        const __mmask16 m = static_cast<__mmask16>(mask >> (16 * v));
        out[v] = _mm512_maskz_expandloadu_ps(m, a.values_f32 + p);
        p += __builtin_popcount(m);
      }
    }
  }
  pos += __builtin_popcountll(mask);
  if (srow)
    for (int v = 0; v < 4; ++v) out[v] = _mm512_mul_ps(out[v], _mm512_loadu_ps(srow + 16 * v));
}

// MB input rows (x row-major, M × K) against one 64-column strip.
template <int MB>
FIPS_AVX512_TARGET static void strip(const BitmapArgs& a, const float* x, int64_t j, int64_t m0,
                                     const float* scales, float* out_tile) {
  const int64_t kt = a.kt, nt = a.nt;
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < 4; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t ti = 0; ti < kt; ++ti) {
    const int64_t t = ti * nt + j;
    const uint32_t* mask = a.bitmask + t * a.tk * 2;
    int64_t pos = a.offsets[t];
    for (int64_t kk = 0; kk < a.tk; ++kk) {
      const int64_t k = ti * a.tk + kk;
      if (k >= a.K) break;
      const uint64_t row = mask[2 * kk] | static_cast<uint64_t>(mask[2 * kk + 1]) << 32;
      if (!row) continue;
      __m512 w[4];
      load_row(a, row, pos, scales ? scales + (k / a.qgroup) * 64 : nullptr, w);
      for (int m = 0; m < MB; ++m) {
        const __m512 xb = _mm512_set1_ps(x[(m0 + m) * a.K + k]);
        for (int v = 0; v < 4; ++v) acc[m][v] = _mm512_fmadd_ps(xb, w[v], acc[m][v]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(out_tile + m * 64 + 16 * v, acc[m][v]);
}

// y (M × N) = act(x · B + bias) for tiles of 64 columns; x row-major (M × K).
FIPS_AVX512_TARGET static void columns(const BitmapArgs& a, const float* x, int64_t j_begin, int64_t j_end) {
  const int64_t groups = a.scales ? (a.K + a.qgroup - 1) / a.qgroup : 0;
  float* scales = groups ? new float[groups * 64] : nullptr;
  float out_tile[6 * 64];
  for (int64_t j = j_begin; j < j_end; ++j) {
    if (groups) a.strip_scales(j, groups, scales);
    for (int64_t m0 = 0; m0 < a.M; m0 += 6) {
      const int64_t mb = (a.M - m0) < 6 ? (a.M - m0) : 6;
      switch (mb) {
        case 1: strip<1>(a, x, j, m0, scales, out_tile); break;
        case 2: strip<2>(a, x, j, m0, scales, out_tile); break;
        case 3: strip<3>(a, x, j, m0, scales, out_tile); break;
        case 4: strip<4>(a, x, j, m0, scales, out_tile); break;
        case 5: strip<5>(a, x, j, m0, scales, out_tile); break;
        default: strip<6>(a, x, j, m0, scales, out_tile); break;
      }
      a.store(j, m0, mb, out_tile, 1, 64);
    }
  }
  delete[] scales;
}

}  // namespace avx512rows
