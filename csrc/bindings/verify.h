// Argument checking shared by the CPU and CUDA implementations of `verify`.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "dspark/verify_problem.h"

namespace dspark {

struct VerifyOutputs {
  at::Tensor tokens, num_accepted, row_error;
};

// Checks shapes, dtypes and devices (naming the bad argument) and allocates the outputs.
VerifyProblem check_verify_args(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                                const std::optional<at::Tensor>& draft_probs, const at::Tensor& num_draft,
                                const at::Tensor& temperature, const at::Tensor& top_k,
                                const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed,
                                const at::Tensor& offset, const std::optional<at::Tensor>& draft_index,
                                VerifyOutputs* outputs);

#if defined(DSPARK_WITH_CUDA)
void verify_cuda_launch(const VerifyProblem& problem);
#endif

}  // namespace dspark
