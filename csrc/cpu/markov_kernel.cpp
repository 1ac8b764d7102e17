// CPU kernel of `markov_sample`, one block step at a time (the binding runs
// the two phases of each step over all threads):
//   markov_logits: z = U_k + w1[x_prev] @ w2 for every row, tiled over the
//     vocabulary; a tile of w2 (r x 64 columns) stays in cache while every
//     row group uses it, so w2 streams from memory once per step, not once
//     per row. Each z_v is the fma chain of markov.h, so the register blocking
//     changes nothing in the result.
//   markov_rows: per row, softmax numerators, the draw, draft_probs and the
//     confidence head.
// Compiled once per ISA (cmake/cpu_isa.cmake).
#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "dspark/markov.h"
#include "row_ops.h"

namespace dspark::cpu::DSPARK_ISA {
namespace {

constexpr index_t kCols = 64;  // vocabulary columns per register tile

// z[rows, v .. v + kCols) for up to NR rows (`rows` lists them; the rest of
// the NR slots repeat a valid row and are not stored). On AVX-512 the
// accumulators stay in registers (GCC spills the plain arrays below); every
// z_v is still the fma chain of markov.h.
template <int NR, typename L, typename W>
void logits_block(const MarkovProblem& P, index_t k, const index_t* rows, int nrows, index_t v) {
  const index_t V = P.vocab, R = P.rank;
  const W* w1 = static_cast<const W*>(P.w1);
  const W* w2 = static_cast<const W*>(P.w2) + v;
  const W* w1_row[NR];
  const L* u[NR];
  for (int rr = 0; rr < NR; ++rr) {
    const index_t b = rows[rr < nrows ? rr : 0];
    u[rr] = static_cast<const L*>(P.logits) + b * P.logits_stride_b + k * P.logits_stride_k + v;
    w1_row[rr] = w1 + P.prev_token(b, k) * R;
  }
#if defined(__AVX512F__)
  constexpr int kVecs = kCols / 16;
  __m512 acc[NR][kVecs];
#pragma GCC unroll 8
  for (int rr = 0; rr < NR; ++rr)
#pragma GCC unroll 8
    for (int c = 0; c < kVecs; ++c) acc[rr][c] = load16(u[rr] + 16 * c);
  for (index_t i = 0; i < R; ++i) {
    __m512 w[kVecs];
#pragma GCC unroll 8
    for (int c = 0; c < kVecs; ++c) w[c] = load16(w2 + i * V + 16 * c);
#pragma GCC unroll 8
    for (int rr = 0; rr < NR; ++rr) {
      const __m512 s = _mm512_set1_ps(to_float(w1_row[rr][i]));
#pragma GCC unroll 8
      for (int c = 0; c < kVecs; ++c) acc[rr][c] = _mm512_fmadd_ps(s, w[c], acc[rr][c]);
    }
  }
  for (int rr = 0; rr < nrows; ++rr)
#pragma GCC unroll 8
    for (int c = 0; c < kVecs; ++c) _mm512_storeu_ps(P.z + rows[rr] * V + v + 16 * c, acc[rr][c]);
#else
  float acc[NR][kCols];
  for (int rr = 0; rr < NR; ++rr)
    for (index_t l = 0; l < kCols; ++l) acc[rr][l] = to_float(u[rr][l]);
  for (index_t i = 0; i < R; ++i) {
    float w2c[kCols];
    for (index_t l = 0; l < kCols; ++l) w2c[l] = to_float(w2[i * V + l]);
    for (int rr = 0; rr < NR; ++rr) {
      const float s = to_float(w1_row[rr][i]);
      for (index_t l = 0; l < kCols; ++l) acc[rr][l] = fmaf(s, w2c[l], acc[rr][l]);
    }
  }
  for (int rr = 0; rr < nrows; ++rr) {
    float* z = P.z + rows[rr] * V + v;
    for (index_t l = 0; l < kCols; ++l) z[l] = acc[rr][l];
  }
#endif
}

// Columns past the last full tile, one element at a time (same fma chain).
template <typename L, typename W>
void logits_tail(const MarkovProblem& P, index_t k, index_t b, index_t v0, index_t v1) {
  const index_t V = P.vocab, R = P.rank;
  const W* w1_row = static_cast<const W*>(P.w1) + P.prev_token(b, k) * R;
  const W* w2 = static_cast<const W*>(P.w2);
  const L* u = static_cast<const L*>(P.logits) + b * P.logits_stride_b + k * P.logits_stride_k;
  for (index_t v = v0; v < v1; ++v) {
    float acc = to_float(u[v]);
    for (index_t i = 0; i < R; ++i) acc = fmaf(to_float(w1_row[i]), to_float(w2[i * V + v]), acc);
    P.z[b * V + v] = acc;
  }
}

template <typename L, typename W>
void logits_typed(const MarkovProblem& P, index_t k, index_t tile_begin, index_t tile_end, index_t* rows) {
  index_t n = 0;  // rows still sampling (a row with an error stops)
  for (index_t b = 0; b < P.batch; ++b)
    if (P.row_error[b] == kRowOk) rows[n++] = b;
  const index_t full_tiles = P.vocab / kCols;
  for (index_t t = tile_begin; t < tile_end; ++t) {
    if (t < full_tiles) {
      index_t i = 0;
      for (; i + 4 <= n; i += 4) logits_block<4, L, W>(P, k, rows + i, 4, t * kCols);
      for (; i < n; ++i) logits_block<1, L, W>(P, k, rows + i, 1, t * kCols);
    } else {
      for (index_t i = 0; i < n; ++i) logits_tail<L, W>(P, k, rows[i], t * kCols, P.vocab);
    }
  }
}

template <typename H, typename W>
float confidence_of(const MarkovProblem& P, index_t b, index_t k) {
  const H* h = P.hidden == nullptr ? nullptr
                                   : static_cast<const H*>(P.hidden) + b * P.hidden_stride_b + k * P.hidden_stride_k;
  const W* w1_row = static_cast<const W*>(P.w1) + P.prev_token(b, k) * P.rank;
  float lanes[kDotLanes];
  for (int l = 0; l < kDotLanes; ++l)
    lanes[l] = confidence_lane(h, P.hidden_dim, w1_row, P.rank, P.conf_weight, l);
  return confidence_from_lanes(lanes, markov_conf_bias(P, k), P.conf_temperature[k]);
}

template <typename W>
void sample_row(const MarkovProblem& P, index_t b, index_t k) {
  const index_t V = P.vocab;
  if (P.row_error[b] != kRowOk) return;
  float* z = P.z + b * V;
  const RowMax rm = row_max(z, V);
  if (rm.error() != kRowOk) {
    P.row_error[b] = rm.error();
    return;
  }
  if (P.confidence != nullptr)
    with_float_type(P.hidden_dtype,
                    [&](auto h) { P.confidence[b * P.steps + k] = confidence_of<decltype(h), W>(P, b, k); });
  float* q = P.probs == nullptr ? nullptr : P.probs + (b * P.steps + k) * V;
  const float temperature = P.temperature[b];
  index_t token;
  if (temperature == 0.0f) {
    token = rm.argmax;
    if (q != nullptr)
      for (index_t v = 0; v < V; ++v) q[v] = v == token ? 1.0f : 0.0f;
  } else {
    const uint64_t total = softmax_numerators_in_place(z, V, rm.max, 1.0f / temperature);
    const uint64_t bits = markov_bits(P, b, k);
    token = draw(V, total, bits, [&](index_t v) { return mass_of(z[v]); });
    if (q != nullptr) {  // bound by writing the fresh [B, G, V] output, not by the conversions
      const double inv_total = 1.0 / static_cast<double>(total);
      for (index_t v = 0; v < V; ++v) q[v] = mass_probability(mass_of(z[v]), inv_total);
    }
  }
  P.tokens[b * P.steps + k] = static_cast<int32_t>(token);
}

}  // namespace

// Step k, vocabulary tiles [tile_begin, tile_end) of kCols columns (the last
// tile may be partial); `rows` is scratch for B indices.
void markov_logits(const MarkovProblem& P, index_t k, index_t tile_begin, index_t tile_end, index_t* rows) {
  with_float_type(P.logits_dtype, [&](auto l) {
    with_float_type(P.w_dtype,
                    [&](auto w) { logits_typed<decltype(l), decltype(w)>(P, k, tile_begin, tile_end, rows); });
  });
}

index_t markov_tiles(index_t vocab) { return (vocab + kCols - 1) / kCols; }

// Step k for rows [begin, end): token, draft_probs row, confidence.
void markov_rows(const MarkovProblem& P, index_t k, index_t begin, index_t end) {
  for (index_t b = begin; b < end; ++b) {
    with_float_type(P.w_dtype, [&](auto w) { sample_row<decltype(w)>(P, b, k); });
  }
}

}  // namespace dspark::cpu::DSPARK_ISA
