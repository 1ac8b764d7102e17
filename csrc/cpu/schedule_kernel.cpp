// CPU kernel of `schedule_verify_lengths` / `plan_capacity`: rank the
// candidates by sort key, then walk the admission path once (schedule.h).
// Compiled once per ISA (cmake/cpu_isa.cmake).
#include <algorithm>
#include <climits>

#include "dspark/schedule.h"

namespace dspark::cpu::DSPARK_ISA {

// `keys` is scratch for R * G keys. Returns a ScheduleError (nothing written unless kScheduleOk).
int32_t schedule_run(const ScheduleProblem& P, uint64_t* keys) {
  const index_t R = P.requests, G = P.steps;
  for (index_t i = 0; i < R * G; ++i)
    if (!confidence_valid(P.confidence[i])) return kScheduleBadConfidence;
  for (index_t i = 0; i < P.sps_len; ++i)
    if (!sps_valid(P.sps[i])) return kScheduleBadSps;
  if (P.max_len != nullptr)
    for (index_t r = 0; r < R; ++r)
      if (P.max_len[r] < 0 || P.max_len[r] > G) return kScheduleBadMaxLen;
  if (P.mode == ScheduleMode::kAsync && P.capacity[0] < R) return kScheduleBadCapacity;

  index_t n = 0;  // candidates
  for (index_t r = 0; r < R; ++r) {
    const index_t limit = P.max_len == nullptr ? G : P.max_len[r];
    float a = 1.0f;
    for (index_t j = 0; j < limit; ++j) {
      a *= P.confidence[r * G + j];  // the same left-to-right product as prefix_survival
      if (a > 0.0f) keys[n++] = survival_key(a, r * G + j);
    }
  }
  std::sort(keys, keys + n);

  const uint64_t base = static_cast<uint64_t>(R) << 32;  // the R tokens every request verifies
  index_t admit = 0;
  if (P.mode == ScheduleMode::kAsync) {
    admit = std::min<index_t>(P.capacity[0] - R, n);
  } else {
    uint64_t tau = base;
    double best = schedule_theta(tau, R, P.sps, P.sps_len);
    index_t best_i = 0;
    for (index_t i = 1; i <= n; ++i) {
      tau += tau_units(key_survival(keys[i - 1]));
      const double theta = schedule_theta(tau, R + i, P.sps, P.sps_len);
      if (theta > best) {
        best = theta;
        best_i = i;
      } else if (P.mode == ScheduleMode::kSync) {
        break;  // Algorithm 1: stop at the first non-improvement (this keeps verification lossless)
      }
    }
    admit = best_i;
  }
  if (P.mode == ScheduleMode::kPlan) {
    P.capacity_out[0] = static_cast<int32_t>(R + admit);
    return kScheduleOk;
  }
  for (index_t r = 0; r < R; ++r) P.lengths[r] = 0;
  for (index_t i = 0; i < admit; ++i) ++P.lengths[key_flat(keys[i]) / G];
  return kScheduleOk;
}

}  // namespace dspark::cpu::DSPARK_ISA
