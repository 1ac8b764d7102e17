// CUDA kernels of `verify`. Each position of a row is a few passes over the
// vocabulary (max, softmax numerators, radix-select histograms for the
// filters, inverse-CDF draw) by a "team": one CTA, or on sm_90 a cluster of
// CTAs that each take a contiguous slice of the vocabulary and combine their
// partial results through distributed shared memory. The arithmetic comes from
// the same headers as the CPU kernel (Philox, exp, fixed-point masses, radix
// walk, acceptance rule) and every combination is exact (max, min, integer
// sums, integer prefix sums), so both pick the same tokens whatever the launch.
//
// Two launch shapes (DSPARK_VERIFY_LAUNCH=chain|positions|clusters forces one):
//   chain      one CTA per request row, positions in order, stopping at the
//              first rejection: reads only the positions the chain reaches.
//              Used when the batch alone fills the GPU.
//   positions  one team per (row, position), all positions at once (a
//              position's accept test, residual and bonus draws use its own
//              random numbers, so they do not depend on the earlier ones), then
//              one thread per row walks the chain over the per-position
//              results. At small batch this puts (K + 1) x team-size CTAs per
//              row on the GPU instead of one; `clusters` is this shape with
//              8-CTA clusters (sm_90).
// No host sync, no allocation that depends on data: graph-capturable.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "../bindings/verify.h"
#include "block_ops.cuh"
#include "dspark/filters.h"
#include "dspark/verify_problem.h"

namespace dspark {
namespace {

constexpr int kThreads = 512;
constexpr int kClusterRanks = 8;  // CTAs per cluster in the `clusters` launch (the portable maximum)
constexpr int kMaxDevices = 64;
using Ops = BlockOps<kThreads>;

// What one position of one row decided: the draft was accepted, or the chain stops here emitting `token`,
// or the row is invalid (a RowError, positive).
enum PositionStatus : int32_t { kPositionAccepted = -1, kPositionEmits = -2 };
struct PositionResult {
  int32_t status;
  int32_t token;
};

template <int kRanks>
struct Shared {
  typename Ops::Storage ops;
  U64 hist[kRadixBins];
  U64 hist_total[kRanks > 1 ? kRadixBins : 1];  // the cluster's histogram (kRanks > 1)
  uint32_t prefix;
  int flag;
  // Cluster exchange: each CTA's partial result (read by the others) and the combined result.
  float slot_f, result_f;
  U64 slot_u, result_u;
  long long slot_i, result_i;
};

// A team of kRanks CTAs working on one vocabulary row: CTA `rank` takes [lo, hi). Every reduction returns the
// team-wide result to every thread of every CTA; every member must make the same calls in the same order
// (all branches in the kernels below depend on team-wide values only).
template <int kRanks>
struct Team {
  Shared<kRanks>& sh;
  index_t lo, hi;
  int rank;

  __device__ Team(Shared<kRanks>& s, index_t n) : sh(s) {
    rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kRanks > 1) rank = static_cast<int>(cooperative_groups::this_cluster().block_rank());
#endif
    const index_t chunk = (n + kRanks - 1) / kRanks;
    lo = rank * chunk < n ? rank * chunk : n;
    hi = lo + chunk < n ? lo + chunk : n;
  }

