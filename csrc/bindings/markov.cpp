// torch.ops.dspark.markov_sample: schema, argument checks, CPU / CUDA / Meta implementations.
#include "markov.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "checks.h"

#if defined(DSPARK_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif
#include "dspark/cpu_isa.h"

DSPARK_DECLARE_ISA_FN(void, markov_logits,
                      (const dspark::MarkovProblem& P, dspark::index_t k, dspark::index_t tile_begin,
                       dspark::index_t tile_end, dspark::index_t* rows))
DSPARK_DECLARE_ISA_FN(void, markov_rows,
                      (const dspark::MarkovProblem& P, dspark::index_t k, dspark::index_t begin, dspark::index_t end))
DSPARK_DECLARE_ISA_FN(dspark::index_t, markov_tiles, (dspark::index_t vocab))

namespace dspark {

MarkovProblem check_markov_args(const at::Tensor& base_logits, const at::Tensor& anchor, const at::Tensor& w1,
                                const at::Tensor& w2, const std::optional<at::Tensor>& hidden,
                                const std::optional<at::Tensor>& conf_weight,
                                const std::optional<at::Tensor>& conf_bias,
                                const std::optional<at::Tensor>& conf_temperature, const at::Tensor& temperature,
                                const at::Tensor& seed, const at::Tensor& offset, bool return_probs,
                                MarkovOutputs* outputs) {
  const auto device = base_logits.device();
  TORCH_CHECK(base_logits.dim() == 3, "markov_sample: base_logits must be [B, G, V], got ", base_logits.sizes());
  const int64_t B = base_logits.size(0), G = base_logits.size(1), V = base_logits.size(2);
  TORCH_CHECK(V >= 1 && V < (int64_t{1} << 31), "markov_sample: base_logits vocabulary must be in [1, 2^31), got ", V);
  TORCH_CHECK(G < (int64_t{1} << 24), "markov_sample: base_logits block length must be < 2^24");
  MarkovProblem P;
  P.batch = B;
  P.steps = G;
  P.vocab = V;
  P.logits = base_logits.data_ptr();
  P.logits_dtype = float_code(base_logits, "base_logits");
  TORCH_CHECK(V == 1 || base_logits.stride(2) == 1, "markov_sample: base_logits must be contiguous in the vocabulary dim");
  P.logits_stride_b = base_logits.stride(0);
  P.logits_stride_k = base_logits.stride(1);
  check_tensor(anchor, "anchor", device, at::kInt, {B});
  P.anchor = anchor.data_ptr<int32_t>();

  // w1 may have more rows than V: a draft vocabulary lists its V drawable ids first, and the anchor may be
  // any id of the full vocabulary.
  TORCH_CHECK(w1.dim() == 2 && w1.size(0) >= V && w1.size(0) < (int64_t{1} << 31),
              "markov_sample: w1 must be [V_prev, r] with V <= V_prev < 2^31 (V = ", V, "), got ", w1.sizes());
  const int64_t R = w1.size(1);
  P.rank = R;
  P.prev_vocab = w1.size(0);
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == R && w2.size(1) == V, "markov_sample: w2 must be [r, V] = [", R, ", ", V,
              "] to match w1, got ", w2.sizes());
  TORCH_CHECK(w1.device() == device, "markov_sample: w1 is on ", w1.device(), " but base_logits is on ", device);
  TORCH_CHECK(w2.device() == device, "markov_sample: w2 is on ", w2.device(), " but base_logits is on ", device);
  P.w_dtype = float_code(w1, "w1");
  TORCH_CHECK(w2.scalar_type() == w1.scalar_type(), "markov_sample: w2 must have the dtype of w1 (", w1.scalar_type(),
              "), got ", w2.scalar_type());
  TORCH_CHECK(w1.is_contiguous() && w2.is_contiguous(), "markov_sample: w1 and w2 must be contiguous");
  P.w1 = w1.data_ptr();
  P.w2 = w2.data_ptr();

  check_tensor(temperature, "temperature", device, at::kFloat, {B});
  // seed [B]: a seed per row (stream 0); [1]: one seed for the batch, row b drawing from stream b.
  const bool batch_seed = seed.dim() == 1 && seed.size(0) == 1;
  check_tensor(seed, "seed", device, at::kLong, {batch_seed ? 1 : B});
  TORCH_CHECK(!batch_seed || B <= (int64_t{1} << 32), "markov_sample: a batch seed has streams for 2^32 rows, got B = ",
              B);
  check_tensor(offset, "offset", device, at::kLong, {B});
  P.temperature = temperature.data_ptr<float>();
  P.seed = seed.data_ptr<int64_t>();
  P.batch_seed = batch_seed;
  P.offset = offset.data_ptr<int64_t>();

