// CUDA kernel of `schedule_verify_lengths` / `plan_capacity`: one CTA ranks
// all R * G candidates with a block radix sort of their keys (schedule.h),
// scans their fixed-point survivals, finds the admission count (first
// non-improvement, argmax, or capacity) with block reductions and writes the
// per-request lengths. Sync-free and allocation-free: graph-capturable for a
// fixed R.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <climits>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "../bindings/schedule.h"

namespace dspark {
namespace {

constexpr int kThreads = 1024;
constexpr int kItems = 4;  // kThreads * kItems = kScheduleCudaMaxCandidates
static_assert(kThreads * kItems == kScheduleCudaMaxCandidates, "one CTA holds every candidate");
using U64 = unsigned long long;

struct Best {  // Theta_i and i, for the argmax (ties to the smaller i)
  double theta;
  int i;
};
struct BestOp {
  __device__ Best operator()(const Best& a, const Best& b) const {
    return (b.theta > a.theta || (b.theta == a.theta && b.i < a.i)) ? b : a;
  }
};
struct MinIntOp {
  __device__ int operator()(int a, int b) const { return a < b ? a : b; }
};

using Sort = cub::BlockRadixSort<U64, kThreads, kItems>;
using Scan = cub::BlockScan<U64, kThreads>;
using ReduceInt = cub::BlockReduce<int, kThreads>;
using ReduceBest = cub::BlockReduce<Best, kThreads>;

__global__ void __launch_bounds__(kThreads) schedule_kernel(ScheduleProblem P) {
  __shared__ union {
    typename Sort::TempStorage sort;
    typename Scan::TempStorage scan;
    typename ReduceInt::TempStorage reduce_int;
    typename ReduceBest::TempStorage reduce_best;
  } tmp;
  __shared__ int s_int;
  const int R = static_cast<int>(P.requests), G = static_cast<int>(P.steps), N = R * G;
  const int tid = threadIdx.x;

  // Invalid input: every output reads -1 (raising would need a host sync).
  int bad = 0;
  for (int i = tid; i < N; i += kThreads) bad |= !confidence_valid(P.confidence[i]);
  for (index_t i = tid; i < P.sps_len; i += kThreads) bad |= !sps_valid(P.sps[i]);
  if (P.max_len != nullptr)
    for (int r = tid; r < R; r += kThreads) bad |= P.max_len[r] < 0 || P.max_len[r] > G;
  if (P.mode == ScheduleMode::kAsync && tid == 0) bad |= P.capacity[0] < R;
  if (__syncthreads_or(bad)) {
    if (P.mode == ScheduleMode::kPlan) {
      if (tid == 0) P.capacity_out[0] = -1;
    } else {
      for (int r = tid; r < R; r += kThreads) P.lengths[r] = -1;
    }
    return;
  }

  // Keys in blocked arrangement: thread t holds flat indices t * kItems + m.
  U64 keys[kItems];
  int included = 0;
  for (int m = 0; m < kItems; ++m) {
    const int flat = tid * kItems + m;
    keys[m] = kExcludedKey;
    if (flat < N) {
      const int r = flat / G, j = flat % G;
      const int limit = P.max_len == nullptr ? G : P.max_len[r];
      const float a = prefix_survival(P.confidence + static_cast<index_t>(r) * G, j);
      if (a > 0.0f && j < limit) {
        keys[m] = survival_key(a, flat);
        ++included;
      }
    }
  }
  const int n = ReduceInt(tmp.reduce_int).Sum(included);
  if (tid == 0) s_int = n;
  __syncthreads();
  const int candidates = s_int;
  Sort(tmp.sort).Sort(keys, 0, kScheduleKeyBits);
  __syncthreads();

  // Sorted rank of keys[m] is tid * kItems + m; i = rank + 1 candidates admitted through it.
  U64 units[kItems], incl[kItems];
  for (int m = 0; m < kItems; ++m)
    units[m] = tid * kItems + m < candidates ? tau_units(key_survival(keys[m])) : 0;
  Scan(tmp.scan).InclusiveSum(units, incl);
  __syncthreads();
  const U64 base = static_cast<U64>(R) << 32;

  int admit;
  if (P.mode == ScheduleMode::kAsync) {
    admit = P.capacity[0] - R < candidates ? P.capacity[0] - R : candidates;
  } else if (P.mode == ScheduleMode::kSync) {
    int first_stop = INT_MAX;  // first i with Theta_i <= Theta_{i-1}
    for (int m = 0; m < kItems; ++m) {
      const int i = tid * kItems + m + 1;
      if (i > candidates) break;
      const double prev = schedule_theta(base + incl[m] - units[m], R + i - 1, P.sps, P.sps_len);
      const double cur = schedule_theta(base + incl[m], R + i, P.sps, P.sps_len);
      if (!(cur > prev)) {
        first_stop = i;
        break;
      }
    }
    const int stop = ReduceInt(tmp.reduce_int).Reduce(first_stop, MinIntOp());
    if (tid == 0) s_int = stop == INT_MAX ? candidates : stop - 1;
    __syncthreads();
    admit = s_int;
  } else {
    Best best{tid == 0 ? schedule_theta(base, R, P.sps, P.sps_len) : -1.0, 0};
    for (int m = 0; m < kItems; ++m) {
      const int i = tid * kItems + m + 1;
      if (i > candidates) break;
      const Best cur{schedule_theta(base + incl[m], R + i, P.sps, P.sps_len), i};
      best = BestOp()(best, cur);
    }
    const Best top = ReduceBest(tmp.reduce_best).Reduce(best, BestOp());
    if (tid == 0) P.capacity_out[0] = R + top.i;
    return;
  }

  for (int r = tid; r < R; r += kThreads) P.lengths[r] = 0;
  __syncthreads();
  for (int m = 0; m < kItems; ++m)
    if (tid * kItems + m < admit) atomicAdd(&P.lengths[key_flat(keys[m]) / G], 1);
}

}  // namespace

void schedule_cuda_launch(const ScheduleProblem& P) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  schedule_kernel<<<1, kThreads, 0, stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dspark