  __device__ static void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cooperative_groups::this_cluster().sync();
#else
    __trap();  // clusters are launched on sm_90+ only (verify_cuda_launch checks)
#endif
  }
  template <typename T>
  __device__ static T* remote(T* local, int r) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return cooperative_groups::this_cluster().map_shared_rank(local, static_cast<unsigned>(r));
#else
    (void)r;
    return local;
#endif
  }

  // Combines the CTAs' block-wide values `v` with `op` (rank order; the ops are exact, so order is moot).
  template <typename T, typename Op>
  __device__ T combine(T v, T& slot, T& result, Op op) {
    if constexpr (kRanks == 1) {
      return v;
    } else {
      if (threadIdx.x == 0) slot = v;
      cluster_sync();
      if (threadIdx.x == 0) {
        T r = *remote(&slot, 0);
#pragma unroll
        for (int i = 1; i < kRanks; ++i) r = op(r, *remote(&slot, i));
        result = r;
      }
      cluster_sync();  // every rank has read the slots (free again), and `result` is visible in the CTA
      return result;
    }
  }

  __device__ float max(float v) { return combine(Ops::max(v, sh.ops), sh.slot_f, sh.result_f, MaxOp()); }
  __device__ long long min(long long v) { return combine(Ops::min(v, sh.ops), sh.slot_i, sh.result_i, MinOp()); }
  struct Sum {
    uint64_t slice, total;  // this CTA's part and the team's total
  };
  __device__ Sum sum(U64 v) {
    const U64 slice = Ops::sum(v, sh.ops);
    return {slice, combine(slice, sh.slot_u, sh.result_u, [](U64 a, U64 b) { return a + b; })};
  }
  __device__ bool any(bool v) {
    const U64 mine = __syncthreads_or(v) ? 1 : 0;
    return combine(mine, sh.slot_u, sh.result_u, [](U64 a, U64 b) { return a + b; }) > 0;
  }

  // The team's histogram (sh.hist holds this CTA's, over its slice).
  __device__ const U64* histogram() {
    if constexpr (kRanks == 1) {
      return sh.hist;
    } else {
      cluster_sync();
      for (int bin = threadIdx.x; bin < kRadixBins; bin += kThreads) {
        U64 total = 0;
#pragma unroll
        for (int i = 0; i < kRanks; ++i) total += *remote(&sh.hist[bin], i);
        sh.hist_total[bin] = total;
      }
      cluster_sync();  // every rank has read sh.hist before any rank clears it again
      return sh.hist_total;
    }
  }

  // The first v whose cumulative mass exceeds U = scaled_draw(bits, m.total), given this CTA's part m.slice:
  // the CTA whose slice holds U scans it, and the others learn the result from it.
  template <typename MassFn>
  __device__ index_t draw(Sum m, uint64_t bits, MassFn mass) {
    const uint64_t u = scaled_draw(bits, m.total);
    if constexpr (kRanks == 1) {
      return Ops::draw_at(lo, hi, u, mass, sh.ops);
    } else {
      if (threadIdx.x == 0) sh.slot_u = m.slice;
      cluster_sync();
      uint64_t before = 0;  // mass of the slices before this one
      for (int i = 0; i < rank; ++i) before += *remote(&sh.slot_u, i);
      cluster_sync();
      const bool mine = before <= u && u - before < m.slice;
      const index_t token = mine ? Ops::draw_at(lo, hi, u - before, mass, sh.ops) : -1;
      return static_cast<index_t>(max_token(token));
    }
  }

 private:
  __device__ long long max_token(long long token) {  // the owner's token to every CTA (the others hold -1)
    return combine(token, sh.slot_i, sh.result_i, [](long long a, long long b) { return a > b ? a : b; });
  }
};

template <typename T>
__device__ __forceinline__ float numerator(const T* x, index_t v, float max, float inv_t) {
  return exp_nonpositive((to_float(x[v]) - max) * inv_t);
}

template <int kRanks, typename T>
__device__ typename Team<kRanks>::Sum kept_mass(Team<kRanks>& team, const T* x, float max, float inv_t,
                                                uint32_t floor_bits) {
  U64 acc = 0;
  for (index_t v = team.lo + threadIdx.x; v < team.hi; v += kThreads) {
    const float e = numerator(x, v, max, inv_t);
    acc += float_bits(e) >= floor_bits ? mass_of(e) : 0;
  }
  return team.sum(acc);
}

// The exact radix select of filters.h over the team's vocabulary.
template <bool kByMass, int kRanks, typename T>
__device__ uint32_t radix_select(Team<kRanks>& team, const T* x, float max, float inv_t, uint32_t floor_bits,
                                 uint64_t want) {
  Shared<kRanks>& sh = team.sh;
  uint32_t prefix = 0;
  for (int level = 0; level < kRadixLevels; ++level) {
    for (int i = threadIdx.x; i < kRadixBins; i += kThreads) sh.hist[i] = 0;
    __syncthreads();
    for (index_t v = team.lo + threadIdx.x; v < team.hi; v += kThreads) {
      const float e = numerator(x, v, max, inv_t);
      const uint32_t bits = float_bits(e);
      if (radix_candidate(bits, level, prefix, floor_bits))
        atomicAdd(&sh.hist[radix_bin(bits, level)], kByMass ? static_cast<U64>(mass_of(e)) : U64{1});
    }
    __syncthreads();
    const U64* hist = team.histogram();
    if (threadIdx.x == 0) {  // every CTA walks the same histogram to the same bin
      const int bin = radix_walk(hist, reinterpret_cast<U64*>(&want));
      sh.flag = bin;
      if (bin >= 0) sh.prefix = radix_extend(prefix, level, bin);
    }
    __syncthreads();
    if (sh.flag < 0) return floor_bits;  // fewer than `want`: keep everything
    prefix = sh.prefix;
    __syncthreads();
  }
  return prefix > floor_bits ? prefix : floor_bits;
}