  const bool with_confidence = conf_weight.has_value();
  int64_t H = 0;
  if (hidden.has_value()) {
    const at::Tensor& h = *hidden;
    TORCH_CHECK(h.device() == device, "markov_sample: hidden is on ", h.device(), " but base_logits is on ", device);
    TORCH_CHECK(h.dim() == 3 && h.size(0) == B && h.size(1) == G, "markov_sample: hidden must be [B, G, H] = [", B,
                ", ", G, ", H], got ", h.sizes());
    H = h.size(2);
    TORCH_CHECK(H <= 1 || h.stride(2) == 1, "markov_sample: hidden must be contiguous in its last dim");
    P.hidden = h.data_ptr();
    P.hidden_dtype = float_code(h, "hidden");
    P.hidden_stride_b = h.stride(0);
    P.hidden_stride_k = h.stride(1);
  }
  P.hidden_dim = H;
  if (with_confidence) {
    check_tensor(*conf_weight, "conf_weight", device, at::kFloat, {H + R});
    TORCH_CHECK(conf_bias.has_value(), "markov_sample: conf_bias is required with conf_weight");
    const int64_t num_bias = conf_bias->dim() == 1 && conf_bias->size(0) == G ? G : 1;  // per step or shared
    check_tensor(*conf_bias, "conf_bias", device, at::kFloat, {num_bias});
    TORCH_CHECK(conf_temperature.has_value(), "markov_sample: conf_temperature is required with conf_weight");
    check_tensor(*conf_temperature, "conf_temperature", device, at::kFloat, {G});
    P.conf_weight = conf_weight->data_ptr<float>();
    P.conf_bias = conf_bias->data_ptr<float>();
    P.conf_bias_stride = num_bias == 1 ? 0 : 1;
    P.conf_temperature = conf_temperature->data_ptr<float>();
  } else {
    TORCH_CHECK(!hidden.has_value(), "markov_sample: hidden is only used by the confidence head: pass conf_weight too");
  }

  const auto f_opts = base_logits.options().dtype(at::kFloat);
  const auto i_opts = base_logits.options().dtype(at::kInt);
  outputs->tokens = at::empty({B, G}, i_opts);
  outputs->probs = return_probs ? at::empty({B, G, V}, f_opts) : at::empty({0}, f_opts);
  outputs->confidence = with_confidence ? at::empty({B, G}, f_opts) : at::empty({0}, f_opts);
  outputs->z = at::empty({B, V}, f_opts);
  outputs->row_error = at::zeros({B}, i_opts);
  P.tokens = outputs->tokens.data_ptr<int32_t>();
  P.probs = return_probs ? outputs->probs.data_ptr<float>() : nullptr;
  P.confidence = with_confidence ? outputs->confidence.data_ptr<float>() : nullptr;
  P.z = outputs->z.data_ptr<float>();
  P.row_error = outputs->row_error.data_ptr<int32_t>();
  return P;
}

