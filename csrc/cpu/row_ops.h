// Row-wise helpers of the CPU sampling kernels (verify, markov_sample): max,
// greedy argmax, softmax numerators with a fixed-point total, inverse-CDF draw.
// Included by csrc/cpu/*.cpp only: the functions land in the ISA namespace of
// the including file (internal linkage), so each ISA build keeps its own copy.
// Loops run in 16-lane blocks so the compiler vectorises them without
// reassociating floating-point sums.
#pragma once
#include "dspark/math.h"
#include "dspark/sampling.h"

namespace dspark::cpu::DSPARK_ISA {
namespace {

constexpr int kLanes = 16;

struct RowMax {
  float max;
  index_t argmax;  // lowest index holding the max (greedy; ties to the lowest index)
  bool finite;
};

// Largest logit, its lowest index and whether every logit is finite, in one
// pass. Each lane keeps its first maximum (strict >), so the lowest index
// among lanes holding the overall max is the first occurrence.
template <typename T>
RowMax row_max(const T* x, index_t n) {
  float mx[kLanes];
  index_t at[kLanes];
  uint32_t bad[kLanes];
  for (int l = 0; l < kLanes; ++l) { mx[l] = -INFINITY; at[l] = l; bad[l] = 0; }
  index_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float f = to_float(x[i + l]);
      const bool better = f > mx[l];
      mx[l] = better ? f : mx[l];
      at[l] = better ? i + l : at[l];
      bad[l] |= (float_bits(f) & 0x7F800000u) == 0x7F800000u;
    }
  }
  RowMax r{-INFINITY, 0, true};
  for (int l = 0; l < kLanes; ++l) {
    if (mx[l] > r.max || (mx[l] == r.max && at[l] < r.argmax)) { r.max = mx[l]; r.argmax = at[l]; }
    r.finite = r.finite && bad[l] == 0;
  }
  for (; i < n; ++i) {  // tail indices exceed every lane's, so strict > keeps ties at the lane winner
    const float f = to_float(x[i]);
    if (f > r.max) { r.max = f; r.argmax = i; }
    r.finite = r.finite && (float_bits(f) & 0x7F800000u) != 0x7F800000u;
  }
  if (r.max == -INFINITY) r.argmax = 0;  // only reached with non-finite input (reported)
  return r;
}

// e_v = exp((x_v - max) / T) into `e`; returns the fixed-point total.
template <typename T>
uint64_t softmax_numerators(const T* x, index_t n, float max, float inv_t, float* e) {
  uint64_t acc[kLanes] = {};
  index_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = exp_nonpositive((to_float(x[i + l]) - max) * inv_t);
      e[i + l] = v;
      acc[l] += mass_of(v);
    }
  }
  for (; i < n; ++i) {
    const float v = exp_nonpositive((to_float(x[i]) - max) * inv_t);
    e[i] = v;
    acc[0] += mass_of(v);
  }
  uint64_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// Draws from the fixed-point distribution mass(v) (v in [0, n)) with total
// `total`: the first v whose cumulative mass exceeds U.
template <typename MassFn>
index_t draw(index_t n, uint64_t total, uint64_t bits, MassFn mass) {
  const uint64_t u = scaled_draw(bits, total);
  uint64_t cum = 0;
  index_t last_positive = 0;
  for (index_t v = 0; v < n; ++v) {
    const uint64_t m = mass(v);
    if (m == 0) continue;
    cum += m;
    last_positive = v;
    if (cum > u) return v;
  }
  return last_positive;  // unreachable when total is the exact sum
}

}  // namespace
}  // namespace dspark::cpu::DSPARK_ISA
