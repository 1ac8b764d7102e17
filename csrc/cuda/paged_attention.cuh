// Pieces shared by the two CUDA paths of `draft_block_attention`: the SIMT
// kernel (paged_attention.cu, every dtype and head dim) and the tensor-core
// kernel (paged_attention_tc.cu, fp16/bf16 with head dim 64/128 on sm_80+,
// built when the CUTLASS/CuTe headers are found). Both use the same grid
// (split, kv head, request), the same split of a request's KV range, the same
// partial-result workspace and the same combine kernel.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "dspark/paged_kv.h"

namespace dspark {

struct SplitWorkspace {
  float* o = nullptr;   // [splits, T, Hq, D] unnormalised partial outputs
  float* ml = nullptr;  // [splits, T, Hq, 2] partial max (of scaled scores) and sum of exponentials
};

// What CTA (split, b) of a kernel with `tile`-position KV tiles works on.
struct SplitRange {
  index_t row0 = 0, n = 0;     // the request's first query row and its row count (0: nothing to do)
  index_t len = 0;             // its KV length (0 for an invalid request)
  index_t begin = 0, end = 0;  // this split's KV positions [begin, end)
  bool bad = false;            // invalid indices: the rows get NaN
};

// Every thread of the CTA calls it (it ends in a barrier unless n = 0). An invalid
// request still gets rows inside [0, T) to mark, so it reports them with
// bad = true; nothing outside the tensors is read.
__device__ __forceinline__ SplitRange split_range(const BlockAttentionProblem& P, index_t b, index_t split,
                                                  index_t splits, index_t tile) {
  SplitRange r;
  const PagedLayout& kv = P.kv;
  const bool meta_ok = P.request_ok(b);
  r.row0 = P.cu_q_lens[b];
  r.n = P.cu_q_lens[b + 1] - r.row0;
  if (!meta_ok)
    r.n = (r.row0 >= 0 && r.row0 < P.num_tokens && r.n > 0) ? min(r.n, min(P.max_block_rows, P.num_tokens - r.row0))
                                                              : 0;
  if (r.n <= 0) {  // uniform across the CTA: the caller returns before any barrier
    r.n = 0;
    return r;
  }
  r.len = meta_ok ? P.seq_lens[b] : 0;
  const index_t chunk = ((r.len + splits - 1) / splits + tile - 1) / tile * tile;
  r.begin = min(r.len, split * chunk);
  r.end = min(r.len, r.begin + chunk);
  int bad = !meta_ok;
  if (meta_ok && r.end > r.begin)
    for (index_t p = r.begin / kv.page_size + threadIdx.x; p <= (r.end - 1) / kv.page_size; p += blockDim.x)
      bad |= !kv.page_ok(kv.page_table[b * kv.max_pages + p]);
  r.bad = __syncthreads_or(bad) != 0;
  return r;
}

// Host side: KV splits per request from host-known shapes only (graph-safe):
// enough CTAs to fill the GPU about twice, none shorter than 256 positions.
int choose_splits(const BlockAttentionProblem& P);
// The partial-result workspace for `splits` > 1 (kept alive by *holder).
SplitWorkspace make_split_workspace(const BlockAttentionProblem& P, int splits, const at::Tensor& like,
                                    at::Tensor* holder);
// out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s, for splits > 1.
void combine_splits(const BlockAttentionProblem& P, const SplitWorkspace& ws, int splits, cudaStream_t stream);

// Runs `kernel`(P, workspace) over the grid (split, kv head, request) with `threads` threads and `smem`
// bytes of dynamic shared memory, then combines the splits: the launch sequence of both paths.
template <typename Kernel>
void launch_split_kv(Kernel kernel, const BlockAttentionProblem& P, const at::Tensor& like, int threads,
                     size_t smem, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const int splits = choose_splits(P);
  at::Tensor workspace;
  const SplitWorkspace ws = make_split_workspace(P, splits, like, &workspace);
  const dim3 grid(splits, static_cast<unsigned>(P.kv.num_kv_heads), static_cast<unsigned>(P.kv.batch));
  kernel<<<grid, threads, smem, stream>>>(P, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) combine_splits(P, ws, splits, stream);
}

#if defined(DSPARK_WITH_CUTE)
// Tensor-core path: P.dtype fp16/bf16, head_dim 64 or 128, a device of compute capability >= 8.0.
void block_attention_tc_launch(const BlockAttentionProblem& P, const at::Tensor& like, cudaStream_t stream);
#endif

}  // namespace dspark
