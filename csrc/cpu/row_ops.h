// Row-wise helpers of the CPU sampling kernels (verify, markov_sample): max,
// greedy argmax, softmax numerators with a fixed-point total, inverse-CDF draw.
// Included by csrc/cpu/*.cpp only: the functions land in the ISA namespace of
// the including file (internal linkage), so each ISA build keeps its own copy.
// Loops run in 16-lane blocks so the compiler vectorises them without
// reassociating floating-point sums.
#pragma once
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "dspark/math.h"
#include "dspark/sampling.h"

namespace dspark::cpu::DSPARK_ISA {
namespace {

constexpr int kLanes = 16;

struct RowMax {
  float max;       // -inf when every id is masked
  index_t argmax;  // lowest index holding the max (greedy; ties to the lowest index)
  bool any_error;  // a NaN or +inf logit (sampling.h: -inf masks its id)

  RowError error() const { return logits_error(any_error, max); }
};

#if defined(__AVX512F__)
// 16 values as floats (bf16 widened by a shift, fp16 by the hardware conversion).
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const bf16_bits* x) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const fp16_bits* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}
#endif

// Largest logit, its lowest index and whether any logit is NaN or +inf, in one
// pass. Each lane keeps its first maximum (strict >), so the lowest index
// among lanes holding the overall max is the first occurrence.
template <typename T>
RowMax row_max(const T* x, index_t n) {
  float mx[kLanes];
  index_t at[kLanes];
  uint32_t bad[kLanes];
  for (int l = 0; l < kLanes; ++l) { mx[l] = -INFINITY; at[l] = l; bad[l] = 0; }
  index_t i = 0;
#if defined(__AVX512F__)
  // The compiler does not vectorise the index tracking: lanes hold int32 indices (V < 2^31).
  static_assert(kLanes == 16);
  __m512 vmx = _mm512_set1_ps(-INFINITY);
  __m512i vat = _mm512_setzero_si512();
  __m512i vidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(kLanes), exp_mask = _mm512_set1_epi32(0x7F800000);
  const __m512i neg_inf = _mm512_set1_epi32(static_cast<int32_t>(0xFF800000u));
  __mmask16 vbad = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const __m512 f = load16(x + i);
    const __mmask16 better = _mm512_cmp_ps_mask(f, vmx, _CMP_GT_OQ);
    vmx = _mm512_mask_mov_ps(vmx, better, f);
    vat = _mm512_mask_mov_epi32(vat, better, vidx);
    const __m512i bits = _mm512_castps_si512(f);  // logit_is_error, 16 lanes at a time
    vbad |= _mm512_mask_cmpneq_epi32_mask(_mm512_cmpeq_epi32_mask(_mm512_and_si512(bits, exp_mask), exp_mask),
                                          bits, neg_inf);
    vidx = _mm512_add_epi32(vidx, step);
  }
  int32_t at32[kLanes];
  _mm512_storeu_ps(mx, vmx);
  _mm512_storeu_si512(at32, vat);
  for (int l = 0; l < kLanes; ++l) {
    at[l] = mx[l] == -INFINITY ? l : at32[l];
    bad[l] = (vbad >> l) & 1u;
  }
#else
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float f = to_float(x[i + l]);
      const bool better = f > mx[l];
      mx[l] = better ? f : mx[l];
      at[l] = better ? i + l : at[l];
      bad[l] |= logit_is_error(f);
    }
  }
#endif
  RowMax r{-INFINITY, 0, false};
  for (int l = 0; l < kLanes; ++l) {
    if (mx[l] > r.max || (mx[l] == r.max && at[l] < r.argmax)) { r.max = mx[l]; r.argmax = at[l]; }
    r.any_error = r.any_error || bad[l] != 0;
  }
  for (; i < n; ++i) {  // tail indices exceed every lane's, so strict > keeps ties at the lane winner
    const float f = to_float(x[i]);
    if (f > r.max) { r.max = f; r.argmax = i; }
    r.any_error = r.any_error || logit_is_error(f);
  }
  if (r.max == -INFINITY) r.argmax = 0;  // only reached when every id is masked (reported)
  return r;
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

// Sum of mass(v) over [0, n), in lanes (integer sums: the order does not change the result).
template <typename MassFn>
uint64_t mass_total(index_t n, MassFn mass) {
  uint64_t acc[kLanes] = {};
  index_t v = 0;
  for (; v + kLanes <= n; v += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += mass(v + l);
  for (; v < n; ++v) acc[0] += mass(v);
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
