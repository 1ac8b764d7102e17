// CPU kernel of the small-block linear ops: y[M, N] = x[M, K] W^T for M <= 16,
// on the packed panel layout of dspark/linear_problem.h. Compiled once per ISA
// (cmake/cpu_isa.cmake).
//
// The weights are the traffic (M <= 16 rows is far below the arithmetic a
// core can do per byte of DRAM), so each panel is read from memory once per
// call and reused by every row while it is in L1: a register tile of up to
// kTileRows rows x kTilePanels panels accumulates over k with one FMA per
// (row, vector) and one vector load per panel vector. Blocks with more rows
// than one tile holds split k into chunks small enough for L1, so the second
// tile of rows reads the chunk from L1, not DRAM. Partial sums live in a
// per-call stack buffer: nothing is allocated.
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cstdint>

#include "dspark/linear_problem.h"
#include "dspark/math.h"

namespace dspark::cpu::DSPARK_ISA {
namespace {

// Vector of kLanes floats: load fp32 or bf16 (widened exactly), FMA with a
// broadcast scalar, store. The generic build uses one float and separate
// multiply and add (no FMA unit is assumed).
#if defined(__AVX512F__)
struct Vec { __m512 v; };
constexpr int kLanes = 16;
constexpr int kTileRows = 8;    // 8 rows x 2 panels = 16 of the 32 zmm registers
constexpr int kTilePanels = 2;
inline Vec vzero() { return {_mm512_setzero_ps()}; }
inline Vec vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Vec vload(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline Vec vfma(Vec w, float x, Vec acc) { return {_mm512_fmadd_ps(w.v, _mm512_set1_ps(x), acc.v)}; }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v.v); }
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec { __m256 v; };
constexpr int kLanes = 8;
constexpr int kTileRows = 6;    // 6 rows x 1 panel (2 ymm) = 12 of the 16 ymm registers
constexpr int kTilePanels = 1;
inline Vec vzero() { return {_mm256_setzero_ps()}; }
inline Vec vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline Vec vload(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
}
inline Vec vfma(Vec w, float x, Vec acc) { return {_mm256_fmadd_ps(w.v, _mm256_set1_ps(x), acc.v)}; }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v.v); }
#else
struct Vec { float v; };
constexpr int kLanes = 1;
constexpr int kTileRows = 4;
constexpr int kTilePanels = 1;
inline Vec vzero() { return {0.0f}; }
inline Vec vload(const float* p) { return {*p}; }
inline Vec vload(const uint16_t* p) { return {to_float(bf16_bits{*p})}; }
inline Vec vfma(Vec w, float x, Vec acc) { return {w.v * x + acc.v}; }
inline void vstore(float* p, Vec v) { *p = v.v; }
#endif

constexpr int kPanel = static_cast<int>(kLinearPanel);
constexpr int kVecsPerPanel = kPanel / kLanes;
constexpr int kAccStride = kPanel * static_cast<int>(kLinearGroup);  // floats per row of the group buffer
// k-chunk when rows need several tiles: two panels' chunk (16 KiB fp32) plus
// 16 rows of x (8 KiB) stay in a 32 KiB L1.
constexpr index_t kChunk = 128;

