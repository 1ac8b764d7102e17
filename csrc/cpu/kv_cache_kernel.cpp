// CPU kernels of `append_kv` (scatter new K/V rows into their slots) and
// `kv_rollback` (compact accepted block entries). Both are byte copies of
// whole slots (or head rows); the binding validates every index first.
#include <cstring>

#include "dspark/paged_kv.h"

namespace dspark::cpu::DSPARK_ISA {

// Tokens [begin, end): copy row t of k / v into slot slot_mapping[t] (skipped when -1).
void append_tokens(const AppendProblem& P, index_t begin, index_t end) {
  const index_t row_bytes = P.head_dim * P.elem_bytes;
  const char* k = static_cast<const char*>(P.k);
  const char* v = static_cast<const char*>(P.v);
  char* kc = static_cast<char*>(P.k_cache);
  char* vc = static_cast<char*>(P.v_cache);
  for (index_t t = begin; t < end; ++t) {
    const index_t slot = P.slot_mapping[t];
    if (slot < 0) continue;
    for (index_t h = 0; h < P.num_kv_heads; ++h) {
      const index_t dst = (slot * P.num_kv_heads + h) * row_bytes;
      std::memcpy(kc + dst, k + (t * P.k_stride_t + h * P.k_stride_h) * P.elem_bytes, row_bytes);
      std::memcpy(vc + dst, v + (t * P.v_stride_t + h * P.v_stride_h) * P.elem_bytes, row_bytes);
    }
  }
}

// Request b in one layer: entry source(b, i) moves to block_start + i, in
// increasing i (sources are strictly increasing, so a source is never
// overwritten before it is read).
void rollback_request_layer(const RollbackProblem& P, index_t b, index_t layer) {
  if (P.accept_index == nullptr) return;
  const index_t slot_bytes = P.kv.slot_elems() * P.elem_bytes;
  char* kc = P.k_layers[layer];
  char* vc = P.v_layers[layer];
  for (index_t i = 0; i < P.num_accepted[b]; ++i) {
    const index_t src = P.source(b, i), dst = P.block_start[b] + i;
    if (src == dst) continue;
    const index_t from = P.kv.slot(b, src) * slot_bytes, to = P.kv.slot(b, dst) * slot_bytes;
    std::memcpy(kc + to, kc + from, slot_bytes);
    std::memcpy(vc + to, vc + from, slot_bytes);
  }
}

}  // namespace dspark::cpu::DSPARK_ISA