namespace {

using MarkovResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Per-row values the CPU path checks up front (the CUDA kernel checks them per row instead). Bad values raise
// ValueError, as the Python wrapper's checks and check=True on CUDA do.
void check_values_cpu(const MarkovProblem& P) {
  for (int64_t b = 0; b < P.batch; ++b) {
    TORCH_CHECK_VALUE(P.anchor[b] >= 0 && P.anchor[b] < P.prev_vocab, "markov_sample: anchor[", b, "] = ",
                      P.anchor[b], " is outside [0, ", P.prev_vocab, ") (the rows of w1)");
    const float t = P.temperature[b];
    TORCH_CHECK_VALUE(std::isfinite(t) && t >= 0.0f, "markov_sample: temperature[", b, "] = ", t,
                      " must be finite and >= 0");
  }
  if (P.conf_weight != nullptr)
    for (int64_t k = 0; k < P.steps; ++k)
      TORCH_CHECK_VALUE(std::isfinite(P.conf_temperature[k]) && P.conf_temperature[k] > 0.0f,
                        "markov_sample: conf_temperature[", k, "] = ", P.conf_temperature[k],
                        " must be finite and > 0");
}

MarkovResult markov_sample_cpu(const at::Tensor& base_logits, const at::Tensor& anchor, const at::Tensor& w1,
                               const at::Tensor& w2, const std::optional<at::Tensor>& hidden,
                               const std::optional<at::Tensor>& conf_weight, const std::optional<at::Tensor>& conf_bias,
                               const std::optional<at::Tensor>& conf_temperature, const at::Tensor& temperature,
                               const at::Tensor& seed, const at::Tensor& offset, bool return_probs) {
  MarkovOutputs out;
  const MarkovProblem P = check_markov_args(base_logits, anchor, w1, w2, hidden, conf_weight, conf_bias,
                                            conf_temperature, temperature, seed, offset, return_probs, &out);
  check_values_cpu(P);
  auto* logits = DSPARK_ISA_DISPATCH(markov_logits);
  auto* rows = DSPARK_ISA_DISPATCH(markov_rows);
  const int64_t tiles = DSPARK_ISA_DISPATCH(markov_tiles)(P.vocab);
  // About 2^18 multiply-adds per task: enough to amortise the task, small enough to share V among threads.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, 64 * P.batch * (P.rank + 1)));
  for (int64_t k = 0; k < P.steps; ++k) {
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      std::vector<index_t> scratch(static_cast<size_t>(P.batch));
      logits(P, k, begin, end, scratch.data());
    });
    at::parallel_for(0, P.batch, 1, [&](int64_t begin, int64_t end) { rows(P, k, begin, end); });
  }
  for (int64_t b = 0; b < P.batch; ++b) {
    TORCH_CHECK_VALUE(P.row_error[b] != kRowNonFiniteLogits, "markov_sample: row ", b,
                      " has NaN or +inf logits (base_logits, or w1/w2 through the Markov bias)");
    TORCH_CHECK_VALUE(P.row_error[b] != kRowAllMasked, "markov_sample: row ", b,
                      " masks every id (-inf) at a step (base_logits, or w1/w2 through the Markov bias)");
  }
  return {out.tokens, out.probs, out.confidence};
}

MarkovResult markov_sample_meta(const at::Tensor& base_logits, const at::Tensor& anchor, const at::Tensor& w1,
                                const at::Tensor& w2, const std::optional<at::Tensor>& hidden,
                                const std::optional<at::Tensor>& conf_weight,
                                const std::optional<at::Tensor>& conf_bias,
                                const std::optional<at::Tensor>& conf_temperature, const at::Tensor& temperature,
                                const at::Tensor& seed, const at::Tensor& offset, bool return_probs) {
  TORCH_CHECK(base_logits.dim() == 3, "markov_sample: base_logits must be [B, G, V], got ", base_logits.sizes());
  const auto B = base_logits.size(0), G = base_logits.size(1), V = base_logits.size(2);
  const auto f_opts = base_logits.options().dtype(at::kFloat);
  return {at::empty({B, G}, base_logits.options().dtype(at::kInt)),
          return_probs ? at::empty({B, G, V}, f_opts) : at::empty({0}, f_opts),
          conf_weight.has_value() ? at::empty({B, G}, f_opts) : at::empty({0}, f_opts)};
}

#if defined(DSPARK_WITH_CUDA)
MarkovResult markov_sample_cuda(const at::Tensor& base_logits, const at::Tensor& anchor, const at::Tensor& w1,
                                const at::Tensor& w2, const std::optional<at::Tensor>& hidden,
                                const std::optional<at::Tensor>& conf_weight,
                                const std::optional<at::Tensor>& conf_bias,
                                const std::optional<at::Tensor>& conf_temperature, const at::Tensor& temperature,
                                const at::Tensor& seed, const at::Tensor& offset, bool return_probs) {
  const c10::cuda::CUDAGuard guard(base_logits.device());  // the tensors' device and its current stream
  MarkovOutputs out;
  const MarkovProblem P = check_markov_args(base_logits, anchor, w1, w2, hidden, conf_weight, conf_bias,
                                            conf_temperature, temperature, seed, offset, return_probs, &out);
  // Invalid rows cannot raise without a host sync: their tokens read -1 (see the python wrapper).
  markov_cuda_launch(P);
  return {out.tokens, out.probs, out.confidence};
}
#endif

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def(
      "markov_sample(Tensor base_logits, Tensor anchor, Tensor w1, Tensor w2, Tensor? hidden, Tensor? conf_weight, "
      "Tensor? conf_bias, Tensor? conf_temperature, Tensor temperature, Tensor seed, Tensor offset, "
      "bool return_probs) -> (Tensor tokens, Tensor draft_probs, Tensor confidence)");
}
TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("markov_sample", &dspark::markov_sample_cpu); }
TORCH_LIBRARY_IMPL(dspark, Meta, m) { m.impl("markov_sample", &dspark::markov_sample_meta); }
#if defined(DSPARK_WITH_CUDA)
TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("markov_sample", &dspark::markov_sample_cuda); }
#endif
