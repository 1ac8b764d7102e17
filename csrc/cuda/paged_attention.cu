// CUDA kernel of `draft_block_attention` (SIMT, split-KV / flash-decoding), the
// combine kernel, and the choice between this path and the tensor-core one
// (paged_attention_tc.cu): tensor cores for fp16/bf16 with head dim 64/128 on
// sm_80+, this kernel otherwise and as the correctness baseline.
//
// Grid (row chunk x split, kv head, request). A CTA serves up to kWarpRows x
// warps query rows of its request's block for the whole GQA group (64 with 16
// warps) in one pass, so each K/V tile is read from global memory once per
// CTA; longer blocks (prefill) take more row chunks, i.e. more CTAs, not more
// passes. The request's KV range is cut into contiguous splits on the device
// (from seq_lens), so the host never reads device data: the launch shape
// depends only on tensor shapes, which keeps the op graph-capturable. Each tile of kTile positions is
// staged in shared memory as fp32; warp w owns rows, lane j scores position
// j, and the output dims are spread over the lanes for the P.V product.
// With more than one split, partial (m, l, o) go to a workspace and a second
// kernel combines them.
//
// Invalid index values (see BlockAttentionProblem::request_ok, page ids
// outside [0, num_pages)) make the request's output rows NaN; nothing outside
// the tensors is read or written.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "../bindings/paged_kv.h"
#include "dspark/convert.h"
#include "dspark/paged_kv.h"
#include "paged_attention.cuh"

