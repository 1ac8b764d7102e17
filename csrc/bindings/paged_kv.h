// Argument checking shared by the CPU and CUDA implementations of the paged-KV
// ops (append_kv, draft_block_attention, kv_rollback).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "dspark/paged_kv.h"

namespace dspark {

// Shapes, dtypes and devices (naming the bad argument); allocates `out`.
BlockAttentionProblem check_block_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                                 const at::Tensor& v_cache, const at::Tensor& page_table,
                                                 const at::Tensor& seq_lens, const at::Tensor& cu_q_lens,
                                                 bool causal, std::optional<double> scale, int64_t max_block_rows,
                                                 at::Tensor* out);
AppendProblem check_append_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& slot_mapping);

struct RollbackArgs {
  RollbackProblem problem;
  std::vector<char*> k_layers, v_layers;  // what problem.k_layers / v_layers point into
};
void check_rollback_args(const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                         const at::Tensor& page_table, const at::Tensor& seq_lens, const at::Tensor& block_start,
                         const std::optional<at::Tensor>& accept_index, const at::Tensor& num_accepted,
                         RollbackArgs* args);

// The index values (host memory): every rule the kernels rely on, each
// failure naming the argument. The CPU ops always run these; on CUDA the
// python wrappers run them on request (check=True) through the _check_* ops.
void check_block_attention_metadata(const BlockAttentionProblem& P);
void check_append_slots(const AppendProblem& P);
void check_rollback_metadata(const RollbackProblem& P, const int32_t* seq_lens);

#if defined(DSPARK_WITH_CUDA)
// `like`: a tensor on the op's device (options for the split-KV workspace).
void block_attention_cuda_launch(const BlockAttentionProblem& P, const at::Tensor& like);
void append_kv_cuda_launch(const AppendProblem& P);
void kv_rollback_cuda_launch(const RollbackProblem& P);
#endif

}  // namespace dspark
