// CUDA kernel of `markov_sample`: one CTA per request runs the whole G-step
// block in one launch. Each step: the vocabulary split across the CTA's warps
// computes z = U_k + w1[x_prev] @ w2 (the r x V product fused into the logits
// pass, one fma chain per token exactly as markov.h states) into a per-row
// scratch, then softmax numerators with a fixed-point total, the draw, the
// draft_probs row and the confidence head. The arithmetic comes from the same
// headers as the CPU kernel, so both draw the same tokens. No host sync, no
// allocation beyond the outputs: graph-capturable.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "../bindings/markov.h"
#include "block_ops.cuh"
#include "dspark/markov.h"

namespace dspark {
namespace {

constexpr int kThreads = 512;
using Ops = BlockOps<kThreads>;

struct Shared {
  typename Ops::Storage ops;
  float lanes[kDotLanes];
};

template <typename H, typename W>
__device__ void confidence_step(const MarkovProblem& P, index_t b, index_t k, const W* w1_row, Shared& sh) {
  if (threadIdx.x < kDotLanes) {
    const H* h = P.hidden == nullptr
                     ? nullptr
                     : static_cast<const H*>(P.hidden) + b * P.hidden_stride_b + k * P.hidden_stride_k;
    sh.lanes[threadIdx.x] = confidence_lane(h, P.hidden_dim, w1_row, P.rank, P.conf_weight, threadIdx.x);
  }
  __syncthreads();
  if (threadIdx.x == 0)
    P.confidence[b * P.steps + k] = confidence_from_lanes(sh.lanes, markov_conf_bias(P, k), P.conf_temperature[k]);
  __syncthreads();
}

template <typename L, typename W>
__global__ void __launch_bounds__(kThreads) markov_kernel(MarkovProblem P) {
  __shared__ Shared sh;
  const index_t b = blockIdx.x, V = P.vocab, G = P.steps, R = P.rank;
  int32_t* tokens = P.tokens + b * G;
  auto fail = [&](RowError err) {
    if (threadIdx.x == 0) {
      P.row_error[b] = err;
      for (index_t k = 0; k < G; ++k) tokens[k] = -1;
    }
  };
  if (!markov_row_valid(P, b)) return fail(kRowBadParams);

  const W* w1 = static_cast<const W*>(P.w1);
  const W* w2 = static_cast<const W*>(P.w2);
  float* z = P.z + b * V;
  const float temperature = P.temperature[b];
  const float inv_t = temperature == 0.0f ? 1.0f : 1.0f / temperature;

  for (index_t k = 0; k < G; ++k) {
    const W* w1_row = w1 + P.prev_token(b, k) * R;
    const L* u = static_cast<const L*>(P.logits) + b * P.logits_stride_b + k * P.logits_stride_k;
    float mx = -INFINITY;
    int bad = 0;
    for (index_t v = threadIdx.x; v < V; v += kThreads) {
      float acc = to_float(u[v]);
      for (index_t i = 0; i < R; ++i) acc = fmaf(to_float(w1_row[i]), to_float(w2[i * V + v]), acc);
      z[v] = acc;
      mx = acc > mx ? acc : mx;
      bad |= logit_is_error(acc);
    }
    const bool any_error = __syncthreads_or(bad);
    const float max = Ops::max(mx, sh.ops);
    const RowError error = logits_error(any_error, max);
    if (error != kRowOk) return fail(error);

    if (P.confidence != nullptr) {
      with_float_type(P.hidden_dtype, [&](auto h) { confidence_step<decltype(h), W>(P, b, k, w1_row, sh); });
    }
    float* q = P.probs == nullptr ? nullptr : P.probs + (b * G + k) * V;
    index_t token;
    if (temperature == 0.0f) {
      long long first = V;
      for (index_t v = threadIdx.x; v < V; v += kThreads)
        if (z[v] == max) { first = v; break; }
      token = Ops::min(first, sh.ops);
      if (q != nullptr)
        for (index_t v = threadIdx.x; v < V; v += kThreads) q[v] = v == token ? 1.0f : 0.0f;
    } else {
      U64 acc = 0;
      for (index_t v = threadIdx.x; v < V; v += kThreads) {
        const float e = exp_nonpositive((z[v] - max) * inv_t);
        z[v] = e;
        acc += mass_of(e);
      }
      const uint64_t total = Ops::sum(acc, sh.ops);
      const uint64_t bits = markov_bits(P, b, k);
      token = Ops::draw(V, total, bits, [&](index_t v) { return mass_of(z[v]); }, sh.ops);
      if (q != nullptr) {
        const double inv_total = 1.0 / static_cast<double>(total);
        for (index_t v = threadIdx.x; v < V; v += kThreads) q[v] = mass_probability(mass_of(z[v]), inv_total);
      }
    }
    if (threadIdx.x == 0) tokens[k] = static_cast<int32_t>(token);
    __syncthreads();  // the next step reads tokens[k] as its previous token
  }
}

}  // namespace

void markov_cuda_launch(const MarkovProblem& P) {
  if (P.batch == 0 || P.steps == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(P.batch));
  with_float_type(P.logits_dtype, [&](auto l) {
    with_float_type(P.w_dtype, [&](auto w) { markov_kernel<decltype(l), decltype(w)><<<grid, kThreads, 0, stream>>>(P); });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dspark