namespace dspark {
namespace {

constexpr int kTile = 32;        // KV positions per tile (one per lane)
constexpr int kWarpRows = 4;     // query rows a warp carries at once
constexpr int kMaxWarps = 16;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// 16 bytes of T as floats.
template <typename T>
__device__ __forceinline__ void load16(const T* src, float* dst) {
  constexpr int kVec = 16 / sizeof(T);
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; ++i) dst[i] = to_float(vals[i]);
}

template <int D>
constexpr int smem_floats(int rows) {
  return rows * D + kTile * (D + 4) + kTile * D;
}

template <typename T, int D>
__global__ void __launch_bounds__(kMaxWarps * 32)
    block_attention_kernel(BlockAttentionProblem P, SplitPlan plan, SplitWorkspace ws) {
  extern __shared__ float4 smem4[];  // float4: 16-byte aligned
  float* smem = reinterpret_cast<float*>(smem4);
  constexpr int kCols = D / 32;     // output dims per lane
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kKStride = D + 4;   // padded: lanes reading different rows hit different banks
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows_per_pass = warps * kWarpRows;
  float* q_s = smem;                                // [rows_per_pass][D]
  float* k_s = q_s + rows_per_pass * D;             // [kTile][kKStride]
  float* v_s = k_s + kTile * kKStride;              // [kTile][D]
  __shared__ index_t slot_s[kTile];

  const index_t h = blockIdx.y, b = blockIdx.z;
  const PagedLayout& kv = P.kv;
  const index_t G = P.group(), Hq = P.num_q_heads, Hkv = kv.num_kv_heads;

  const SplitRange range = split_range<T>(P, plan, ws, kTile);
  if (range.n == 0) return;
  const index_t row0 = range.row0, n = range.n, len = range.len, begin = range.begin, end = range.end;
  const index_t split = range.split, splits = plan.splits;
  const bool bad = range.bad;

  const index_t R = range.rows_end;  // this CTA's rows are [rows_begin, R) (one pass: chunk_rows = rows_per_pass)
  const T* kc = static_cast<const T*>(P.k_cache);
  const T* vc = static_cast<const T*>(P.v_cache);
  const T* q = static_cast<const T*>(P.q);

  for (index_t pass0 = range.rows_begin; pass0 < R; pass0 += rows_per_pass) {
    __syncthreads();  // the previous pass no longer reads q_s
    // Queries of this pass, scaled; rows past R are zero.
    for (index_t e = threadIdx.x; e < rows_per_pass * D; e += blockDim.x) {
      const index_t r = pass0 + e / D, d = e % D;
      const index_t i = r / G;
      q_s[e] = r < R ? to_float(q[(row0 + i) * P.q_stride_t + (h * G + r % G) * P.q_stride_h + d]) * P.scale : 0.0f;
    }
    float m[kWarpRows], l[kWarpRows], o[kWarpRows][kCols];
    index_t last[kWarpRows];
#pragma unroll
    for (int k = 0; k < kWarpRows; ++k) {
      m[k] = -INFINITY;
      l[k] = 0.0f;
#pragma unroll
      for (int c = 0; c < kCols; ++c) o[k][c] = 0.0f;
      const index_t r = pass0 + warp * kWarpRows + k;
      last[k] = r < R ? P.last_visible(len, n, r / G) : -1;
    }

    // Positions past the last one any row of this pass sees are skipped (long causal blocks).
    const index_t pass_last_row = (pass0 + rows_per_pass < R ? pass0 + rows_per_pass : R) - 1;
    const index_t pass_end = min(end, P.last_visible(len, n, pass_last_row / G) + 1);
    for (index_t p0 = bad ? pass_end : begin; p0 < pass_end; p0 += kTile) {
      __syncthreads();  // previous tile (and the q_s fill) finished
      if (threadIdx.x < kTile) {
        const index_t pos = p0 + threadIdx.x;
        slot_s[threadIdx.x] = pos < pass_end ? kv.slot(b, pos) : -1;
      }
      __syncthreads();
      for (index_t e = threadIdx.x; e < kTile * (D / kVec); e += blockDim.x) {
        const int j = static_cast<int>(e / (D / kVec)), c = static_cast<int>(e % (D / kVec)) * kVec;
        const index_t slot = slot_s[j];
        float kf[kVec], vf[kVec];
        if (slot >= 0) {
          const index_t off = (slot * Hkv + h) * D + c;
          load16(kc + off, kf);
          load16(vc + off, vf);
        } else {
#pragma unroll
          for (int i = 0; i < kVec; ++i) kf[i] = vf[i] = 0.0f;
        }
#pragma unroll
        for (int i = 0; i < kVec; i += 4) {  // j * kKStride + c and j * D + c are multiples of 4
          *reinterpret_cast<float4*>(k_s + j * kKStride + c + i) = make_float4(kf[i], kf[i + 1], kf[i + 2], kf[i + 3]);
          *reinterpret_cast<float4*>(v_s + j * D + c + i) = make_float4(vf[i], vf[i + 1], vf[i + 2], vf[i + 3]);
        }
      }
      __syncthreads();

      // Scores: lane = position, for this warp's rows.
      float s[kWarpRows];
#pragma unroll
      for (int k = 0; k < kWarpRows; ++k) s[k] = 0.0f;
      const float4* k4 = reinterpret_cast<const float4*>(k_s + lane * kKStride);
      const float4* q4 = reinterpret_cast<const float4*>(q_s + warp * kWarpRows * D);
#pragma unroll 4
      for (int d4 = 0; d4 < D / 4; ++d4) {
        const float4 kk = k4[d4];
#pragma unroll
        for (int k = 0; k < kWarpRows; ++k) {
          const float4 qq = q4[k * (D / 4) + d4];
          s[k] = fmaf(qq.x, kk.x, fmaf(qq.y, kk.y, fmaf(qq.z, kk.z, fmaf(qq.w, kk.w, s[k]))));
        }
      }
      const index_t pos = p0 + lane;
      float p[kWarpRows];
#pragma unroll
      for (int k = 0; k < kWarpRows; ++k) {
        const float sk = pos < end && pos <= last[k] ? s[k] : -INFINITY;
        const float m_new = fmaxf(m[k], warp_max(sk));
        // A row that has seen nothing yet keeps max -inf: exp(-inf - 0) = 0 keeps it empty.
        const float safe = m_new == -INFINITY ? 0.0f : m_new;
        p[k] = exp_nonpositive(sk - safe);
        const float corr = exp_nonpositive(m[k] - safe);
        l[k] = fmaf(l[k], corr, warp_sum(p[k]));
        m[k] = m_new;
#pragma unroll
        for (int c = 0; c < kCols; ++c) o[k][c] *= corr;
      }
      for (int j = 0; j < kTile; ++j) {
        float vv[kCols];
#pragma unroll
        for (int c = 0; c < kCols; ++c) vv[c] = v_s[j * D + lane + 32 * c];
#pragma unroll
        for (int k = 0; k < kWarpRows; ++k) {
          const float pj = __shfl_sync(0xffffffffu, p[k], j);
#pragma unroll
          for (int c = 0; c < kCols; ++c) o[k][c] = fmaf(pj, vv[c], o[k][c]);
        }
      }
    }

#pragma unroll
    for (int k = 0; k < kWarpRows; ++k) {
      const index_t r = pass0 + warp * kWarpRows + k;
      if (r >= R) continue;
      const index_t t = row0 + r / G, hq = h * G + r % G;
      if (splits == 1) {
        T* out = static_cast<T*>(P.out) + (t * Hq + hq) * D;
        const float inv = bad ? NAN : 1.0f / l[k];
#pragma unroll
        for (int c = 0; c < kCols; ++c) store_float(out + lane + 32 * c, o[k][c] * inv);
      } else {
        const index_t row = (split * P.num_tokens + t) * Hq + hq;
#pragma unroll
        for (int c = 0; c < kCols; ++c) ws.o[row * D + lane + 32 * c] = bad ? NAN : o[k][c];
        if (lane == 0) {
          ws.ml[row * 2] = bad ? NAN : m[k];
          ws.ml[row * 2 + 1] = bad ? NAN : l[k];
        }
      }
    }
  }
}

// One warp per (token, query head): out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
// A NaN max in any split marks the row invalid (split_range writes it into split 0 alone, and the splits
// after a NaN are not read).
template <typename T, int D>
__global__ void combine_splits_kernel(BlockAttentionProblem P, SplitWorkspace ws, int splits) {
  constexpr int kCols = D / 32;
  const index_t row = static_cast<index_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const index_t rows = P.num_tokens * P.num_q_heads;
  if (row >= rows) return;
  T* out = static_cast<T*>(P.out) + row * D;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) {
    const float ms = ws.ml[(s * rows + row) * 2];
    if (isnan(ms)) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) store_float(out + lane + 32 * c, NAN);
      return;
    }
    mx = fmaxf(mx, ms);
  }
  const float safe = mx == -INFINITY ? 0.0f : mx;
  float total = 0.0f, acc[kCols] = {};
  for (int s = 0; s < splits; ++s) {
    const index_t at = s * rows + row;
    const float ms = ws.ml[at * 2];
    if (ms == -INFINITY) continue;  // empty split: its o was never accumulated
    const float w = exp_nonpositive(ms - safe);
    total = fmaf(w, ws.ml[at * 2 + 1], total);
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[c] = fmaf(w, ws.o[at * D + lane + 32 * c], acc[c]);
  }
  const float inv = 1.0f / total;