// Position j of row b (j <= l = num_draft[b]; draft j when j < l, else the bonus position), the same on
// every thread of the team.
template <int kRanks, typename L, typename Q>
__device__ PositionResult solve_position(Team<kRanks>& team, const VerifyProblem& P, index_t b, index_t j,
                                         index_t l, const SamplingParams& sp) {
  const index_t V = P.vocab;
  const L* x = static_cast<const L*>(P.logits) + b * P.logits_stride_b + j * P.logits_stride_k;
  float mx = -INFINITY;
  int bad = 0;
  for (index_t v = team.lo + threadIdx.x; v < team.hi; v += kThreads) {
    const float f = to_float(x[v]);
    mx = f > mx ? f : mx;
    bad |= logit_is_error(f);
  }
  const bool any_error = team.any(bad);
  const float max = team.max(mx);
  const RowError error = logits_error(any_error, max);  // NaN / +inf, or every id masked (-inf)
  if (error != kRowOk) return {error, -1};
  const bool is_draft = j < l;
  const index_t xj = is_draft ? P.draft_tokens[b * P.num_draft_max + j] : 0;  // in range: row_check

  if (sp.temperature == 0.0f) {
    long long first = V;
    for (index_t v = team.lo + threadIdx.x; v < team.hi; v += kThreads)
      if (to_float(x[v]) == max) { first = v; break; }
    const index_t best = team.min(first);
    if (is_draft && xj == best) return {kPositionAccepted, static_cast<int32_t>(xj)};
    return {kPositionEmits, static_cast<int32_t>(best)};
  }

  const float inv_t = 1.0f / sp.temperature;
  U64 acc = 0;
  for (index_t v = team.lo + threadIdx.x; v < team.hi; v += kThreads) acc += mass_of(numerator(x, v, max, inv_t));
  const typename Team<kRanks>::Sum z_all = team.sum(acc);
  uint32_t t = 0;
  uint64_t z_k = z_all.total;
  if (sp.top_k > 0 && sp.top_k < V) {
    t = radix_select<false>(team, x, max, inv_t, 0, static_cast<uint64_t>(sp.top_k));
    z_k = kept_mass(team, x, max, inv_t, t).total;
  }
  if (sp.top_p < 1.0f) t = radix_select<true>(team, x, max, inv_t, t, top_p_target(sp.top_p, z_k));
  const uint32_t min_p_bits = min_p_floor_bits(sp.min_p);
  t = t > min_p_bits ? t : min_p_bits;
  const typename Team<kRanks>::Sum z = t == 0 ? z_all : kept_mass(team, x, max, inv_t, t);
  auto p_mass = [&](index_t v) -> uint64_t {
    const float e = numerator(x, v, max, inv_t);
    return float_bits(e) >= t ? mass_of(e) : 0;
  };
  const uint64_t bits = random_u64(random_words(sp.seed, sp.stream, sp.offset, j, Purpose::kVerifySample));
  if (!is_draft) return {kPositionEmits, static_cast<int32_t>(team.draw(z, bits, p_mass))};

  // Draft j: formed only here, so no pointer is formed past draft_probs' last row (the bonus position has none).
  const bool one_hot = P.draft_probs == nullptr;
  const Q* q = one_hot ? nullptr : P.draft_row<Q>(b, j);
  const float qx = one_hot ? 1.0f : P.draft_prob(q, xj);
  if (!(qx > 0.0f)) return {kRowZeroDraftProb, -1};
  const float u = uniform_open01(random_words(sp.seed, sp.stream, sp.offset, j, Purpose::kVerifyAccept).v[0]);
  if (accept_draft(u, qx, p_mass(xj), z.total)) return {kPositionAccepted, static_cast<int32_t>(xj)};
  auto residual = [&](index_t v) -> uint64_t {
    const uint64_t qm = one_hot ? (v == xj ? z.total : 0) : draft_mass(P.draft_prob(q, v), z.total);
    return residual_mass(p_mass(v), qm);
  };
  U64 r_acc = 0;
  for (index_t v = team.lo + threadIdx.x; v < team.hi; v += kThreads) r_acc += residual(v);
  const typename Team<kRanks>::Sum r_total = team.sum(r_acc);
  // r_total == 0 only through rounding (p(x) < q(x) implies some p_v > q_v): fall back to p.
  const index_t token = r_total.total > 0 ? team.draw(r_total, bits, residual) : team.draw(z, bits, p_mass);
  return {kPositionEmits, static_cast<int32_t>(token)};
}

