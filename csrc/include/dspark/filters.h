// Top-k / top-p / min-p as ONE threshold on the softmax numerators
// e_v = exp((x_v - max) / T) in (0, 1]: every filter keeps the tokens whose
// e_v is at least some value, so the kept set is {v : e_v >= t} with t the
// largest of the three thresholds (ties at the threshold are kept).
//
// Thresholds are found by an exact radix select over the float bits of e_v
// (positive floats order like their bit patterns): three levels of 1024 bins
// (bits 30..20, 19..10, 9..0). Each level needs a histogram of the candidates
// whose higher bits match the prefix chosen so far; the walk below turns the
// histogram into the next prefix. Histograms hold counts (top-k) or exact
// fixed-point masses (top-p), so the result is independent of summation order.
#pragma once
#include "dspark/math.h"

namespace dspark {

constexpr int kRadixLevels = 3;
constexpr int kRadixBins = 1024;

DSPARK_HD int radix_shift(int level) { return level == 0 ? 20 : (level == 1 ? 10 : 0); }
DSPARK_HD uint32_t radix_prefix_mask(int level) {  // bits fixed before `level`
  return level == 0 ? 0u : (level == 1 ? 0xFFF00000u : 0xFFFFFC00u);
}
DSPARK_HD int radix_bin(uint32_t bits, int level) {
  return static_cast<int>((bits >> radix_shift(level)) & (kRadixBins - 1));
}
// Does e (bits) take part in `level` given the prefix chosen so far, and is it
// at least `floor_bits` (the threshold of an earlier filter)?
DSPARK_HD bool radix_candidate(uint32_t bits, int level, uint32_t prefix, uint32_t floor_bits) {
  return bits >= floor_bits && (bits & radix_prefix_mask(level)) == prefix;
}

// Walks a level's histogram from the largest bin down and returns the bin in
// which the running total reaches `*want`; subtracts what the bins above held.
// Returns -1 when the candidates together hold less than `*want`.
template <typename Count>
DSPARK_HD int radix_walk(const Count* hist, Count* want) {
  for (int bin = kRadixBins - 1; bin >= 0; --bin) {
    if (hist[bin] >= *want) return bin;
    *want -= hist[bin];
  }
  return -1;
}

DSPARK_HD uint32_t radix_extend(uint32_t prefix, int level, int bin) {
  return prefix | (static_cast<uint32_t>(bin) << radix_shift(level));
}

// min-p keeps e_v >= min_p (the max has e = 1).
DSPARK_HD uint32_t min_p_floor_bits(float min_p) { return min_p > 0.0f ? float_bits(min_p) : 0u; }

// The fixed-point mass top-p must reach: ceil(top_p * z), at least 1.
DSPARK_HD uint64_t top_p_target(float top_p, uint64_t z) {
  const double t = static_cast<double>(top_p) * static_cast<double>(z);
  uint64_t want = static_cast<uint64_t>(t);
  if (static_cast<double>(want) < t) ++want;
  return want == 0 ? 1 : (want > z ? z : want);
}

}  // namespace dspark