#pragma unroll
  for (int c = 0; c < kCols; ++c) store_float(out + lane + 32 * c, acc[c] * inv);
}

template <typename T, int D>
void launch(const BlockAttentionProblem& P, const at::Tensor& like, cudaStream_t stream) {
  const auto& props = *at::cuda::getCurrentDeviceProperties();
  // Rows a block can have (host bound: no device data is read).
  const index_t max_rows = std::min<index_t>(P.max_block_rows, P.num_tokens) * P.group();
  int warps = static_cast<int>(std::clamp<index_t>((max_rows + kWarpRows - 1) / kWarpRows, 4, kMaxWarps));
  const size_t budget = props.sharedMemPerBlockOptin - 1024;  // static shared memory (slot_s) comes on top
  while (warps > 4 && smem_floats<D>(warps * kWarpRows) * sizeof(float) > budget) --warps;
  const size_t smem = smem_floats<D>(warps * kWarpRows) * sizeof(float);
  TORCH_CHECK(smem <= budget, "draft_block_attention: head_dim ", D,
              " needs more shared memory than this GPU offers");
  launch_split_kv(block_attention_kernel<T, D>, P, like, warps * 32, smem, warps * kWarpRows, stream);
}

template <typename T>
void launch_dim(const BlockAttentionProblem& P, const at::Tensor& like, cudaStream_t stream) {
  switch (P.kv.head_dim) {
    case 64: launch<T, 64>(P, like, stream); break;
    case 96: launch<T, 96>(P, like, stream); break;
    case 128: launch<T, 128>(P, like, stream); break;
    case 256: launch<T, 256>(P, like, stream); break;
    default: TORCH_CHECK(false, "draft_block_attention: head_dim must be 64, 96, 128 or 256 on CUDA, got ", P.kv.head_dim);
  }
}

