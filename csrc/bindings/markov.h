// Argument checking shared by the CPU and CUDA implementations of `markov_sample`.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "dspark/markov.h"

namespace dspark {

struct MarkovOutputs {
  at::Tensor tokens, probs, confidence, z, row_error;
};

// Checks shapes, dtypes and devices (naming the bad argument) and allocates the outputs.
MarkovProblem check_markov_args(const at::Tensor& base_logits, const at::Tensor& anchor, const at::Tensor& w1,
                                const at::Tensor& w2, const std::optional<at::Tensor>& hidden,
                                const std::optional<at::Tensor>& conf_weight,
                                const std::optional<at::Tensor>& conf_bias,
                                const std::optional<at::Tensor>& conf_temperature, const at::Tensor& temperature,
                                const at::Tensor& seed, const at::Tensor& offset, bool return_probs,
                                MarkovOutputs* outputs);

#if defined(DSPARK_WITH_CUDA)
void markov_cuda_launch(const MarkovProblem& problem);
#endif

}  // namespace dspark
