// Confidence-scheduled verification (DSpark Algorithm 1 and its asynchronous
// variant): plain-data problem and the arithmetic the CPU and CUDA kernels share.
//
// Candidate (r, j) (j 0-based: verifying it makes l_r = j + 1) has survival
// a_{r,j} = c_{r,0} * ... * c_{r,j} (float products left to right). Candidates
// with a > 0 and j < max_len_r are ranked by a descending, ties to the lower
// r, then the lower j: as a sort key, (bits of a reversed, flat index r*G + j)
// ascending. Since a is non-increasing in j, every prefix of the ranking
// admits a prefix of each request's block.
//
// Admitting the first i ranked candidates gives B_i = R + i batch tokens and
// tau_i = R + (sum of their a) expected accepted tokens; Theta_i = tau_i * SPS(B_i)
// (SPS(B) = 0 for B past the table). tau is summed in 32-bit fixed point, so
// it is exact whatever the summation order, and Theta_i is one IEEE multiply:
// CPU and CUDA take the same decisions, ties included.
//   sync (Algorithm 1): admit while Theta_i > Theta_{i-1}; stop at the first i where not.
//   async: admit min(capacity - R, number of candidates).
//   plan: capacity = R + argmax_i Theta_i (i = 0.. all candidates, no break; ties to the smaller i).
#pragma once
#include "dspark/math.h"

namespace dspark {

enum class ScheduleMode : int32_t { kSync = 0, kAsync = 1, kPlan = 2 };

enum ScheduleError : int32_t {
  kScheduleOk = 0,
  kScheduleBadConfidence = 1,  // outside [0, 1] or NaN
  kScheduleBadSps = 2,         // negative, NaN or inf
  kScheduleBadMaxLen = 3,      // outside [0, G]
  kScheduleBadCapacity = 4,    // capacity < R
};

struct ScheduleProblem {
  index_t requests = 0, steps = 0;   // R, G
  const float* confidence = nullptr; // [R, G] contiguous
  const double* sps = nullptr;       // [sps_len]
  index_t sps_len = 0;
  const int32_t* max_len = nullptr;  // [R] or null (G)
  const int32_t* capacity = nullptr; // [1] (async)
  ScheduleMode mode = ScheduleMode::kSync;
  int32_t* lengths = nullptr;        // [R] out (sync, async)
  int32_t* capacity_out = nullptr;   // [1] out (plan)
};

// Flat candidate indices take kScheduleIndexBits bits of the sort key, and tau
// in fixed point must stay below 2^53 (exact in a double): R * (G + 1) < 2^21.
constexpr int kScheduleIndexBits = 21;
constexpr int kScheduleKeyBits = 31 + kScheduleIndexBits;
constexpr uint64_t kExcludedKey = (uint64_t{1} << kScheduleKeyBits) - 1;  // sorts after every candidate
constexpr uint32_t kOneBits = 0x3F800000u;                                // bits of 1.0f
constexpr double kTauScale = 4294967296.0;                                // 2^32

DSPARK_HD float prefix_survival(const float* c_row, index_t j) {
  float a = 1.0f;
  for (index_t i = 0; i <= j; ++i) a *= c_row[i];
  return a;
}

// a in (0, 1]: larger a -> smaller key; ties -> smaller flat index.
DSPARK_HD uint64_t survival_key(float a, index_t flat) {
  return (static_cast<uint64_t>(kOneBits - float_bits(a)) << kScheduleIndexBits) | static_cast<uint64_t>(flat);
}
DSPARK_HD float key_survival(uint64_t key) {
  return bits_float(kOneBits - static_cast<uint32_t>(key >> kScheduleIndexBits));
}
DSPARK_HD index_t key_flat(uint64_t key) {
  return static_cast<index_t>(key & ((uint64_t{1} << kScheduleIndexBits) - 1));
}

// a in [0, 1] as 32-bit fixed point (exact scaling by 2^32, fraction truncated).
DSPARK_HD uint64_t tau_units(float a) { return static_cast<uint64_t>(a * 4294967296.0f); }

// Theta = tau * SPS(batch_tokens), tau in fixed-point units.
DSPARK_HD double schedule_theta(uint64_t tau, index_t batch_tokens, const double* sps, index_t sps_len) {
  return batch_tokens < sps_len ? static_cast<double>(tau) * sps[batch_tokens] : 0.0;
}

DSPARK_HD bool confidence_valid(float c) { return c >= 0.0f && c <= 1.0f; }
DSPARK_HD bool sps_valid(double s) { return s >= 0.0 && s < 1.0e308; }

}  // namespace dspark