template <typename T, int D>
void launch_combine(const BlockAttentionProblem& P, const SplitWorkspace& ws, int splits, cudaStream_t stream) {
  constexpr int kCombineWarps = 4;
  const index_t rows = P.num_tokens * P.num_q_heads;
  const unsigned blocks = static_cast<unsigned>((rows + kCombineWarps - 1) / kCombineWarps);
  combine_splits_kernel<T, D><<<blocks, kCombineWarps * 32, 0, stream>>>(P, ws, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_combine_dim(const BlockAttentionProblem& P, const SplitWorkspace& ws, int splits, cudaStream_t stream) {
  switch (P.kv.head_dim) {
    case 64: launch_combine<T, 64>(P, ws, splits, stream); break;
    case 96: launch_combine<T, 96>(P, ws, splits, stream); break;
    case 128: launch_combine<T, 128>(P, ws, splits, stream); break;
    case 256: launch_combine<T, 256>(P, ws, splits, stream); break;
    default: TORCH_CHECK(false, "draft_block_attention: head_dim must be 64, 96, 128 or 256 on CUDA, got ", P.kv.head_dim);
  }
}

enum class Impl { automatic, simt, tensor_core };

// DSPARK_ATTENTION_IMPL=simt|tc forces a path (tests and benchmarks compare them); unset or auto picks.
Impl requested_impl() {
  const char* s = std::getenv("DSPARK_ATTENTION_IMPL");
  if (s == nullptr || *s == '\0' || std::strcmp(s, "auto") == 0) return Impl::automatic;
  if (std::strcmp(s, "simt") == 0) return Impl::simt;
  TORCH_CHECK(std::strcmp(s, "tc") == 0, "draft_block_attention: DSPARK_ATTENTION_IMPL must be auto, simt or tc, got '",
              s, "'");
  return Impl::tensor_core;
}

// Whether the tensor-core path serves this problem on the current device.
bool tensor_core_fits(const BlockAttentionProblem& P) {
#if defined(DSPARK_WITH_CUTE)
  return (P.dtype == FloatCode::bf16 || P.dtype == FloatCode::f16) &&
         (P.kv.head_dim == 64 || P.kv.head_dim == 128) && at::cuda::getCurrentDeviceProperties()->major >= 8;
#else
  (void)P;
  return false;
#endif
}

}  // namespace

SplitPlan plan_split_kv(const BlockAttentionProblem& P, index_t chunk_rows) {
  constexpr index_t kMaxSplits = 32;
  constexpr index_t kMinSplitLen = 256;  // positions: shorter splits cost more in combining than they save
  constexpr index_t kMaxWorkspaceBytes = index_t{64} << 20;
  SplitPlan plan;
  plan.chunk_rows = chunk_rows;
  const index_t rows = std::min<index_t>(P.max_block_rows, P.num_tokens) * P.group();  // most rows a request has
  plan.row_chunks = std::max<index_t>(1, (rows + chunk_rows - 1) / chunk_rows);
  const index_t ctas = P.kv.batch * P.kv.num_kv_heads * plan.row_chunks;
  const index_t by_len = std::max<index_t>(1, P.kv.capacity() / kMinSplitLen);
  const index_t want = (2 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount + ctas - 1) / ctas;
  const index_t split_bytes = P.num_tokens * P.num_q_heads * (P.kv.head_dim + 2) * static_cast<index_t>(sizeof(float));
  const index_t by_workspace = std::max<index_t>(1, kMaxWorkspaceBytes / std::max<index_t>(1, split_bytes));
  plan.splits = std::clamp<index_t>(std::min({want, by_len, by_workspace}), 1, kMaxSplits);
  TORCH_CHECK(plan.splits * plan.row_chunks <= std::numeric_limits<int32_t>::max(),
              "draft_block_attention: too many query rows per request for one launch (max_block_rows = ",
              P.max_block_rows, ")");
  return plan;
}

SplitWorkspace make_split_workspace(const BlockAttentionProblem& P, const SplitPlan& plan, const at::Tensor& like,
                                    at::Tensor* holder) {
  SplitWorkspace ws;
  if (plan.splits <= 1) return ws;
  const index_t rows = P.num_tokens * P.num_q_heads, D = P.kv.head_dim;
  *holder = at::empty({plan.splits * rows * (D + 2)}, like.options().dtype(at::kFloat));
  ws.o = holder->data_ptr<float>();
  ws.ml = ws.o + plan.splits * rows * D;
  return ws;
}

void combine_splits(const BlockAttentionProblem& P, const SplitWorkspace& ws, const SplitPlan& plan,
                    cudaStream_t stream) {
  const int splits = static_cast<int>(plan.splits);
  with_float_type(P.dtype, [&](auto t) { launch_combine_dim<decltype(t)>(P, ws, splits, stream); });
}

void block_attention_cuda_launch(const BlockAttentionProblem& P, const at::Tensor& like) {
  TORCH_CHECK(P.kv.batch <= 65535, "draft_block_attention: at most 65535 requests per call on CUDA, got ", P.kv.batch);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(P.k_cache) % 16 == 0 && reinterpret_cast<uintptr_t>(P.v_cache) % 16 == 0,
              "draft_block_attention: k_cache and v_cache must be 16-byte aligned on CUDA");
  const Impl impl = requested_impl();
  const bool tc = tensor_core_fits(P);
  TORCH_CHECK(impl != Impl::tensor_core || tc,
              "draft_block_attention: DSPARK_ATTENTION_IMPL=tc needs fp16/bf16, head_dim 64 or 128, a GPU of compute "
              "capability 8.0 or newer and a build with the CUTLASS/CuTe headers (dspark info); got ",
              P.dtype == FloatCode::f32 ? "float32" : P.dtype == FloatCode::bf16 ? "bfloat16" : "float16",
              ", head_dim ", P.kv.head_dim);
  if (P.num_tokens == 0 || P.kv.batch == 0) return;  // no rows, or no request (the binding fills NaN rows)
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
#if defined(DSPARK_WITH_CUTE)
  if (tc && impl != Impl::simt) {
    block_attention_tc_launch(P, like, stream);
    return;
  }
#endif
  with_float_type(P.dtype, [&](auto t) { launch_dim<decltype(t)>(P, like, stream); });
}

}  // namespace dspark
