// The acceptance rule and token sampling of speculative decoding, shared by the
// CPU and CUDA kernels of `verify` (and the drafter's `markov_sample`).
//
// Distributions are held as 40-bit fixed-point masses (math.h): the filtered
// target p_v = mass_v / Z. A token is drawn by inverse CDF on exact integer
// prefix sums: the first v whose cumulative mass exceeds U, with U uniform in
// [0, total). Zero-mass tokens can never be drawn, and the result is the same
// however the vocabulary is split across threads. A logit of -inf masks its id
// (numerator 0, so mass 0: never drawn, never accepted, below every filter
// threshold); NaN and +inf are errors, and so is a row whose every id is masked.
//
// Quantisation bound (what the fixed-point rules give up against exact
// arithmetic on the same float inputs). A numerator e_v = exp((x_v - max) / T)
// is computed within 2^-21 absolute (three float roundings of the argument, at
// most 2^-22 relative error of exp_nonpositive), its mass truncates by < 2^-40,
// and the row max has mass exactly 2^40; so the filtered target p^ the kernels
// draw from is within total variation V * 2^-21 of the exact filtered softmax
// (when no id lies that close to a filter threshold). The accept test's u lies
// on a 2^-23 grid, so a draft is accepted with min(1, p^(x) / q(x)) within
// 2^-23; a draw gives token v with probability mass_v / total within 2^-64.
// Together: for a draft distribution q that sums to 1, the law of each token a
// verify row emits is within total variation V * 2^-21 + 2^-22 of the exact
// target law; a row emitting K+1 tokens, within (K+1) times that.
#pragma once
#include "dspark/math.h"
#include "dspark/philox.h"

namespace dspark {

// Draft x (target mass p_mass of total z, draft probability q) is accepted iff
// u * q < p, i.e. with probability min(1, p / q). u lies in the open interval
// (0, 1), so a zero-probability target token is never accepted.
DSPARK_HD bool accept_draft(float u, float q, uint64_t p_mass, uint64_t z) {
  return static_cast<double>(u) * static_cast<double>(q) * static_cast<double>(z) <
         static_cast<double>(p_mass);
}

// Draft probability q_v expressed in the target's fixed-point scale (total z).
DSPARK_HD uint64_t draft_mass(float q, uint64_t z) {
  const double m = static_cast<double>(q) * static_cast<double>(z);
  return m > 0.0 ? static_cast<uint64_t>(m) : 0;
}

// Residual max(0, p - q) in fixed point.
DSPARK_HD uint64_t residual_mass(uint64_t p_mass, uint64_t q_mass) {
  return p_mass > q_mass ? p_mass - q_mass : 0;
}

// U uniform in [0, total) from 64 random bits: floor(bits * total / 2^64).
DSPARK_HD uint64_t scaled_draw(uint64_t bits, uint64_t total) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(bits, total);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(bits) * total) >> 64);
#endif
}

// Per-request sampling parameters as the kernels see them.
struct SamplingParams {
  float temperature;  // 0 = greedy
  int32_t top_k;      // <= 0 or >= V: off
  float top_p;        // 1: off
  float min_p;        // 0: off
  uint64_t seed;
  uint32_t stream;    // Philox stream (philox.h): the row under a batch seed, 0 under a seed per row
  uint64_t offset;
};

// Row errors reported by the kernels (CPU raises, CUDA marks the row with -1).
enum RowError : int32_t {
  kRowOk = 0,
  kRowNonFiniteLogits = 1,  // a NaN or +inf logit
  kRowDraftTokenOutOfRange = 2,
  kRowZeroDraftProb = 3,
  kRowBadParams = 4,
  kRowAllMasked = 5,        // every logit of a position is -inf
};

// A logit that is an error: NaN or +inf (-inf masks its id).
DSPARK_HD bool logit_is_error(float x) {
  const uint32_t bits = float_bits(x);
  return (bits & 0x7F800000u) == 0x7F800000u && bits != 0xFF800000u;
}

// The error of a position's logits, given whether any was an error and their max.
DSPARK_HD RowError logits_error(bool any_error, float max) {
  return any_error ? kRowNonFiniteLogits : (max == -INFINITY ? kRowAllMasked : kRowOk);
}

DSPARK_HD bool params_valid(const SamplingParams& p) {
  return p.temperature >= 0.0f && p.temperature < 3.0e38f && p.top_p > 0.0f && p.top_p <= 1.0f &&
         p.min_p >= 0.0f && p.min_p <= 1.0f;
}

}  // namespace dspark
