// Plain-data descriptions of the paged-KV ops (append_kv, draft_block_attention,
// kv_rollback), shared by the CPU and CUDA kernels: raw pointers, element
// strides, dtypes as codes.
//
// Cache layout: [num_pages, page_size, num_kv_heads, head_dim], contiguous. KV
// position p of request b lives in page page_table[b, p / page_size] at offset
// p % page_size; a "slot" is page * page_size + offset, and one slot holds
// num_kv_heads * head_dim contiguous elements.
#pragma once
#include "dspark/common.h"

namespace dspark {

// Query rows per request in one draft_block_attention call (anchor + drafts) unless the caller
// raises max_block_rows (prefill); the CPU kernel also works in chunks of this many block rows.
constexpr index_t kMaxBlockRows = 16;

struct PagedLayout {
  index_t batch = 0, max_pages = 0;   // page_table is [batch, max_pages]
  index_t page_size = 0, num_pages = 0;
  index_t num_kv_heads = 0, head_dim = 0;
  const int32_t* page_table = nullptr;

  DSPARK_HD index_t capacity() const { return max_pages * page_size; }
  DSPARK_HD index_t slot_elems() const { return num_kv_heads * head_dim; }
  DSPARK_HD int32_t page_id(index_t b, index_t pos) const { return page_table[b * max_pages + pos / page_size]; }
  DSPARK_HD index_t slot(index_t b, index_t pos) const {
    return static_cast<index_t>(page_id(b, pos)) * page_size + pos % page_size;
  }
  DSPARK_HD bool page_ok(int32_t page) const { return page >= 0 && page < num_pages; }
};

struct BlockAttentionProblem {
  PagedLayout kv;
  index_t num_tokens = 0, num_q_heads = 0;      // T, Hq
  const void* q = nullptr;                      // [T, Hq, D], last dim contiguous
  index_t q_stride_t = 0, q_stride_h = 0;
  const void* k_cache = nullptr;                // [num_pages, page_size, Hkv, D] contiguous
  const void* v_cache = nullptr;
  FloatCode dtype = FloatCode::f32;             // q, caches and out share it
  const int32_t* seq_lens = nullptr;            // [B]
  const int32_t* cu_q_lens = nullptr;           // [B + 1]
  bool causal = true;
  float scale = 1.0f;
  index_t max_block_rows = kMaxBlockRows;       // longest block allowed
  void* out = nullptr;                          // [T, Hq, D] contiguous

  DSPARK_HD index_t group() const { return num_q_heads / kv.num_kv_heads; }
  DSPARK_HD index_t block_rows(index_t b) const { return cu_q_lens[b + 1] - cu_q_lens[b]; }
  // Request b's row count, length and row range are usable without reading
  // outside any tensor (the page ids are checked where they are read).
  DSPARK_HD bool request_ok(index_t b) const {
    const index_t start = cu_q_lens[b], n = block_rows(b), len = seq_lens[b];
    return start >= 0 && n >= 0 && n <= max_block_rows && start + n <= num_tokens && len >= n &&
           len <= kv.capacity();
  }
  // Last KV position that block row i of request b may attend to.
  DSPARK_HD index_t last_visible(index_t len, index_t n, index_t i) const { return causal ? len - n + i : len - 1; }
};

struct AppendProblem {
  index_t num_tokens = 0, num_kv_heads = 0, head_dim = 0;
  index_t num_slots = 0;                        // num_pages * page_size
  const void* k = nullptr;                      // [T, Hkv, D], last dim contiguous
  const void* v = nullptr;
  index_t k_stride_t = 0, k_stride_h = 0, v_stride_t = 0, v_stride_h = 0;
  void* k_cache = nullptr;                      // [num_pages, page_size, Hkv, D] contiguous
  void* v_cache = nullptr;
  index_t elem_bytes = 0;
  const int64_t* slot_mapping = nullptr;        // [T], -1 = skip
};

struct RollbackProblem {
  PagedLayout kv;
  index_t num_layers = 0, elem_bytes = 0;
  char* const* k_layers = nullptr;              // num_layers base pointers (host array)
  char* const* v_layers = nullptr;
  index_t max_block = 0;                        // accept_index is [B, max_block] (0: identity)
  const int32_t* accept_index = nullptr;        // null: identity (chain), nothing moves
  const int32_t* block_start = nullptr;         // [B]
  const int32_t* num_accepted = nullptr;        // [B]
  int32_t* seq_lens = nullptr;                  // [B], set to block_start + num_accepted

  DSPARK_HD index_t source(index_t b, index_t i) const {
    return block_start[b] + (accept_index != nullptr ? accept_index[b * max_block + i] : i);
  }
  // Entries to keep, their sources strictly increasing, inside the page table
  // and on valid pages: only then may the kernels touch request b's cache.
  DSPARK_HD bool request_ok(index_t b) const {
    const index_t start = block_start[b], n = num_accepted[b];
    const index_t limit = accept_index != nullptr ? max_block : kv.capacity();
    if (start < 0 || n < 0 || n > limit || start + n > kv.capacity()) return false;
    index_t prev = start - 1;
    for (index_t i = 0; i < n; ++i) {
      const index_t src = source(b, i);
      if (src <= prev || src >= kv.capacity()) return false;
      if (src != start + i && (!kv.page_ok(kv.page_id(b, src)) || !kv.page_ok(kv.page_id(b, start + i))))
        return false;
      prev = src;
    }
    return true;
  }
};

}  // namespace dspark
