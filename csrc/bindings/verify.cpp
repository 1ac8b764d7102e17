// torch.ops.dspark.verify: schema, argument checks, CPU / CUDA / Meta implementations.
#include "verify.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"

#if defined(DSPARK_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif
#include "dspark/cpu_isa.h"

DSPARK_DECLARE_ISA_FN(void, verify_rows,
                      (const dspark::VerifyProblem& P, const int32_t* draft_ids, dspark::index_t begin,
                       dspark::index_t end, float* scratch))

namespace dspark {

VerifyProblem check_verify_args(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                                const std::optional<at::Tensor>& draft_probs, const at::Tensor& num_draft,
                                const at::Tensor& temperature, const at::Tensor& top_k,
                                const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed,
                                const at::Tensor& offset, const std::optional<at::Tensor>& draft_index,
                                VerifyOutputs* outputs) {
  const auto device = target_logits.device();
  TORCH_CHECK(target_logits.dim() == 3, "verify: target_logits must be [B, K+1, V], got ", target_logits.sizes());
  const int64_t B = target_logits.size(0), K = target_logits.size(1) - 1, V = target_logits.size(2);
  TORCH_CHECK(K >= 0, "verify: target_logits must have K+1 >= 1 positions");
  TORCH_CHECK(V >= 1, "verify: target_logits must have a vocabulary of at least 1");
  TORCH_CHECK(V < (int64_t{1} << 31), "verify: target_logits vocabulary must be < 2^31");
  VerifyProblem P;
  P.batch = B;
  P.num_draft_max = K;
  P.vocab = V;
  P.logits = target_logits.data_ptr();
  P.logits_dtype = float_code(target_logits, "target_logits");
  TORCH_CHECK(V == 1 || target_logits.stride(2) == 1, "verify: target_logits must be contiguous in the vocabulary dim");
  P.logits_stride_b = target_logits.stride(0);
  P.logits_stride_k = target_logits.stride(1);

  check_tensor(draft_tokens, "draft_tokens", device, at::kInt, {B, K});
  P.draft_tokens = draft_tokens.data_ptr<int32_t>();
  if (draft_probs.has_value()) {
    const at::Tensor& q = *draft_probs;
    TORCH_CHECK(q.device() == device, "verify: draft_probs is on ", q.device(), " but target_logits is on ", device);
    if (draft_index.has_value()) {
      TORCH_CHECK(q.dim() == 3 && q.size(0) == B && q.size(1) == K && q.size(2) >= 1,
                  "verify: draft_probs must be [B, K, Vd] = [", B, ", ", K, ", Vd] with a draft_index, got ",
                  q.sizes());
      TORCH_CHECK(q.size(2) < (int64_t{1} << 31), "verify: draft_probs' draft vocabulary must be < 2^31");
      check_tensor(*draft_index, "draft_index", device, at::kInt, {V});
      P.draft_index = draft_index->data_ptr<int32_t>();
    } else {
      TORCH_CHECK(q.dim() == 3 && q.size(0) == B && q.size(1) == K && q.size(2) == V,
                  "verify: draft_probs must be [B, K, V] = [", B, ", ", K, ", ", V, "], got ", q.sizes());
    }
    TORCH_CHECK(q.size(2) == 1 || q.stride(2) == 1, "verify: draft_probs must be contiguous in the vocabulary dim");
    P.draft_probs = q.data_ptr();
    P.draft_probs_dtype = float_code(q, "draft_probs");
    P.draft_probs_stride_b = q.stride(0);
    P.draft_probs_stride_k = q.stride(1);
    P.draft_cols = q.size(2);
  } else {
    TORCH_CHECK(!draft_index.has_value(), "verify: draft_index maps draft_probs' columns, and no draft_probs was given");
  }
  check_tensor(num_draft, "num_draft", device, at::kInt, {B});
  check_tensor(temperature, "temperature", device, at::kFloat, {B});
  check_tensor(top_k, "top_k", device, at::kInt, {B});
  check_tensor(top_p, "top_p", device, at::kFloat, {B});
  check_tensor(min_p, "min_p", device, at::kFloat, {B});
  // seed [B]: a seed per row (stream 0); [1]: one seed for the batch, row b drawing from stream b.
  const bool batch_seed = seed.dim() == 1 && seed.size(0) == 1;
  check_tensor(seed, "seed", device, at::kLong, {batch_seed ? 1 : B});
  TORCH_CHECK(!batch_seed || B <= (int64_t{1} << 32), "verify: a batch seed has streams for 2^32 rows, got B = ", B);
  check_tensor(offset, "offset", device, at::kLong, {B});
  P.num_draft = num_draft.data_ptr<int32_t>();
  P.temperature = temperature.data_ptr<float>();
  P.top_k = top_k.data_ptr<int32_t>();
  P.top_p = top_p.data_ptr<float>();
  P.min_p = min_p.data_ptr<float>();
  P.seed = seed.data_ptr<int64_t>();
  P.batch_seed = batch_seed;
  P.offset = offset.data_ptr<int64_t>();

  const auto int_opts = target_logits.options().dtype(at::kInt);
  outputs->tokens = at::empty({B, K + 1}, int_opts);
  outputs->num_accepted = at::empty({B}, int_opts);
  outputs->row_error = at::empty({B}, int_opts);
  P.tokens = outputs->tokens.data_ptr<int32_t>();
  P.num_accepted = outputs->num_accepted.data_ptr<int32_t>();
  P.row_error = outputs->row_error.data_ptr<int32_t>();
  return P;
}

namespace {

// Bad values raise ValueError, as the Python wrapper's checks and check=True on CUDA do.
void raise_row_error(int64_t row, int32_t err, int64_t V) {
  switch (err) {
    case kRowNonFiniteLogits:
      TORCH_CHECK_VALUE(false, "verify: target_logits row ", row, " contains NaN or +inf");
    case kRowAllMasked:
      TORCH_CHECK_VALUE(false, "verify: target_logits row ", row, " masks every id (-inf) at a position it verifies");
    case kRowDraftTokenOutOfRange:
      TORCH_CHECK_VALUE(false, "verify: draft_tokens row ", row, " holds a token id outside [0, ", V,
                        ") within its num_draft");
    case kRowZeroDraftProb:
      TORCH_CHECK_VALUE(false, "verify: draft_probs row ", row, " gives a drafted token probability 0 (or NaN)");
    case kRowBadParams:
      TORCH_CHECK_VALUE(false, "verify: row ", row,
                        " has invalid parameters: need temperature >= 0 and finite, 0 < top_p <= 1, "
                        "0 <= min_p <= 1, 0 <= num_draft <= K");
    default:
      break;
  }
}

using VerifyResult = std::tuple<at::Tensor, at::Tensor>;

VerifyResult verify_cpu(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                        const std::optional<at::Tensor>& draft_probs, const at::Tensor& num_draft,
                        const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                        const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& offset,
                        const std::optional<at::Tensor>& draft_index) {
  VerifyOutputs out;
  const VerifyProblem P = check_verify_args(target_logits, draft_tokens, draft_probs, num_draft, temperature,
                                            top_k, top_p, min_p, seed, offset, draft_index, &out);
  // The CPU kernel writes a rejected row's q out by column: it needs the inverse of draft_index, which also
  // shows that the map is one-to-one (on CUDA that is the caller's contract: checking it would sync).
  std::vector<int32_t> draft_ids(P.draft_index != nullptr ? P.draft_cols : 0, -1);
  for (int64_t v = 0; P.draft_index != nullptr && v < P.vocab; ++v) {
    const int32_t c = P.draft_index[v];
    TORCH_CHECK_VALUE(c >= -1 && c < P.draft_cols, "verify: draft_index[", v, "] = ", c, " is outside [-1, ",
                      P.draft_cols, ") (the columns of draft_probs, -1: none)");
    if (c < 0) continue;
    TORCH_CHECK_VALUE(draft_ids[c] < 0, "verify: draft_index maps target ids ", draft_ids[c], " and ", v,
                      " to the same column ", c);
    draft_ids[c] = static_cast<int32_t>(v);
  }
  auto* rows = DSPARK_ISA_DISPATCH(verify_rows);
  at::parallel_for(0, P.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * static_cast<size_t>(P.vocab));
    rows(P, P.draft_index != nullptr ? draft_ids.data() : nullptr, begin, end, scratch.data());
  });
  for (int64_t b = 0; b < P.batch; ++b) raise_row_error(b, P.row_error[b], P.vocab);
  return {out.tokens, out.num_accepted};
}

