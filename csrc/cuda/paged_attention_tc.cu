// Tensor-core CUDA path of `draft_block_attention`: fp16/bf16, head dim 64 or
// 128, sm_80+ (sm_90 runs the same mma.sync code: the op is bound by K/V
// bytes, not by math, so wgmma would not pay). Built only when the
// CUTLASS/CuTe headers are found (cmake/cutlass.cmake); the SIMT kernel in
// paged_attention.cu is the fallback and the correctness baseline.
//
// Same grid, split of the KV range, metadata checks and workspace as the SIMT
// kernel (paged_attention.cuh): CTA (row chunk x split, kv head, request)
// serves up to 64 of the request's R = n_b x G query rows (the whole GQA group
// of each block row), so each K/V tile is read from global memory once per
// CTA; R > 64 (G = 8 with n_b > 8, or a prefill) takes more row chunks.
//
// Work per CTA (4 warps): its rows are cut into 16-row MMA tiles, up to 4.
// KV tiles of 64 positions are gathered from their pages into shared memory
// with cp.async, two stages deep so the next tile's loads overlap this tile's
// math. Warp w takes row tile w % row_tiles and a 64 / kv_groups-position slice
// of every KV tile (row_tiles = 1, 2 or 4 from the request's R, kv_groups =
// 4 / row_tiles), so all warps do useful MMAs even for a one-row block. Per slice: S = Q K^T with m16n8k16 MMAs (fp32
// accumulators; Q fragments stay in registers for the pass), mask, online
// softmax in fp32 registers, P rounded to the input type and O += P V with
// the S accumulators reused directly as the A operand. At the end of a pass
// the warps sharing a row tile merge their (m, l, O) through shared memory.
//
// CuTe provides the PTX atoms (SM80 MMA, ldmatrix, cp.async with zero fill);
// the fragment indexing is written out below from the PTX ISA's m16n8k16
// fragment layouts, with g = lane / 4 and t = lane % 4:
//   A (16 x 16, row major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16 x 8, k x n):       b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (16 x 8, fp32):        c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// ldmatrix.x4 hands out four 8x8 matrices, lane l giving the address of row
// l % 8 of matrix l / 8; lane l receives (row l / 4, columns 2(l % 4)..+1) of
// each, or with .trans the transposed pair (rows 2(l % 4)..+1, column l / 4).
#if defined(DSPARK_WITH_CUTE)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

#include "dspark/convert.h"
#include "dspark/paged_kv.h"
#include "paged_attention.cuh"

namespace dspark {
namespace {

constexpr int kWarps = 4;
constexpr int kRowTile = 16;  // query rows per MMA tile (the M of m16n8k16)
constexpr int kTileN = 64;    // KV positions per shared-memory stage
constexpr int kStages = 2;

template <typename T>
struct MmaTraits;
template <>
struct MmaTraits<bf16_bits> {
  using Atom = cute::SM80_16x8x16_F32BF16BF16F32_TN;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};
template <>
struct MmaTraits<fp16_bits> {
  using Atom = cute::SM80_16x8x16_F32F16F16F32_TN;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};

// c += a b for one 16x8x16 tile.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaTraits<T>::Atom::fma(c[0], c[1], c[2], c[3], a[0], a[1], a[2], a[3], b0, b1, c[0], c[1], c[2], c[3]);
}

__device__ __forceinline__ void ldmatrix_x4(const void* smem, uint32_t (&r)[4]) {
  cute::SM75_U32x4_LDSM_N::copy(*static_cast<const cute::uint128_t*>(smem), r[0], r[1], r[2], r[3]);
}
__device__ __forceinline__ void ldmatrix_x4_trans(const void* smem, uint32_t (&r)[4]) {
  cute::SM75_U16x8_LDSM_T::copy(*static_cast<const cute::uint128_t*>(smem), r[0], r[1], r[2], r[3]);
}

// 16 bytes global -> shared, asynchronously; zeros when !pred (nothing is read then).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(*static_cast<const cute::uint128_t*>(gmem),
                                                               *static_cast<cute::uint128_t*>(smem), pred);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Shared-memory row stride in elements: +16 bytes puts the 8 rows one ldmatrix reads on distinct banks.
