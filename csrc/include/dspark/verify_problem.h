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
  const void* draft_probs = nullptr;                 // [B, K, Vd] or null (one-hot drafts)
  FloatCode draft_probs_dtype = FloatCode::f32;
  index_t draft_probs_stride_b = 0, draft_probs_stride_k = 0;
  // [V] or null (Vd = V): the column of draft_probs that holds target id v, -1 outside the draft
  // vocabulary. Entries outside [0, Vd) read as probability 0, so no entry can read out of bounds.
  const int32_t* draft_index = nullptr;
  index_t draft_cols = 0;                            // Vd
  const int32_t* num_draft = nullptr;                // [B]
  const float* temperature = nullptr;                // [B]
  const int32_t* top_k = nullptr;                    // [B]
  const float* top_p = nullptr;                      // [B]
  const float* min_p = nullptr;                      // [B]
  const int64_t* seed = nullptr;                     // [B], or [1] with batch_seed
  bool batch_seed = false;                           // one seed for the batch: row b draws from stream b
  const int64_t* offset = nullptr;                   // [B]
  int32_t* tokens = nullptr;                         // [B, K+1] out
  int32_t* num_accepted = nullptr;                   // [B] out
  int32_t* row_error = nullptr;                      // [B] out (RowError)

  template <typename Q>
  DSPARK_HD const Q* draft_row(index_t b, index_t j) const {
    return static_cast<const Q*>(draft_probs) + b * draft_probs_stride_b + j * draft_probs_stride_k;
  }

  // q(v): the probability that draft row `q` gave target id v.
  template <typename Q>
  DSPARK_HD float draft_prob(const Q* q, index_t v) const {
    if (draft_index == nullptr) return to_float(q[v]);
    // Branch-free (which ids are drafted is data: a mispredicted branch per id costs more than the read):
    // an entry outside [0, Vd) reads column 0 and masks it to +0.
    const int32_t c = draft_index[v];
    const uint32_t in = static_cast<uint32_t>(c >= 0) & static_cast<uint32_t>(c < draft_cols);
    return bits_float(float_bits(to_float(q[c * static_cast<int32_t>(in)])) & (0u - in));
  }

  DSPARK_HD SamplingParams params(index_t b) const {
    return SamplingParams{temperature[b], top_k[b], top_p[b], min_p[b],
                          static_cast<uint64_t>(seed[batch_seed ? 0 : b]),
                          batch_seed ? static_cast<uint32_t>(b) : 0u, static_cast<uint64_t>(offset[b])};
  }

  // Row b's parameters and the ids it drafts (every id within num_draft, checked before any sampling, so
  // an id past the first rejection is an error too).
  DSPARK_HD RowError row_check(index_t b, const SamplingParams& sp) const {
    const index_t l = num_draft[b];
    if (!params_valid(sp) || l < 0 || l > num_draft_max) return kRowBadParams;
    for (index_t j = 0; j < l; ++j) {
      const index_t x = draft_tokens[b * num_draft_max + j];
      if (x < 0 || x >= vocab) return kRowDraftTokenOutOfRange;
    }
    return kRowOk;
  }
};

}  // namespace dspark
