// Plain-data description of one `markov_sample` call and the per-element math
// its CPU and CUDA kernels share (so both draw the same tokens, bit for bit).
//
// Step k (0-based) of row b, with x_prev = anchor (k = 0) or the token drawn at
// step k - 1:
//   z_v   = fma chain over i = 0..r-1 of w1[x_prev, i] * w2[i, v], started from U[b, k, v]
//   T = 0: token = first v with z_v = max z (q one-hot)
//   T > 0: e_v = exp((z_v - max) / T), mass_v = mass_of(e_v), token = draw from
//          the masses with Philox bits of (seed, stream, offset, k, kMarkovSample);
//   a z_v of -inf masks id v (probability 0); NaN / +inf, or every id masked, is a row error
//          q_v = mass_v / sum(mass) (the distribution the token was drawn from)
//   confidence_k = sigmoid((w . [hidden_k ; w1[x_prev]] + bias_k) / conf_temperature_k)
//   (bias_k: one bias for every step, or one per step when calibrated offsets are folded in)
#pragma once
#include "dspark/math.h"
#include "dspark/sampling.h"

namespace dspark {

struct MarkovProblem {
  index_t batch = 0, steps = 0, vocab = 0, rank = 0, hidden_dim = 0;  // B, G, V, r, H
  index_t prev_vocab = 0;  // rows of w1 (>= V): ids a previous token may have (the anchor's range)
  const void* logits = nullptr;                                        // [B, G, V], last dim contiguous
  FloatCode logits_dtype = FloatCode::f32;
  index_t logits_stride_b = 0, logits_stride_k = 0;
  const int32_t* anchor = nullptr;                                     // [B]
  const void* w1 = nullptr;                                            // [prev_vocab, r] contiguous
  const void* w2 = nullptr;                                            // [r, V] contiguous
  FloatCode w_dtype = FloatCode::f32;
  const void* hidden = nullptr;                                        // [B, G, H] or null (H = 0)
  FloatCode hidden_dtype = FloatCode::f32;
  index_t hidden_stride_b = 0, hidden_stride_k = 0;
  const float* conf_weight = nullptr;                                  // [H + r], null: no confidence head
  const float* conf_bias = nullptr;                                    // [1] or [G]
  index_t conf_bias_stride = 0;                                        // 0: [1], 1: [G]
  const float* conf_temperature = nullptr;                             // [G]
  const float* temperature = nullptr;                                  // [B]
  const int64_t* seed = nullptr;                                       // [B], or [1] with batch_seed
  bool batch_seed = false;                                             // one seed: row b draws from stream b
  const int64_t* offset = nullptr;                                     // [B]
  float* z = nullptr;            // [B, V] scratch: logits, then softmax numerators, of the current step
  int32_t* tokens = nullptr;     // [B, G] out
  float* probs = nullptr;        // [B, G, V] out or null
  float* confidence = nullptr;   // [B, G] out or null
  int32_t* row_error = nullptr;  // [B] out (RowError)

  DSPARK_HD index_t prev_token(index_t b, index_t k) const {
    return k == 0 ? static_cast<index_t>(anchor[b]) : static_cast<index_t>(tokens[b * steps + k - 1]);
  }
};

// Row b's inputs the kernels check before sampling (CPU raises, CUDA marks the row).
DSPARK_HD bool markov_row_valid(const MarkovProblem& P, index_t b) {
  const float t = P.temperature[b];
  if (!(t >= 0.0f && t < 3.0e38f)) return false;
  if (P.anchor[b] < 0 || P.anchor[b] >= P.prev_vocab) return false;
  if (P.conf_weight != nullptr)
    for (index_t k = 0; k < P.steps; ++k)
      if (!(P.conf_temperature[k] > 0.0f && P.conf_temperature[k] < 3.0e38f)) return false;
  return true;
}

DSPARK_HD float markov_conf_bias(const MarkovProblem& P, index_t k) { return P.conf_bias[k * P.conf_bias_stride]; }

// Philox bits choosing the token of step k of row b (philox.h: a batch seed gives each row its stream).
DSPARK_HD uint64_t markov_bits(const MarkovProblem& P, index_t b, index_t k) {
  const uint64_t seed = static_cast<uint64_t>(P.seed[P.batch_seed ? 0 : b]);
  const uint32_t stream = P.batch_seed ? static_cast<uint32_t>(b) : 0u;
  return random_u64(random_words(seed, stream, static_cast<uint64_t>(P.offset[b]), static_cast<uint32_t>(k),
                                 Purpose::kMarkovSample));
}

// q_v as float: mass_v / Z through the double reciprocal (one multiply, one
// rounding to float), so CPU, CUDA and the reference give the same bits.
DSPARK_HD float mass_probability(uint64_t mass, double inv_total) {
  return static_cast<float>(static_cast<double>(mass) * inv_total);
}

// The confidence head's dot product w . [h ; w1[x_prev]] is summed in
// kDotLanes interleaved lanes (lane l takes indices l, l + kDotLanes, ...), each
// an fma chain, then the lanes are added in order: a fixed association that a
// CPU vector loop and kDotLanes CUDA threads both follow.
constexpr int kDotLanes = 16;

template <typename H, typename W>
DSPARK_HD float confidence_lane(const H* h, index_t hidden_dim, const W* w1_row, index_t rank,
                                const float* weight, int lane) {
  float acc = 0.0f;
  for (index_t i = lane; i < hidden_dim + rank; i += kDotLanes) {
    const float x = i < hidden_dim ? to_float(h[i]) : to_float(w1_row[i - hidden_dim]);
    acc = fmaf(weight[i], x, acc);
  }
  return acc;
}

DSPARK_HD float confidence_from_lanes(const float* lanes, float bias, float temperature) {
  float s = 0.0f;
  for (int l = 0; l < kDotLanes; ++l) s += lanes[l];
  return sigmoid((s + bias) / temperature);
}

}  // namespace dspark
