// CPU kernel of the small-block linear ops: y[M, N] = x[M, K] W^T for M <= 64,
// on the packed column-group layout of dspark/linear_problem.h. Compiled once per ISA
// (cmake/cpu_isa.cmake).
//
// Up to about 16 rows the weights are the traffic (the arithmetic per byte of
// DRAM is below what a core does), beyond that the FMAs; either way each
// group of 32 columns is read from memory once per call and reused by every
// row while it is in L1: a register tile of up to kTileRows rows x 32 columns
// accumulates over k with one FMA per (row, vector) and one load per weight
// vector. Blocks with more rows than one tile holds split k into chunks small
// enough for L1, so the next tiles of rows read the chunk from L1, not DRAM.
// Partial sums live in a stack buffer: nothing is allocated.
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <type_traits>

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
constexpr int kTileRows = 12;  // 12 rows x 2 zmm = 24 of the 32 registers
constexpr int kFmaInFlight = 8;  // FMA latency (4) x FMA issue per cycle (2)
inline Vec vzero() { return {_mm512_setzero_ps()}; }
inline Vec vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Vec vload(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline Vec vfma(Vec w, float x, Vec acc) { return {_mm512_fmadd_ps(w.v, _mm512_set1_ps(x), acc.v)}; }
inline Vec vadd(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v.v); }
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec { __m256 v; };
constexpr int kLanes = 8;
constexpr int kTileRows = 3;  // 3 rows x 4 ymm = 12 of the 16 registers
constexpr int kFmaInFlight = 8;
inline Vec vzero() { return {_mm256_setzero_ps()}; }
inline Vec vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline Vec vload(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
}
inline Vec vfma(Vec w, float x, Vec acc) { return {_mm256_fmadd_ps(w.v, _mm256_set1_ps(x), acc.v)}; }
inline Vec vadd(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v.v); }
#else
struct Vec { float v; };
constexpr int kLanes = 1;
constexpr int kTileRows = 2;
constexpr int kFmaInFlight = 1;
inline Vec vzero() { return {0.0f}; }
inline Vec vload(const float* p) { return {*p}; }
inline Vec vload(const uint16_t* p) { return {to_float(bf16_bits{*p})}; }
inline Vec vfma(Vec w, float x, Vec acc) { return {w.v * x + acc.v}; }
inline Vec vadd(Vec a, Vec b) { return {a.v + b.v}; }
inline void vstore(float* p, Vec v) { *p = v.v; }
#endif

constexpr int kCols = static_cast<int>(kLinearGroupCols);
constexpr int kVecs = kCols / kLanes;  // weight vectors per k-step of a group
// k-chunk when rows need several tiles: the group's chunk (16 KiB fp32) stays
// in L1 next to a tile's rows of x (6 KiB for 12 rows).
constexpr index_t kChunk = 128;
// Software prefetch distance in the weight stream (about DRAM latency x the
// rate one core consumes it): the hardware prefetcher alone leaves the FMAs
// waiting on DRAM.
constexpr int kPrefetchBytes = 8192;

// acc[MR rows][32] (+)= x[MR, kc] * w[kc, 32]; `w` points at the group's chunk,
// `acc` at the tile's first row in the group buffer ([rows][32]). Narrow
// tiles keep S partial sums per output over interleaved k so that enough
// FMAs are in flight to hide their latency. With `keep`, the weights are also
// stored there as fp32 for the next tiles of rows (bf16 widened once).
template <int MR, typename WT>
void tile(const float* x, index_t ldx, const WT* w, index_t kc, float* acc, bool accumulate, float* keep) {
  constexpr int S = MR * kVecs >= kFmaInFlight ? 1 : (2 * MR * kVecs >= kFmaInFlight ? 2 : 4);
  constexpr int kStepBytes = S * kCols * static_cast<int>(sizeof(WT));
  Vec c[S][MR][kVecs];
  for (int s = 0; s < S; ++s)
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < kVecs; ++j)
        c[s][m][j] = s == 0 && accumulate ? vload(acc + m * kCols + j * kLanes) : vzero();
  const auto step = [&](int s, index_t k) {
    Vec b[kVecs];
    for (int j = 0; j < kVecs; ++j) b[j] = vload(w + k * kCols + j * kLanes);
    if constexpr (!std::is_same_v<WT, float>) {
      if (keep != nullptr)
        for (int j = 0; j < kVecs; ++j) vstore(keep + k * kCols + j * kLanes, b[j]);
    }
    for (int m = 0; m < MR; ++m) {
      const float a = x[m * ldx + k];
      for (int j = 0; j < kVecs; ++j) c[s][m][j] = vfma(b[j], a, c[s][m][j]);
    }
  };
  index_t k = 0;
  for (; k + S <= kc; k += S) {
    for (int line = 0; line < kStepBytes; line += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(w + k * kCols) + kPrefetchBytes + line);
    for (int s = 0; s < S; ++s) step(s, k + s);
  }
  for (; k < kc; ++k) step(0, k);
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < kVecs; ++j) {
      for (int s = 1; s < S; ++s) c[0][m][j] = vadd(c[0][m][j], c[s][m][j]);
      vstore(acc + m * kCols + j * kLanes, c[0][m][j]);
    }
}