template <int D>
constexpr int smem_stride() {
  return D + 8;
}
template <int D>
constexpr size_t smem_bytes() {
  return static_cast<size_t>(kWarps * kRowTile + 2 * kStages * kTileN) * smem_stride<D>() * 2;
}

// Slots of positions [p0, p0 + kTileN) of request b (-1 from `stop` on), one per thread from `first_thread`:
// the page lookups (a division each) are done once per position rather than once per 16-byte chunk.
__device__ __forceinline__ void tile_slots(const PagedLayout& kv, index_t b, index_t p0, index_t stop,
                                           int first_thread, index_t* slots) {
  const int j = static_cast<int>(threadIdx.x) - first_thread;
  if (j < 0 || j >= kTileN) return;
  const index_t pos = p0 + j;
  slots[j] = pos < stop ? kv.slot(b, pos) : -1;
}

// K/V of one tile (head h) into one stage, from its slots; slot -1 becomes zeros.
template <typename T, int D>
__device__ __forceinline__ void load_kv_tile(const BlockAttentionProblem& P, index_t h, const index_t* slots,
                                             T* k_dst, T* v_dst) {
  constexpr int kStride = smem_stride<D>(), kChunks = D / 8;  // 16-byte chunks per position
  const T* kc = static_cast<const T*>(P.k_cache);
  const T* vc = static_cast<const T*>(P.v_cache);
  for (int e = threadIdx.x; e < kTileN * kChunks; e += blockDim.x) {
    const int j = e / kChunks, c = (e % kChunks) * 8;
    const index_t slot = slots[j];
    const index_t off = slot >= 0 ? (slot * P.kv.num_kv_heads + h) * D + c : 0;
    cp_async16(k_dst + j * kStride + c, kc + off, slot >= 0);
    cp_async16(v_dst + j * kStride + c, vc + off, slot >= 0);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32)
    block_attention_tc_kernel(BlockAttentionProblem P, SplitPlan plan, SplitWorkspace ws) {
  constexpr int kStride = smem_stride<D>();
  constexpr int kKSteps = D / 16;  // k16 steps of Q K^T
  constexpr int kDTiles = D / 8;   // n8 tiles of O
  constexpr int kMaxSliceTiles = kTileN / 8;
  extern __shared__ float4 smem4[];  // float4: 16-byte aligned
  T* q_s = reinterpret_cast<T*>(smem4);                  // [kWarps * kRowTile][kStride]
  T* k_s = q_s + kWarps * kRowTile * kStride;            // [kStages][kTileN][kStride]
  T* v_s = k_s + kStages * kTileN * kStride;             // [kStages][kTileN][kStride]
  // After a pass's last tile the K/V stages hold the merge of the warps' partial results.
  float* merge_o = reinterpret_cast<float*>(k_s);        // [kWarps][kRowTile][D]
  float* merge_ml = merge_o + kWarps * kRowTile * D;     // [kWarps][kRowTile][2]
  __shared__ index_t slot_s[kStages][kTileN];            // slots of the tiles whose loads are issued next

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;

  const index_t h = blockIdx.y, b = blockIdx.z;
  const index_t G = P.group(), Hq = P.num_q_heads;
  const SplitRange range = split_range<T>(P, plan, ws, kTileN);
  if (range.n == 0) return;
  const index_t split = range.split, splits = plan.splits;
  const index_t R = range.rows_end;  // this CTA's rows are [rows_begin, R): one pass (chunk_rows = 64)
  // Row tiles from this CTA's rows: a short block (e.g. one decode row) leaves the warps free to split
  // every KV tile between them instead of idling.
  const index_t rows = R - range.rows_begin;
  const int row_tiles = rows <= kRowTile ? 1 : rows <= 2 * kRowTile ? 2 : kWarps;
  const int kv_groups = kWarps / row_tiles;
  const int wr = warp % row_tiles, wk = warp / row_tiles;  // this warp's row tile and KV slice
  const int slice = kTileN / kv_groups;                     // 16, 32 or 64 positions
  const int slice_tiles = slice / 8, slice0 = wk * slice;
  const T* q = static_cast<const T*>(P.q);
  const int rows_per_pass = row_tiles * kRowTile;

  for (index_t pass0 = range.rows_begin; pass0 < R; pass0 += rows_per_pass) {
    __syncthreads();  // the previous pass no longer reads q_s or the merge area
    // Positions past the last one any row of this pass sees are skipped (long causal blocks).
    const index_t pass_last_row = min(pass0 + rows_per_pass, R) - 1;
    const index_t pass_end =
        range.bad ? range.begin : min(range.end, P.last_visible(range.len, range.n, pass_last_row / G) + 1);
    const index_t kv_tiles = pass_end > range.begin ? (pass_end - range.begin + kTileN - 1) / kTileN : 0;
    tile_slots(P.kv, b, range.begin, pass_end, 0, slot_s[0]);
    if (kv_tiles > 1) tile_slots(P.kv, b, range.begin + kTileN, pass_end, kTileN, slot_s[1]);

    // Query rows of this pass (zeros past R), one warp per row: q may have any strides.
    for (int r = warp; r < rows_per_pass; r += kWarps) {
      const index_t row = pass0 + r;
      const T* src = row < R ? q + (range.row0 + row / G) * P.q_stride_t + (h * G + row % G) * P.q_stride_h : nullptr;
      for (int d = lane; d < D; d += 32) q_s[r * kStride + d] = src != nullptr ? src[d] : T{0};
    }
    __syncthreads();
    if (kv_tiles > 0) load_kv_tile<T, D>(P, h, slot_s[0], k_s, v_s);
    cute::cp_async_fence();
    uint32_t qa[kKSteps][4];  // A fragments of this warp's 16 rows
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks)
      ldmatrix_x4(q_s + (wr * kRowTile + lane % 8 + (lane / 8) % 2 * 8) * kStride + ks * 16 + lane / 16 * 8, qa[ks]);

    // This thread's two rows (g and g + 8 of the row tile): positions < lim are visible.
    const index_t row_a = pass0 + wr * kRowTile + g, row_b = row_a + 8;
    const index_t lim_a = row_a < R ? min(range.end, P.last_visible(range.len, range.n, row_a / G) + 1) : 0;
    const index_t lim_b = row_b < R ? min(range.end, P.last_visible(range.len, range.n, row_b / G) + 1) : 0;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;  // l: this thread's share until the end
    float o[kDTiles][4];
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;

    for (index_t it = 0; it < kv_tiles; ++it) {
      const int cur = static_cast<int>(it % kStages), next = static_cast<int>((it + 1) % kStages);
      if (it + 1 < kv_tiles)
        load_kv_tile<T, D>(P, h, slot_s[next], k_s + next * kTileN * kStride, v_s + next * kTileN * kStride);
      cute::cp_async_fence();
      cute::cp_async_wait<1>();  // this tile's group has landed (the next one may be in flight)
      __syncthreads();           // ... for every thread; and every thread has issued the loads that read slot_s
      if (it + 2 < kv_tiles) tile_slots(P.kv, b, range.begin + (it + 2) * kTileN, pass_end, 0, slot_s[cur]);
      const T* kt = k_s + cur * kTileN * kStride;
      const T* vt = v_s + cur * kTileN * kStride;

      // S = Q K^T over this warp's slice: n8 tiles j cover positions slice0 + 8j .. + 7.
      float s[kMaxSliceTiles][4];
#pragma unroll
      for (int j = 0; j < kMaxSliceTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
        for (int jj = 0; jj < kMaxSliceTiles / 2; ++jj) {
          if (2 * jj >= slice_tiles) continue;  // static trip count keeps the fragments in registers
          // Matrices: (positions +0..7, dims +0..7), (+0..7, +8..15), (+8..15, +0..7), (+8..15, +8..15).
          uint32_t kb[4];
          ldmatrix_x4(kt + (slice0 + jj * 16 + lane % 8 + lane / 16 * 8) * kStride + ks * 16 + (lane / 8) % 2 * 8, kb);
          mma<T>(s[2 * jj], qa[ks], kb[0], kb[1]);
          mma<T>(s[2 * jj + 1], qa[ks], kb[2], kb[3]);
        }
      }

      // Mask, scale, online softmax (rows are spread over the 4 lanes of a quad).
      const index_t p0 = range.begin + it * kTileN + slice0 + 2 * t;
      float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
      for (int j = 0; j < kMaxSliceTiles; ++j) {
        if (j >= slice_tiles) continue;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const index_t pos = p0 + 8 * j + e;
          s[j][e] = pos < lim_a ? s[j][e] * P.scale : -INFINITY;
          s[j][2 + e] = pos < lim_b ? s[j][2 + e] * P.scale : -INFINITY;
          mx_a = fmaxf(mx_a, s[j][e]);
          mx_b = fmaxf(mx_b, s[j][2 + e]);
        }
      }
      const float new_a = fmaxf(m_a, quad_max(mx_a)), new_b = fmaxf(m_b, quad_max(mx_b));
      // A row that has seen nothing keeps max -inf; exp_nonpositive(-inf) = 0 keeps it empty.
      const float safe_a = new_a == -INFINITY ? 0.0f : new_a, safe_b = new_b == -INFINITY ? 0.0f : new_b;
      const float corr_a = exp_nonpositive(m_a - safe_a), corr_b = exp_nonpositive(m_b - safe_b);
      m_a = new_a;
      m_b = new_b;
      l_a *= corr_a;
      l_b *= corr_b;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o[dt][0] *= corr_a;
        o[dt][1] *= corr_a;
        o[dt][2] *= corr_b;
        o[dt][3] *= corr_b;
      }
#pragma unroll
      for (int j = 0; j < kMaxSliceTiles; ++j) {
        if (j >= slice_tiles) continue;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[j][e] = exp_nonpositive(s[j][e] - safe_a);
          s[j][2 + e] = exp_nonpositive(s[j][2 + e] - safe_b);
          l_a += s[j][e];
          l_b += s[j][2 + e];
        }
      }

      // O += P V: the C fragments of n8 tiles 2kk and 2kk+1 of S form the A fragment of k16 step kk.
