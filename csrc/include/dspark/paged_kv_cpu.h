// Scratch layout of the CPU draft_block_attention kernel, shared with the
// binding that allocates it (one buffer per worker thread). Internal linkage
// (anonymous namespace) so that each per-ISA object keeps its own copy: no
// COMDAT merging of code compiled for different instruction sets.
#pragma once
#include "dspark/paged_kv.h"

namespace dspark {
namespace {

constexpr index_t kPagedCpuVec = 16;   // query rows per vector (AVX-512 floats; narrower ISAs split it)
// Rows are padded to a multiple of 32: the score micro-kernel works on 32-row blocks (GCC turns
// 16-row blocks of 4+ positions into shuffles instead of one FMA per vector).
constexpr index_t kPagedCpuRowAlign = 32;
constexpr index_t kPagedCpuTile = 32;  // KV positions per online-softmax step
constexpr index_t kPagedCpuMaxHeadDim = 512;

inline index_t paged_cpu_rows_padded(index_t rows) {
  return (rows + kPagedCpuRowAlign - 1) / kPagedCpuRowAlign * kPagedCpuRowAlign;
}

struct PagedCpuScratch {
  float* qt;               // [D][Rp] scaled queries, transposed
  float* o;                // [Rp][D] unnormalised outputs
  float* m;                // [Rp] running max
  float* l;                // [Rp] running sum
  float* corr;             // [Rp] rescale factor of the current tile
  float* row_block_index;  // [Rp] block row i of each row (for the causal mask)
  float* st;               // [kTile][Rp] scores, then probabilities
  float* kf;               // [kTile][D] K tile in fp32
  float* vf;               // [kTile][D] V tile in fp32

  static index_t max_rows(index_t group) { return paged_cpu_rows_padded(kMaxBlockRows * group); }
  static index_t floats(index_t group, index_t head_dim) {
    const index_t R = max_rows(group);
    return 2 * R * head_dim + 4 * R + kPagedCpuTile * R + 2 * kPagedCpuTile * head_dim;
  }
  PagedCpuScratch(float* base, index_t group, index_t head_dim) {
    const index_t R = max_rows(group), D = head_dim;
    qt = base;
    o = qt + D * R;
    m = o + R * D;
    l = m + R;
    corr = l + R;
    row_block_index = corr + R;
    st = row_block_index + R;
    kf = st + kPagedCpuTile * R;
    vf = kf + kPagedCpuTile * D;
  }
};

// Long contexts are cut into splits at fixed positions (multiples of kPagedCpuSplitLen), worked
// on in parallel and combined. Fixed boundaries keep a row's result a function of its own
// request only: not of the batch, the block size or the thread count.
constexpr index_t kPagedCpuSplitLen = 1024;

inline index_t paged_cpu_splits(index_t len) {
  return len <= kPagedCpuSplitLen ? 1 : (len + kPagedCpuSplitLen - 1) / kPagedCpuSplitLen;
}

// Block rows [first_row, first_row + rows) of a request form one chunk (kMaxBlockRows rows, the
// last may be shorter: blocks longer than that, e.g. prefill, take several). No row of the chunk
// sees positions >= visible_end; `splits` KV splits cover [0, visible_end).
struct PagedCpuChunk {
  index_t first_row, rows, visible_end, splits;
};

inline index_t paged_cpu_chunks(index_t block_rows) { return (block_rows + kMaxBlockRows - 1) / kMaxBlockRows; }

inline PagedCpuChunk paged_cpu_chunk(const BlockAttentionProblem& P, index_t b, index_t chunk) {
  const index_t n = P.block_rows(b), first = chunk * kMaxBlockRows;
  const index_t rows = n - first < kMaxBlockRows ? n - first : kMaxBlockRows;
  const index_t visible_end = P.last_visible(P.seq_lens[b], n, first + rows - 1) + 1;
  return {first, rows, visible_end, paged_cpu_splits(visible_end)};
}

// State of one KV split of a (request, kv head) item with R = block rows x group rows:
// unnormalised outputs, running max and sum.
struct PagedCpuPartial {
  float* o;  // [R][D]
  float* m;  // [R]
  float* l;  // [R]

  static index_t floats(index_t rows, index_t head_dim) { return rows * (head_dim + 2); }
  PagedCpuPartial(float* base, index_t rows, index_t head_dim) {
    o = base;
    m = o + rows * head_dim;
    l = m + rows;
  }
};

}  // namespace
}  // namespace dspark