VerifyResult verify_meta(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                         const std::optional<at::Tensor>& draft_probs, const at::Tensor& num_draft,
                         const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                         const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& offset,
                         const std::optional<at::Tensor>& draft_index) {
  TORCH_CHECK(target_logits.dim() == 3, "verify: target_logits must be [B, K+1, V], got ", target_logits.sizes());
  const auto opts = target_logits.options().dtype(at::kInt);
  return {at::empty({target_logits.size(0), target_logits.size(1)}, opts),
          at::empty({target_logits.size(0)}, opts)};
}

#if defined(DSPARK_WITH_CUDA)
VerifyResult verify_cuda(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                         const std::optional<at::Tensor>& draft_probs, const at::Tensor& num_draft,
                         const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                         const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& offset,
                         const std::optional<at::Tensor>& draft_index) {
  // Launch on the tensors' device and its current stream, whatever device is current.
  const c10::cuda::CUDAGuard guard(target_logits.device());
  VerifyOutputs out;
  const VerifyProblem P = check_verify_args(target_logits, draft_tokens, draft_probs, num_draft, temperature,
                                            top_k, top_p, min_p, seed, offset, draft_index, &out);
  // Row errors cannot raise without a host sync: the row reads num_accepted = -1 (see python wrapper).
  verify_cuda_launch(P);
  return {out.tokens, out.num_accepted};
}
#endif

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def(
      "verify(Tensor target_logits, Tensor draft_tokens, Tensor? draft_probs, Tensor num_draft, "
      "Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor seed, Tensor offset, "
      "Tensor? draft_index=None) "
      "-> (Tensor tokens, Tensor num_accepted)");
}
TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("verify", &dspark::verify_cpu); }
TORCH_LIBRARY_IMPL(dspark, Meta, m) { m.impl("verify", &dspark::verify_meta); }
#if defined(DSPARK_WITH_CUDA)
TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("verify", &dspark::verify_cuda); }
#endif