#pragma unroll
      for (int kk = 0; kk < kMaxSliceTiles / 2; ++kk) {
        if (2 * kk >= slice_tiles) continue;
        const uint32_t pa[4] = {MmaTraits<T>::pack(s[2 * kk][0], s[2 * kk][1]),
                                MmaTraits<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                                MmaTraits<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                MmaTraits<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dd = 0; dd < kDTiles / 2; ++dd) {
          // Transposed matrices: (positions +0..7, dims +0..7), (+8..15, +0..7), (+0..7, +8..15), (+8..15, +8..15).
          uint32_t vb[4];
          ldmatrix_x4_trans(vt + (slice0 + kk * 16 + lane % 8 + (lane / 8) % 2 * 8) * kStride + dd * 16 + lane / 16 * 8,
                            vb);
          mma<T>(o[2 * dd], pa, vb[0], vb[1]);
          mma<T>(o[2 * dd + 1], pa, vb[2], vb[3]);
        }
      }
      __syncthreads();  // the next iteration's loads overwrite this stage; its slots (tile it + 2) are visible
    }
    cute::cp_async_wait<0>();  // only empty groups can still be pending
    l_a = quad_sum(l_a);
    l_b = quad_sum(l_b);

    if (kv_groups > 1) {  // merge the KV slices of each row tile (into the warp with wk == 0)
      __syncthreads();    // the K/V stages become the merge area
      if (t == 0) {
        float* ml = merge_ml + warp * kRowTile * 2;
        ml[g * 2] = m_a;
        ml[g * 2 + 1] = l_a;
        ml[(g + 8) * 2] = m_b;
        ml[(g + 8) * 2 + 1] = l_b;
      }
      __syncthreads();
      float max_a = -INFINITY, max_b = -INFINITY;
      for (int k = 0; k < kv_groups; ++k) {
        const float* ml = merge_ml + (wr + k * row_tiles) * kRowTile * 2;
        max_a = fmaxf(max_a, ml[g * 2]);
        max_b = fmaxf(max_b, ml[(g + 8) * 2]);
      }
      const float safe_a = max_a == -INFINITY ? 0.0f : max_a, safe_b = max_b == -INFINITY ? 0.0f : max_b;
      float sum_a = 0.0f, sum_b = 0.0f;
      for (int k = 0; k < kv_groups; ++k) {
        const float* ml = merge_ml + (wr + k * row_tiles) * kRowTile * 2;
        sum_a = fmaf(exp_nonpositive(ml[g * 2] - safe_a), ml[g * 2 + 1], sum_a);
        sum_b = fmaf(exp_nonpositive(ml[(g + 8) * 2] - safe_b), ml[(g + 8) * 2 + 1], sum_b);
      }
      const float w_a = exp_nonpositive(m_a - safe_a), w_b = exp_nonpositive(m_b - safe_b);
      float* mine = merge_o + warp * kRowTile * D;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o[dt][0] *= w_a;
        o[dt][1] *= w_a;
        o[dt][2] *= w_b;
        o[dt][3] *= w_b;
        if (wk > 0) {
          *reinterpret_cast<float2*>(mine + g * D + dt * 8 + 2 * t) = make_float2(o[dt][0], o[dt][1]);
          *reinterpret_cast<float2*>(mine + (g + 8) * D + dt * 8 + 2 * t) = make_float2(o[dt][2], o[dt][3]);
        }
      }
      __syncthreads();
      if (wk == 0) {
        for (int k = 1; k < kv_groups; ++k) {
          const float* other = merge_o + (wr + k * row_tiles) * kRowTile * D;
#pragma unroll
          for (int dt = 0; dt < kDTiles; ++dt) {
            const float2 x = *reinterpret_cast<const float2*>(other + g * D + dt * 8 + 2 * t);
            const float2 y = *reinterpret_cast<const float2*>(other + (g + 8) * D + dt * 8 + 2 * t);
            o[dt][0] += x.x;
            o[dt][1] += x.y;
            o[dt][2] += y.x;
            o[dt][3] += y.y;
          }
        }
      }
      m_a = max_a;
      m_b = max_b;
      l_a = sum_a;
      l_b = sum_b;
    }
    if (wk != 0) continue;

