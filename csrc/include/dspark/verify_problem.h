// Plain-data description of one `verify` call, shared by the CPU and CUDA
// kernels (raw pointers + element strides; dtypes as codes).
#pragma once
#include "dspark/common.h"
#include "dspark/sampling.h"

namespace dspark {

struct VerifyProblem {
  index_t batch = 0, num_draft_max = 0, vocab = 0;  // B, K, V
  const void* logits = nullptr;                      // [B, K+1, V], last dim contiguous
  FloatCode logits_dtype = FloatCode::f32;
  index_t logits_stride_b = 0, logits_stride_k = 0;
  const int32_t* draft_tokens = nullptr;             // [B, K] contiguous
  const void* draft_probs = nullptr;                 // [B, K, V] or null (one-hot drafts)
  FloatCode draft_probs_dtype = FloatCode::f32;
  index_t draft_probs_stride_b = 0, draft_probs_stride_k = 0;
  const int32_t* num_draft = nullptr;                // [B]
  const float* temperature = nullptr;                // [B]
  const int32_t* top_k = nullptr;                    // [B]
  const float* top_p = nullptr;                      // [B]
  const float* min_p = nullptr;                      // [B]
  const int64_t* seed = nullptr;                     // [B]
  const int64_t* offset = nullptr;                   // [B]
  int32_t* tokens = nullptr;                         // [B, K+1] out
  int32_t* num_accepted = nullptr;                   // [B] out
  int32_t* row_error = nullptr;                      // [B] out (RowError)

  DSPARK_HD SamplingParams params(index_t b) const {
    return SamplingParams{temperature[b], top_k[b], top_p[b], min_p[b],
                          static_cast<uint64_t>(seed[b]), static_cast<uint64_t>(offset[b])};
  }
};

}  // namespace dspark
