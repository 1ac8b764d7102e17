// CUDA kernel of `verify`: one CTA per request row, positions in order, each
// position a few block-wide passes over the vocabulary (max, softmax
// numerators, radix-select histograms for the filters, inverse-CDF draw).
// The arithmetic comes from the same headers as the CPU kernel (Philox, exp,
// fixed-point masses, radix walk, acceptance rule), so both pick the same
// tokens. No host sync, no allocation beyond the outputs: graph-capturable.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "../bindings/verify.h"
#include "block_ops.cuh"
#include "dspark/filters.h"
#include "dspark/verify_problem.h"

namespace dspark {
namespace {

constexpr int kThreads = 512;
using Ops = BlockOps<kThreads>;

struct Shared {
  typename Ops::Storage ops;
  U64 hist[kRadixBins];
  uint32_t prefix;
  int flag;
};

template <typename T>
__device__ float block_max(const T* x, index_t n, Shared& sh, RowError* error) {
  float mx = -INFINITY;
  int bad = 0;
  for (index_t v = threadIdx.x; v < n; v += kThreads) {
    const float f = to_float(x[v]);
    mx = f > mx ? f : mx;
    bad |= logit_is_error(f);
  }
  const bool any_error = __syncthreads_or(bad);
  const float max = Ops::max(mx, sh.ops);
  *error = logits_error(any_error, max);
  return max;
}

__device__ U64 block_sum(U64 v, Shared& sh) { return Ops::sum(v, sh.ops); }

template <typename T>
__device__ __forceinline__ float numerator(const T* x, index_t v, float max, float inv_t) {
  return exp_nonpositive((to_float(x[v]) - max) * inv_t);
}

template <typename T>
__device__ U64 block_kept_mass(const T* x, index_t n, float max, float inv_t, uint32_t floor_bits, Shared& sh) {
  U64 acc = 0;
  for (index_t v = threadIdx.x; v < n; v += kThreads) {
    const float e = numerator(x, v, max, inv_t);
    acc += float_bits(e) >= floor_bits ? mass_of(e) : 0;
  }
  return block_sum(acc, sh);
}

template <bool kByMass, typename T>
__device__ uint32_t block_radix_select(const T* x, index_t n, float max, float inv_t, uint32_t floor_bits,
                                       uint64_t want, Shared& sh) {
  uint32_t prefix = 0;
  for (int level = 0; level < kRadixLevels; ++level) {
    for (int i = threadIdx.x; i < kRadixBins; i += kThreads) sh.hist[i] = 0;
    __syncthreads();
    for (index_t v = threadIdx.x; v < n; v += kThreads) {
      const float e = numerator(x, v, max, inv_t);
      const uint32_t bits = float_bits(e);
      if (radix_candidate(bits, level, prefix, floor_bits))
        atomicAdd(&sh.hist[radix_bin(bits, level)], kByMass ? static_cast<U64>(mass_of(e)) : U64{1});
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const int bin = radix_walk(sh.hist, reinterpret_cast<U64*>(&want));
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

template <typename MassFn>
__device__ index_t block_draw(index_t n, uint64_t total, uint64_t bits, MassFn mass, Shared& sh) {
  return Ops::draw(n, total, bits, mass, sh.ops);
}

template <typename L, typename Q>
__global__ void __launch_bounds__(kThreads) verify_kernel(VerifyProblem P) {
  __shared__ Shared sh;
  const index_t b = blockIdx.x, V = P.vocab, K = P.num_draft_max;
  int32_t* out = P.tokens + b * (K + 1);
  for (index_t j = threadIdx.x; j <= K; j += kThreads) out[j] = -1;
  auto finish = [&](index_t accepted, int32_t err) {
    if (threadIdx.x == 0) {
      P.num_accepted[b] = static_cast<int32_t>(accepted);
      P.row_error[b] = err;
      if (err != kRowOk)
        for (index_t j = 0; j <= K; ++j) out[j] = -1;
    }
  };
  __syncthreads();

  const SamplingParams sp = P.params(b);
  const RowError bad_row = P.row_check(b, sp);
  if (bad_row != kRowOk) return finish(-1, bad_row);
  const index_t l = P.num_draft[b];
  const int32_t* drafts = P.draft_tokens + b * K;
  const bool greedy = sp.temperature == 0.0f;
  const bool one_hot = P.draft_probs == nullptr;
  const float inv_t = greedy ? 1.0f : 1.0f / sp.temperature;

  for (index_t j = 0; j <= l; ++j) {
    const L* x = static_cast<const L*>(P.logits) + b * P.logits_stride_b + j * P.logits_stride_k;
    RowError error;
    const float max = block_max(x, V, sh, &error);
    if (error != kRowOk) return finish(-1, error);
    const bool is_draft = j < l;
    const index_t xj = is_draft ? drafts[j] : 0;

    if (greedy) {
      long long first = V;
      for (index_t v = threadIdx.x; v < V; v += kThreads)
        if (to_float(x[v]) == max) { first = v; break; }
      const index_t best = Ops::min(first, sh.ops);
      if (is_draft && xj == best) {
        if (threadIdx.x == 0) out[j] = static_cast<int32_t>(xj);
        continue;
      }
      if (threadIdx.x == 0) out[j] = static_cast<int32_t>(best);
      return finish(j, kRowOk);
    }

    U64 acc = 0;
    for (index_t v = threadIdx.x; v < V; v += kThreads) acc += mass_of(numerator(x, v, max, inv_t));
    const uint64_t z_all = block_sum(acc, sh);
    uint32_t t = 0;
    uint64_t z_k = z_all;
    if (sp.top_k > 0 && sp.top_k < V) {
      t = block_radix_select<false>(x, V, max, inv_t, 0, static_cast<uint64_t>(sp.top_k), sh);
      z_k = block_kept_mass(x, V, max, inv_t, t, sh);
    }
    if (sp.top_p < 1.0f) t = block_radix_select<true>(x, V, max, inv_t, t, top_p_target(sp.top_p, z_k), sh);
    const uint32_t min_p_bits = min_p_floor_bits(sp.min_p);
    t = t > min_p_bits ? t : min_p_bits;
    const uint64_t z = t == 0 ? z_all : block_kept_mass(x, V, max, inv_t, t, sh);
    auto p_mass = [&](index_t v) -> uint64_t {
      const float e = numerator(x, v, max, inv_t);
      return float_bits(e) >= t ? mass_of(e) : 0;
    };
    const Q* q = one_hot ? nullptr : P.draft_row<Q>(b, j);

    index_t token;
    if (is_draft) {
      const float qx = one_hot ? 1.0f : P.draft_prob(q, xj);
      if (!(qx > 0.0f)) return finish(-1, kRowZeroDraftProb);
      const float u = uniform_open01(random_words(sp.seed, sp.stream, sp.offset, j, Purpose::kVerifyAccept).v[0]);
      if (accept_draft(u, qx, p_mass(xj), z)) {
        if (threadIdx.x == 0) out[j] = static_cast<int32_t>(xj);
        __syncthreads();
        continue;
      }
      auto residual = [&](index_t v) -> uint64_t {
        const uint64_t qm = one_hot ? (v == xj ? z : 0) : draft_mass(P.draft_prob(q, v), z);
        return residual_mass(p_mass(v), qm);
      };
      U64 r_acc = 0;
      for (index_t v = threadIdx.x; v < V; v += kThreads) r_acc += residual(v);
      const uint64_t r_total = block_sum(r_acc, sh);
      const uint64_t bits = random_u64(random_words(sp.seed, sp.stream, sp.offset, j, Purpose::kVerifySample));
      token = r_total > 0 ? block_draw(V, r_total, bits, residual, sh) : block_draw(V, z, bits, p_mass, sh);
    } else {
      const uint64_t bits = random_u64(random_words(sp.seed, sp.stream, sp.offset, j, Purpose::kVerifySample));
      token = block_draw(V, z, bits, p_mass, sh);
    }
    if (threadIdx.x == 0) out[j] = static_cast<int32_t>(token);
    return finish(j, kRowOk);
  }
}

}  // namespace

void verify_cuda_launch(const VerifyProblem& P) {
  if (P.batch == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(P.batch));
  with_float_type(P.logits_dtype, [&](auto l) {
    with_float_type(P.draft_probs_dtype, [&](auto q) { verify_kernel<decltype(l), decltype(q)><<<grid, kThreads, 0, stream>>>(P); });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dspark