#pragma unroll
    for (int half = 0; half < 2; ++half) {  // rows g (C elements 0, 1) and g + 8 (elements 2, 3)
      const index_t row = half == 0 ? row_a : row_b;
      if (row >= R) continue;
      const float m = half == 0 ? m_a : m_b, l = half == 0 ? l_a : l_b;
      const index_t tok = range.row0 + row / G, hq = h * G + row % G;
      if (splits == 1) {
        T* out = static_cast<T*>(P.out) + (tok * Hq + hq) * D + 2 * t;
        const float inv = range.bad ? NAN : 1.0f / l;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          store_float(out + dt * 8, o[dt][2 * half] * inv);
          store_float(out + dt * 8 + 1, o[dt][2 * half + 1] * inv);
        }
      } else {
        const index_t at = (split * P.num_tokens + tok) * Hq + hq;
        float* dst = ws.o + at * D + 2 * t;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt)
          *reinterpret_cast<float2*>(dst + dt * 8) =
              range.bad ? make_float2(NAN, NAN) : make_float2(o[dt][2 * half], o[dt][2 * half + 1]);
        if (t == 0) {
          ws.ml[at * 2] = range.bad ? NAN : m;
          ws.ml[at * 2 + 1] = range.bad ? NAN : l;
        }
      }
    }
  }
}