// acc[MR rows][NP panels] (+)= x[MR, kc] * panels[kc, 16 * NP]; `w[p]` points at
// the chunk of panel p, `acc` at the tile's first row and column in the group buffer.
template <int MR, int NP, typename WT>
void tile(const float* x, index_t ldx, const WT* const* w, index_t kc, float* acc, bool accumulate) {
  constexpr int NV = NP * kVecsPerPanel;
  Vec c[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) c[m][j] = accumulate ? vload(acc + m * kAccStride + j * kLanes) : vzero();
  for (index_t k = 0; k < kc; ++k) {
    Vec b[NV];
    for (int p = 0; p < NP; ++p)
      for (int v = 0; v < kVecsPerPanel; ++v) b[p * kVecsPerPanel + v] = vload(w[p] + k * kPanel + v * kLanes);
    for (int m = 0; m < MR; ++m) {
      const float a = x[m * ldx + k];
      for (int j = 0; j < NV; ++j) c[m][j] = vfma(b[j], a, c[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) vstore(acc + m * kAccStride + j * kLanes, c[m][j]);
}

// tile<mr, NP> for a run-time row count 1 <= mr <= kTileRows.
template <int NP, typename WT, int MR = 1>
void tile_rows(int mr, const float* x, index_t ldx, const WT* const* w, index_t kc, float* acc, bool accumulate) {
  if constexpr (MR < kTileRows) {
    if (mr != MR) return tile_rows<NP, WT, MR + 1>(mr, x, ldx, w, kc, acc, accumulate);
  }
  tile<MR, NP, WT>(x, ldx, w, kc, acc, accumulate);
}

// Writes the group's columns of y from the sums in `acc` ([M][kAccStride]).
void epilogue(const LinearProblem& P, index_t group, const float* acc) {
  if (P.epilogue == LinearEpilogue::silu_mul) {
    const index_t col0 = group * kPanel;
    const index_t n = P.out - col0 < kPanel ? P.out - col0 : kPanel;
    for (index_t m = 0; m < P.rows; ++m) {
      const float* gate = acc + m * kAccStride;
      const float* up = gate + kPanel;
      float* y = P.y + m * P.out + col0;
      for (index_t j = 0; j < n; ++j) y[j] = silu(gate[j]) * up[j];
    }
    return;
  }
  const index_t col0 = group * kAccStride;
  const index_t n = P.out - col0 < kAccStride ? P.out - col0 : kAccStride;
  for (index_t m = 0; m < P.rows; ++m) {
    const float* a = acc + m * kAccStride;
    float* y = P.y + m * P.out + col0;
    for (index_t j = 0; j < n; ++j) y[j] = a[j];
    if (P.bias != nullptr)
      for (index_t j = 0; j < n; ++j) y[j] += P.bias[col0 + j];
    if (P.residual != nullptr) {
      const float* r = P.residual + m * P.out + col0;
      for (index_t j = 0; j < n; ++j) y[j] += r[j];
    }
  }
}

template <typename WT>
void linear_groups_typed(const LinearProblem& P, index_t group_begin, index_t group_end) {
  const WT* w = static_cast<const WT*>(P.w);
  const index_t K = P.in, M = P.rows;
  const int tiles = static_cast<int>((M + kTileRows - 1) / kTileRows);
  const index_t chunk = tiles > 1 ? kChunk : K;
  alignas(64) float acc[kLinearMaxRows * kAccStride];
  for (index_t g = group_begin; g < group_end; ++g) {
    const index_t p0 = g * kLinearGroup;
    const int np = static_cast<int>(P.panels - p0 < kLinearGroup ? P.panels - p0 : kLinearGroup);
    index_t k0 = 0;
    do {  // at least once, so that K = 0 still zeroes the sums
      const index_t kc = K - k0 < chunk ? K - k0 : chunk;
      index_t row = 0;
      for (int t = 0; t < tiles; ++t) {
        // Balanced tiles (16 rows = 8 + 8, 10 = 5 + 5) keep every tile wide.
        const int mr = static_cast<int>(M / tiles + (t < M % tiles ? 1 : 0));
        for (int p = 0; p < np;) {
          const WT* panels[kTilePanels > 1 ? kTilePanels : 1];
          const int step = np - p >= kTilePanels ? kTilePanels : 1;
          for (int q = 0; q < step; ++q) panels[q] = w + ((p0 + p + q) * K + k0) * kPanel;
          float* tile_acc = acc + row * kAccStride + p * kPanel;
          const float* tile_x = P.x + row * K + k0;
          if (step == kTilePanels)
            tile_rows<kTilePanels, WT>(mr, tile_x, K, panels, kc, tile_acc, k0 > 0);
          else
            tile_rows<1, WT>(mr, tile_x, K, panels, kc, tile_acc, k0 > 0);
          p += step;
        }
        row += mr;
      }
      k0 += kc;
    } while (k0 < K);
    epilogue(P, g, acc);
  }
}

}  // namespace

// Groups [group_begin, group_end) of P (two panels each: 32 output columns,
// or 16 for silu_mul). Threads call it on disjoint ranges.
void linear_groups(const LinearProblem& P, index_t group_begin, index_t group_end) {
  if (P.w_dtype == FloatCode::bf16)
    linear_groups_typed<uint16_t>(P, group_begin, group_end);
  else
    linear_groups_typed<float>(P, group_begin, group_end);
}

}  // namespace dspark::cpu::DSPARK_ISA