// `chain`: CTA b walks row b's positions in order and stops at the first rejection.
template <typename L, typename Q>
__global__ void __launch_bounds__(kThreads) verify_chain_kernel(VerifyProblem P) {
  __shared__ Shared<1> sh;
  Team<1> team(sh, P.vocab);
  const index_t b = blockIdx.x, K = P.num_draft_max;
  int32_t* out = P.tokens + b * (K + 1);
  for (index_t j = threadIdx.x; j <= K; j += kThreads) out[j] = -1;
  __syncthreads();
  auto finish = [&](index_t accepted, int32_t err) {
    if (threadIdx.x == 0) {
      P.num_accepted[b] = static_cast<int32_t>(accepted);
      P.row_error[b] = err;
      if (err != kRowOk)
        for (index_t j = 0; j <= K; ++j) out[j] = -1;
    }
  };
  const SamplingParams sp = P.params(b);
  const RowError bad_row = P.row_check(b, sp);  // parameters, and every drafted id before any sampling
  if (bad_row != kRowOk) return finish(-1, bad_row);
  const index_t l = P.num_draft[b];
  for (index_t j = 0; j <= l; ++j) {
    const PositionResult r = solve_position<1, L, Q>(team, P, b, j, l, sp);
    if (r.status > 0) return finish(-1, r.status);
    if (threadIdx.x == 0) out[j] = r.token;
    if (r.status == kPositionEmits) return finish(j, kRowOk);
  }
}

// `positions`: team (x, j, b) solves position j of row b into results[b, j].
template <int kRanks, typename L, typename Q>
__global__ void __launch_bounds__(kThreads) verify_position_kernel(VerifyProblem P, PositionResult* results) {
  __shared__ Shared<kRanks> sh;
  Team<kRanks> team(sh, P.vocab);
  const index_t j = blockIdx.y, b = blockIdx.z;
  const SamplingParams sp = P.params(b);
  if (P.row_check(b, sp) != kRowOk || j > P.num_draft[b]) return;  // uniform across the team
  const PositionResult r = solve_position<kRanks, L, Q>(team, P, b, j, P.num_draft[b], sp);
  if (team.rank == 0 && threadIdx.x == 0) results[b * (P.num_draft_max + 1) + j] = r;
}

// `positions`, second step: thread b walks row b's chain over the per-position results.
__global__ void verify_finish_kernel(VerifyProblem P, const PositionResult* results) {
  const index_t b = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= P.batch) return;
  const index_t K = P.num_draft_max;
  int32_t* out = P.tokens + b * (K + 1);
  for (index_t j = 0; j <= K; ++j) out[j] = -1;
  P.num_accepted[b] = -1;
  const RowError bad_row = P.row_check(b, P.params(b));
  if (bad_row != kRowOk) {
    P.row_error[b] = bad_row;
    return;
  }
  for (index_t j = 0; j <= P.num_draft[b]; ++j) {
    const PositionResult r = results[b * (K + 1) + j];
    if (r.status > 0) {  // the chain reached an invalid position
      for (index_t i = 0; i < j; ++i) out[i] = -1;
      P.row_error[b] = r.status;
      return;
    }
    out[j] = r.token;
    if (r.status == kPositionEmits) {
      P.num_accepted[b] = static_cast<int32_t>(j);
      P.row_error[b] = kRowOk;
      return;
    }
  }
}