template <typename T, int D>
void launch(const BlockAttentionProblem& P, const at::Tensor& like, cudaStream_t stream) {
  constexpr size_t smem = smem_bytes<D>();
  static_assert(kWarps * kRowTile * (D + 2) * sizeof(float) <= 2 * kStages * kTileN * smem_stride<D>() * 2,
                "the merge area must fit in the K/V stages");
  launch_split_kv(block_attention_tc_kernel<T, D>, P, like, kWarps * 32, smem, kWarps * kRowTile, stream);
}

template <typename T>
void launch_dim(const BlockAttentionProblem& P, const at::Tensor& like, cudaStream_t stream) {
  switch (P.kv.head_dim) {
    case 64: launch<T, 64>(P, like, stream); break;
    case 128: launch<T, 128>(P, like, stream); break;
    default: TORCH_CHECK(false, "draft_block_attention: the tensor-core path takes head_dim 64 or 128, got ",
                         P.kv.head_dim);
  }
}

}  // namespace

void block_attention_tc_launch(const BlockAttentionProblem& P, const at::Tensor& like, cudaStream_t stream) {
  switch (P.dtype) {
    case FloatCode::bf16: launch_dim<bf16_bits>(P, like, stream); break;
    case FloatCode::f16: launch_dim<fp16_bits>(P, like, stream); break;
    default: TORCH_CHECK(false, "draft_block_attention: the tensor-core path takes fp16 or bf16");
  }
}

}  // namespace dspark
#endif  // DSPARK_WITH_CUTE
