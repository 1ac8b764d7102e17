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

template <typename T>
struct RowMax {
  float max;
  bool finite;
};

// Largest logit and whether every logit is finite (one pass).
template <typename T>
RowMax<T> row_max(const T* x, index_t n) {
  float mx[kLanes];
  uint32_t bad[kLanes];
  for (int l = 0; l < kLanes; ++l) { mx[l] = -INFINITY; bad[l] = 0; }
  index_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float f = to_float(x[i + l]);
      mx[l] = f > mx[l] ? f : mx[l];
      bad[l] |= (float_bits(f) & 0x7F800000u) == 0x7F800000u;
    }
  }
  for (; i < n; ++i) {
    const float f = to_float(x[i]);
    mx[0] = f > mx[0] ? f : mx[0];
    bad[0] |= (float_bits(f) & 0x7F800000u) == 0x7F800000u;
  }
  RowMax<T> r{mx[0], bad[0] == 0};
  for (int l = 1; l < kLanes; ++l) {
    r.max = mx[l] > r.max ? mx[l] : r.max;
    r.finite = r.finite && bad[l] == 0;
  }
  return r;
}

// Lowest index holding the maximum (the greedy token; ties to the lowest index).
template <typename T>
index_t first_index_of(const T* x, index_t n, float value) {
  for (index_t i = 0; i < n; ++i)
    if (to_float(x[i]) == value) return i;
  return 0;
}

// e_v = exp((x_v - max) / T) into `e`; returns the fixed-point total.
template <typename T>
uint64_t softmax_numerators(const T* x, index_t n, float max, float inv_t, float* e) {
  uint64_t acc[kLanes] = {};
  index_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    // Two lane loops: GCC vectorises each, but not the fused float + uint64 body.
    for (int l = 0; l < kLanes; ++l) e[i + l] = exp_nonpositive((to_float(x[i + l]) - max) * inv_t);
    for (int l = 0; l < kLanes; ++l) acc[l] += mass_of(e[i + l]);
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

// The same numerators computed in place (e holds the logits on entry). A loop
// of its own: GCC vectorises the out-of-place one behind a runtime overlap
// check, which an in-place call fails, leaving it scalar.
inline uint64_t softmax_numerators_in_place(float* e, index_t n, float max, float inv_t) {
  uint64_t acc[kLanes] = {};
  index_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) e[i + l] = exp_nonpositive((e[i + l] - max) * inv_t);
    for (int l = 0; l < kLanes; ++l) acc[l] += mass_of(e[i + l]);
  }
  for (; i < n; ++i) {
    const float v = exp_nonpositive((e[i] - max) * inv_t);
    e[i] = v;
    acc[0] += mass_of(v);
  }
  uint64_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// Draws from the fixed-point distribution mass(v) (v in [0, n)) with total
// `total`: the first v whose cumulative mass exceeds U. Whole chunks that
// keep the running total <= U are skipped with vectorised (exact integer)
// sums; the crossing chunk is scanned one token at a time.
template <typename MassFn>
index_t draw(index_t n, uint64_t total, uint64_t bits, MassFn mass) {
  constexpr index_t kChunk = 16 * kLanes;
  const uint64_t u = scaled_draw(bits, total);
  uint64_t cum = 0;
  index_t start = 0;
  for (; start + kChunk <= n; start += kChunk) {
    uint64_t acc[kLanes] = {};
    for (index_t i = start; i < start + kChunk; i += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] += mass(i + l);
    uint64_t chunk = 0;
    for (int l = 0; l < kLanes; ++l) chunk += acc[l];
    if (cum + chunk > u) break;
    cum += chunk;
  }
  index_t last_positive = 0;
  for (index_t v = start; v < n; ++v) {
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