// tile<mr> for a run-time row count 1 <= mr <= kTileRows.
template <typename WT, int MR = 1>
void tile_rows(int mr, const float* x, index_t ldx, const WT* w, index_t kc, float* acc, bool accumulate,
               float* keep) {
  if constexpr (MR < kTileRows) {
    if (mr != MR) return tile_rows<WT, MR + 1>(mr, x, ldx, w, kc, acc, accumulate, keep);
  }
  tile<MR, WT>(x, ldx, w, kc, acc, accumulate, keep);
}

// Writes the group's columns of y from the sums in `acc` ([M][32]).
void epilogue(const LinearProblem& P, index_t group, const float* acc) {
  if (P.epilogue == LinearEpilogue::silu_mul) {
    constexpr index_t kHalf = kLinearGroupCols / 2;
    const index_t col0 = group * kHalf;
    const index_t n = P.out - col0 < kHalf ? P.out - col0 : kHalf;
    for (index_t m = 0; m < P.rows; ++m) {
      const float* gate = acc + m * kCols;
      const float* up = gate + kHalf;
      float* y = P.y + m * P.out + col0;
      for (index_t j = 0; j < n; ++j) y[j] = silu(gate[j]) * up[j];
    }
    return;
  }
  const index_t col0 = group * kCols;
  const index_t n = P.out - col0 < kCols ? P.out - col0 : kCols;
  for (index_t m = 0; m < P.rows; ++m) {
    const float* a = acc + m * kCols;
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
  alignas(64) float acc[kLinearMaxRows * kCols];
  // When several tiles read a bf16 chunk, the first widens it for the others.
  constexpr bool kWiden = !std::is_same_v<WT, float>;
  alignas(64) float widened[kWiden ? kChunk * kCols : 1];
  for (index_t g = group_begin; g < group_end; ++g) {
    const WT* wg = w + g * K * kCols;
    index_t k0 = 0;
    do {  // at least once, so that K = 0 still zeroes the sums
      const index_t kc = K - k0 < chunk ? K - k0 : chunk;
      index_t row = 0;
      for (int t = 0; t < tiles; ++t) {
        // Balanced tiles (16 rows = 8 + 8 rather than 12 + 4) keep every tile wide.
        const int mr = static_cast<int>(M / tiles + (t < M % tiles ? 1 : 0));
        const float* x = P.x + row * K + k0;
        float* tile_acc = acc + row * kCols;
        if (!kWiden || tiles == 1)
          tile_rows<WT>(mr, x, K, wg + k0 * kCols, kc, tile_acc, k0 > 0, nullptr);
        else if (t == 0)
          tile_rows<WT>(mr, x, K, wg + k0 * kCols, kc, tile_acc, k0 > 0, widened);
        else
          tile_rows<float>(mr, x, K, widened, kc, tile_acc, k0 > 0, nullptr);
        row += mr;
      }
      k0 += kc;
    } while (k0 < K);
    epilogue(P, g, acc);
  }
}

}  // namespace

// Groups [group_begin, group_end) of P (32 output columns each, 16 for
// silu_mul). Threads call it on disjoint ranges.
void linear_groups(const LinearProblem& P, index_t group_begin, index_t group_end) {
  if (P.w_dtype == FloatCode::bf16)
    linear_groups_typed<uint16_t>(P, group_begin, group_end);
  else
    linear_groups_typed<float>(P, group_begin, group_end);
}

}  // namespace dspark::cpu::DSPARK_ISA