enum class Launch { automatic, chain, positions, clusters };

Launch requested_launch() {
  const char* s = std::getenv("DSPARK_VERIFY_LAUNCH");
  if (s == nullptr || *s == '\0' || std::strcmp(s, "auto") == 0) return Launch::automatic;
  if (std::strcmp(s, "chain") == 0) return Launch::chain;
  if (std::strcmp(s, "positions") == 0) return Launch::positions;
  TORCH_CHECK(std::strcmp(s, "clusters") == 0,
              "verify: DSPARK_VERIFY_LAUNCH must be auto, chain, positions or clusters, got '", s, "'");
  return Launch::clusters;
}

// Whether the current device runs the cluster kernels: compute capability 9.0+ and sm_90+ code in this
// build (asked once per device; no runtime call inside later calls, captured ones included).
template <typename L, typename Q>
bool clusters_available() {
  static std::atomic<int8_t> known[kMaxDevices] = {};  // 0: not asked yet, 1: no, 2: yes
  const int device = at::cuda::current_device();
  TORCH_CHECK(device < kMaxDevices, "verify: device index ", device, " is past ", kMaxDevices);
  if (known[device] == 0) {
    bool ok = at::cuda::getCurrentDeviceProperties()->major >= 9;
    if (ok) {
      cudaFuncAttributes attrs;
      C10_CUDA_CHECK(cudaFuncGetAttributes(&attrs, verify_position_kernel<kClusterRanks, L, Q>));
      ok = attrs.binaryVersion >= 90;
    }
    known[device] = ok ? 2 : 1;
  }
  return known[device] == 2;
}

template <typename L, typename Q>
void launch(const VerifyProblem& P, cudaStream_t stream) {
  const index_t B = P.batch, positions = B * (P.num_draft_max + 1);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  Launch how = requested_launch();
  const bool clusters = clusters_available<L, Q>();
  TORCH_CHECK(how != Launch::clusters || clusters,
              "verify: DSPARK_VERIFY_LAUNCH=clusters needs a GPU of compute capability 9.0+ and a build for sm_90");
  const bool positions_fit = B <= 65535 && P.num_draft_max < 65535;  // grid z and y
  TORCH_CHECK(how == Launch::chain || how == Launch::automatic || positions_fit,
              "verify: the positions launch takes at most 65535 rows and 65534 drafts, got ", B, " and ",
              P.num_draft_max);
  if (how == Launch::automatic) {
    // The batch fills the GPU: the chain reads only the positions it reaches. Else all positions at once,
    // in clusters over a large vocabulary when the rows x positions alone leave most of the GPU idle.
    if (B >= sms || !positions_fit) how = Launch::chain;
    else if (clusters && P.vocab >= 8192 && positions * kClusterRanks <= 4 * sms) how = Launch::clusters;
    else how = Launch::positions;
  }
  if (how == Launch::chain) {
    verify_chain_kernel<L, Q><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Per-position results: host-known size, from the caching allocator (graph-safe).
  const at::Tensor results = at::empty({positions * 2}, at::TensorOptions().dtype(at::kInt).device(
                                                            at::kCUDA, at::cuda::current_device()));
  PositionResult* res = reinterpret_cast<PositionResult*>(results.data_ptr<int32_t>());
  const unsigned ranks = how == Launch::clusters ? kClusterRanks : 1;
  const dim3 grid(ranks, static_cast<unsigned>(P.num_draft_max + 1), static_cast<unsigned>(B));
  if (how == Launch::clusters) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kThreads);
    cfg.stream = stream;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = kClusterRanks;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, verify_position_kernel<kClusterRanks, L, Q>, P, res));
  } else {
    verify_position_kernel<1, L, Q><<<grid, kThreads, 0, stream>>>(P, res);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  constexpr int kFinishThreads = 128;
  verify_finish_kernel<<<static_cast<unsigned>((B + kFinishThreads - 1) / kFinishThreads), kFinishThreads, 0,
                         stream>>>(P, res);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void verify_cuda_launch(const VerifyProblem& P) {
  if (P.batch == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_float_type(P.logits_dtype, [&](auto l) {
    with_float_type(P.draft_probs_dtype, [&](auto q) { launch<decltype(l), decltype(q)>(P, stream); });
  });
}

}  // namespace dspark
