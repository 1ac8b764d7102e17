// Pieces shared by the two CUDA paths of `draft_block_attention`: the SIMT
// kernel (paged_attention.cu, every dtype and head dim) and the tensor-core
// kernel (paged_attention_tc.cu, fp16/bf16 with head dim 64/128 on sm_80+,
// built when the CUTLASS/CuTe headers are found). Both use the same grid
// (row chunk x split, kv head, request), the same split of a request's KV
// range, the same metadata checks, the same partial-result workspace and the
// same combine kernel.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "dspark/convert.h"
#include "dspark/paged_kv.h"

namespace dspark {

struct SplitWorkspace {
  float* o = nullptr;   // [splits, T, Hq, D] unnormalised partial outputs
  float* ml = nullptr;  // [splits, T, Hq, 2] partial max (of scaled scores) and sum of exponentials
};

// How the grid (x, kv head, request) covers a call, from host-known shapes only (graph-safe): x = chunk *
// splits + split. A request's R = n_b x G query rows are cut into row chunks of `chunk_rows` (one pass of
// the kernel, so no CTA reads its KV range twice), and its KV range into `splits` contiguous parts.
struct SplitPlan {
  index_t splits = 1, row_chunks = 1, chunk_rows = 1;
};

// What CTA (x, kv head, request) of a kernel with `tile`-position KV tiles works on.
struct SplitRange {
  index_t row0 = 0, n = 0;              // the request's first query row and its row count (0: nothing to do)
  index_t rows_begin = 0, rows_end = 0; // this CTA's rows r (of the request's n_b x G; block row r / G)
  index_t len = 0;                      // the request's KV length
  index_t split = 0;
  index_t begin = 0, end = 0;           // this split's KV positions [begin, end)
  bool bad = false;                     // page ids outside [0, num_pages) in [begin, end): the rows get NaN
};

// Writes NaN into the output of query rows first, first + stride, ... < end for the heads of kv head h
// (into split 0's (m, l) when the call has several splits: the combine kernel turns them into NaN rows).
template <typename T>
__device__ void nan_rows(const BlockAttentionProblem& P, const SplitPlan& plan, const SplitWorkspace& ws, index_t h,
                         index_t first, index_t end, index_t stride) {
  const index_t G = P.group(), D = P.kv.head_dim, Hq = P.num_q_heads;
  for (index_t t = first; t < end; t += stride) {
    if (plan.splits == 1) {
      T* out = static_cast<T*>(P.out) + (t * Hq + h * G) * D;
      for (index_t e = threadIdx.x; e < G * D; e += blockDim.x) store_float(out + e, NAN);
    } else {
      for (index_t g = threadIdx.x; g < G; g += blockDim.x) {
        float* ml = ws.ml + (t * Hq + h * G + g) * 2;
        ml[0] = ml[1] = NAN;
      }
    }
  }
}

// Every thread of the CTA calls it; the result is uniform across the CTA (it ends in a barrier unless n = 0).
// Invalid metadata never makes a kernel read outside the tensors, and every output row is still written:
// - cu_q_lens not a partition of [0, T) (cu_q_lens[0] != 0, a decrease, or cu_q_lens[B] != T): every row of
//   the call is NaN (the grid's CTAs share them out);
// - otherwise a request that fails request_ok: its own rows are NaN (its CTAs share them out);
// - page ids outside [0, num_pages) in a split's range: `bad`, the kernel writes NaN for its rows.
// Checking the partition costs each CTA B + 1 reads of cu_q_lens (from L2), about as many as its page checks.
template <typename T>
__device__ SplitRange split_range(const BlockAttentionProblem& P, const SplitPlan& plan, const SplitWorkspace& ws,
                                  index_t tile) {
  SplitRange r;
  const PagedLayout& kv = P.kv;
  const index_t h = blockIdx.y, b = blockIdx.z, B = kv.batch;
  int broken = threadIdx.x == 0 && (P.cu_q_lens[0] != 0 || P.cu_q_lens[B] != P.num_tokens);
  for (index_t i = threadIdx.x; i < B; i += blockDim.x) broken |= P.cu_q_lens[i + 1] < P.cu_q_lens[i];
  if (__syncthreads_or(broken)) {
    nan_rows<T>(P, plan, ws, h, b * gridDim.x + blockIdx.x, P.num_tokens, B * gridDim.x);
    return r;
  }
  r.row0 = P.cu_q_lens[b];
  const index_t n = P.cu_q_lens[b + 1] - r.row0;  // in [0, T - row0]: cu_q_lens partitions [0, T)
  if (!P.request_ok(b)) {
    nan_rows<T>(P, plan, ws, h, r.row0 + blockIdx.x, r.row0 + n, gridDim.x);
    return r;
  }
  r.split = blockIdx.x % plan.splits;
  r.rows_begin = blockIdx.x / plan.splits * plan.chunk_rows;
  r.rows_end = min(n * P.group(), r.rows_begin + plan.chunk_rows);
  if (r.rows_begin >= r.rows_end) return r;  // uniform across the CTA: the caller returns before any barrier
  r.n = n;
  r.len = P.seq_lens[b];
  const index_t chunk = ((r.len + plan.splits - 1) / plan.splits + tile - 1) / tile * tile;
  r.begin = min(r.len, r.split * chunk);
  r.end = min(r.len, r.begin + chunk);
  int bad = 0;
  if (r.end > r.begin)
    for (index_t p = r.begin / kv.page_size + threadIdx.x; p <= (r.end - 1) / kv.page_size; p += blockDim.x)
      bad |= !kv.page_ok(kv.page_table[b * kv.max_pages + p]);
  r.bad = __syncthreads_or(bad) != 0;
  return r;
}

// Host side: the grid for kernels whose CTAs take `chunk_rows` query rows: enough CTAs to fill the GPU
// about twice, counting the row chunks first (a long block, e.g. a prefill, fills it with rows and gets
// no KV splits), no split shorter than 256 positions, and a split workspace of at most 64 MiB.
SplitPlan plan_split_kv(const BlockAttentionProblem& P, index_t chunk_rows);
// The partial-result workspace for plan.splits > 1 (kept alive by *holder).
SplitWorkspace make_split_workspace(const BlockAttentionProblem& P, const SplitPlan& plan, const at::Tensor& like,
                                    at::Tensor* holder);
// out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s, for plan.splits > 1.
void combine_splits(const BlockAttentionProblem& P, const SplitWorkspace& ws, const SplitPlan& plan,
                    cudaStream_t stream);

// Runs `kernel`(P, plan, workspace) over the grid (x, kv head, request) with `threads` threads, `smem` bytes
// of dynamic shared memory and `chunk_rows` query rows per CTA, then combines the splits: the launch
// sequence of both paths.
template <typename Kernel>
void launch_split_kv(Kernel kernel, const BlockAttentionProblem& P, const at::Tensor& like, int threads,
                     size_t smem, index_t chunk_rows, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const SplitPlan plan = plan_split_kv(P, chunk_rows);
  at::Tensor workspace;
  const SplitWorkspace ws = make_split_workspace(P, plan, like, &workspace);
  const dim3 grid(static_cast<unsigned>(plan.splits * plan.row_chunks), static_cast<unsigned>(P.kv.num_kv_heads),
                  static_cast<unsigned>(P.kv.batch));
  kernel<<<grid, threads, smem, stream>>>(P, plan, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (plan.splits > 1) combine_splits(P, ws, plan, stream);
}

#if defined(DSPARK_WITH_CUTE)
// Tensor-core path: P.dtype fp16/bf16, head_dim 64 or 128, a device of compute capability >= 8.0.
void block_attention_tc_launch(const BlockAttentionProblem& P, const at::Tensor& like, cudaStream_t stream);
#endif

}  // namespace dspark
