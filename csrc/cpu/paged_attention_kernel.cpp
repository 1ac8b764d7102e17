// CPU kernel of `draft_block_attention`: one work item is (request, kv head),
// and it serves every query row of the request's block for the whole GQA
// group, so each K/V entry is converted to fp32 once per block rather than
// once per query row. The context is walked in tiles of kTile positions with
// an online (flash-style) softmax; nothing of the context is gathered beyond
// the current tile.
//
// Layout inside an item (R = block rows x group, padded to Rp, a multiple of
// kVec): queries are kept transposed, qt[d][r], so that scores come out as
// st[j][r] and every softmax step (max, exp, sums, masks) runs across rows
// in vector lanes. The small matrix products are written as fixed-size lane
// loops that the compiler keeps in registers (one build per ISA).
#include <cmath>
#include <cstring>

#include "dspark/convert.h"
#include "dspark/paged_kv.h"
#include "dspark/paged_kv_cpu.h"

namespace dspark::cpu::DSPARK_ISA {
namespace {

constexpr index_t kVec = kPagedCpuVec;
constexpr index_t kTile = kPagedCpuTile;

// One rounding where the ISA has FMA; attention is compared with tolerances,
// so the generic build may round twice.
inline float madd(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// st[j0 + p][r0 + r] = sum_d kf[j0 + p][d] * qt[d][r0 + r] for a kP x kR block.
template <int kP, int kR>
void score_block(const float* kf, const float* qt, index_t D, index_t Rp, float* st) {
  float acc[kP][kR] = {};
  for (index_t d = 0; d < D; ++d) {
    const float* qrow = qt + d * Rp;
    for (int p = 0; p < kP; ++p) {
      const float k = kf[p * D + d];
      for (int r = 0; r < kR; ++r) acc[p][r] = madd(k, qrow[r], acc[p][r]);
    }
  }
  for (int p = 0; p < kP; ++p)
    for (int r = 0; r < kR; ++r) st[p * Rp + r] = acc[p][r];
}

// All kTile x Rp scores in 4-position x 32-row blocks (Rp is a multiple of 32).
void scores(const float* kf, const float* qt, index_t D, index_t Rp, float* st) {
  for (index_t j = 0; j < kTile; j += 4)
    for (index_t r = 0; r < Rp; r += 32) score_block<4, 32>(kf + j * D, qt + r, D, Rp, st + j * Rp + r);
}

// o[r0 + r][d0 + c] = o * corr[r] + sum_{j < tn} st[j][r0 + r] * vf[j][d0 + c] for kRows x kC.
template <int kRows, int kC>
void accumulate_block(const float* st, const float* vf, const float* corr, index_t tn, index_t D, index_t Rp,
                      float* o) {
  float acc[kRows][kC];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kC; ++c) acc[r][c] = o[r * D + c] * corr[r];
  for (index_t j = 0; j < tn; ++j) {
    const float* vrow = vf + j * D;
    for (int r = 0; r < kRows; ++r) {
      const float p = st[j * Rp + r];
      for (int c = 0; c < kC; ++c) acc[r][c] = madd(p, vrow[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kC; ++c) o[r * D + c] = acc[r][c];
}

// o[r][d] = o * corr[r] + sum_{j < tn} st[j][r] * vf[j][d] for rows r < rows (a multiple of kRows).
template <int kRows, int kC>
void accumulate(const float* st, const float* vf, const float* corr, index_t tn, index_t D, index_t Rp, index_t rows,
                float* o) {
  for (index_t r = 0; r < rows; r += kRows)
    for (index_t d = 0; d < D; d += kC)
      accumulate_block<kRows, kC>(st + r, vf + d, corr + r, tn, D, Rp, o + r * D + d);
}

// Online-softmax step for one tile: st holds scores on entry (masked ones
// -inf) and probabilities exp(s - m_new) on exit; m, l and corr per row.
void softmax_step(float* st, index_t Rp, float* m, float* l, float* corr) {
  for (index_t r0 = 0; r0 < Rp; r0 += kVec) {
    float mx[kVec], safe[kVec], sum[kVec];
    for (int r = 0; r < kVec; ++r) mx[r] = m[r0 + r];
    for (index_t j = 0; j < kTile; ++j)
      for (int r = 0; r < kVec; ++r) mx[r] = st[j * Rp + r0 + r] > mx[r] ? st[j * Rp + r0 + r] : mx[r];
    // A row that has seen nothing yet keeps max -inf: exp(-inf - 0) = 0 keeps it empty.
    for (int r = 0; r < kVec; ++r) {
      safe[r] = mx[r] == -INFINITY ? 0.0f : mx[r];
      corr[r0 + r] = exp_nonpositive(m[r0 + r] - safe[r]);
      m[r0 + r] = mx[r];
      sum[r] = 0.0f;
    }
    for (index_t j = 0; j < kTile; ++j)
      for (int r = 0; r < kVec; ++r) {
        const float p = exp_nonpositive(st[j * Rp + r0 + r] - safe[r]);
        st[j * Rp + r0 + r] = p;
        sum[r] += p;
      }
    for (int r = 0; r < kVec; ++r) l[r0 + r] = madd(l[r0 + r], corr[r0 + r], sum[r]);
  }
}

template <typename T>
void load_rows(const T* src, index_t D, float* dst) {
  for (index_t d = 0; d < D; ++d) dst[d] = to_float(src[d]);
}

template <typename T>
void attention_item(const BlockAttentionProblem& P, index_t b, index_t h, index_t chunk, index_t split,
                    float* scratch, float* partial) {
  const PagedLayout& kv = P.kv;
  const PagedCpuChunk C = paged_cpu_chunk(P, b, chunk);
  const index_t n = P.block_rows(b), G = P.group(), D = kv.head_dim, R = C.rows * G, Rp = paged_cpu_rows_padded(R);
  const index_t len = P.seq_lens[b], row0 = P.cu_q_lens[b] + C.first_row;
  const PagedCpuScratch S(scratch, G, D);
  const index_t begin = split * kPagedCpuSplitLen;
  const index_t end = begin + kPagedCpuSplitLen < C.visible_end ? begin + kPagedCpuSplitLen : C.visible_end;

  // Queries, pre-scaled and transposed; padding rows stay 0 and behave like
  // the chunk's last row (they are never written out).
  const T* q = static_cast<const T*>(P.q);
  for (index_t r = 0; r < Rp; ++r) {
    const index_t i = r < R ? r / G : C.rows - 1;  // block row within the chunk
    const T* qrow = q + (row0 + i) * P.q_stride_t + (h * G + r % G) * P.q_stride_h;
    for (index_t d = 0; d < D; ++d) S.qt[d * Rp + r] = r < R ? to_float(qrow[d]) * P.scale : 0.0f;
    S.row_block_index[r] = static_cast<float>(C.first_row + i);
    S.m[r] = -INFINITY;
    S.l[r] = 0.0f;
  }
  std::memset(S.o, 0, sizeof(float) * Rp * D);

  const T* kc = static_cast<const T*>(P.k_cache);
  const T* vc = static_cast<const T*>(P.v_cache);
  // Positions >= first_masked are hidden from some row (or lie past this split).
  const index_t first_causal = len - n + C.first_row + 1;
  const index_t first_masked = P.causal && first_causal < end ? first_causal : end;
  for (index_t p0 = begin; p0 < end; p0 += kTile) {
    const index_t tn = end - p0 < kTile ? end - p0 : kTile;
    for (index_t j = 0; j < tn; ++j) {
      const index_t off = (kv.slot(b, p0 + j) * kv.num_kv_heads + h) * D;
      load_rows(kc + off, D, S.kf + j * D);
      load_rows(vc + off, D, S.vf + j * D);
    }
    if (tn < kTile) {  // zero rows: 0 * garbage could be NaN
      std::memset(S.kf + tn * D, 0, sizeof(float) * (kTile - tn) * D);
      std::memset(S.vf + tn * D, 0, sizeof(float) * (kTile - tn) * D);
    }
    // The next tile's rows are scattered (pages, heads interleaved): request them now so they
    // arrive while this tile is computed.
    for (index_t pos = p0 + kTile; pos < p0 + 2 * kTile && pos < end; ++pos) {
      const index_t off = (kv.slot(b, pos) * kv.num_kv_heads + h) * D;
      for (index_t byte = 0; byte < D * static_cast<index_t>(sizeof(T)); byte += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(kc + off) + byte);
        __builtin_prefetch(reinterpret_cast<const char*>(vc + off) + byte);
      }
    }
    scores(S.kf, S.qt, D, Rp, S.st);

    if (p0 + kTile > first_masked) {
      for (index_t j = 0; j < kTile; ++j) {
        const index_t pos = p0 + j;
        // Row r sees pos iff pos < end and (causal) pos - (len - n) <= its block index.
        const float rel = pos < end ? static_cast<float>(P.causal ? pos - (len - n) : -1) : INFINITY;
        float* srow = S.st + j * Rp;
        for (index_t r = 0; r < Rp; ++r) srow[r] = rel <= S.row_block_index[r] ? srow[r] : -INFINITY;
      }
    }
    softmax_step(S.st, Rp, S.m, S.l, S.corr);
    // Padding rows are never written out: only the real ones (rounded up to 4) accumulate.
    const index_t rows = (R + 3) / 4 * 4;
    if (D % 32 == 0)
      accumulate<4, 32>(S.st, S.vf, S.corr, tn, D, Rp, rows, S.o);
    else
      accumulate<2, 16>(S.st, S.vf, S.corr, tn, D, Rp, rows, S.o);  // 4 x 16 blocks vectorise badly too
  }

  if (partial != nullptr) {  // one split of several: keep the unnormalised state for the combine step
    const PagedCpuPartial out(partial, R, D);
    std::memcpy(out.o, S.o, sizeof(float) * R * D);
    std::memcpy(out.m, S.m, sizeof(float) * R);
    std::memcpy(out.l, S.l, sizeof(float) * R);
    return;
  }
  T* out = static_cast<T*>(P.out);
  for (index_t r = 0; r < R; ++r) {
    const float inv = 1.0f / S.l[r];
    T* orow = out + ((row0 + r / G) * P.num_q_heads + h * G + r % G) * D;
    for (index_t d = 0; d < D; ++d) store_float(orow + d, S.o[r * D + d] * inv);
  }
}

// out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s over the splits' states.
template <typename T>
void combine_item(const BlockAttentionProblem& P, index_t b, index_t h, index_t chunk, float* partials) {
  const PagedCpuChunk C = paged_cpu_chunk(P, b, chunk);
  const index_t G = P.group(), D = P.kv.head_dim, R = C.rows * G;
  const index_t splits = C.splits, stride = PagedCpuPartial::floats(R, D), row0 = P.cu_q_lens[b] + C.first_row;
  T* out = static_cast<T*>(P.out);
  for (index_t r = 0; r < R; ++r) {
    float mx = -INFINITY;
    for (index_t s = 0; s < splits; ++s) {
      const float m = PagedCpuPartial(partials + s * stride, R, D).m[r];
      mx = m > mx ? m : mx;
    }
    float acc[kPagedCpuMaxHeadDim] = {};
    float total = 0.0f;
    for (index_t s = 0; s < splits; ++s) {
      const PagedCpuPartial part(partials + s * stride, R, D);
      if (part.m[r] == -INFINITY) continue;  // the split saw nothing of this row
      const float w = exp_nonpositive(part.m[r] - mx);
      total = madd(w, part.l[r], total);
      for (index_t d = 0; d < D; ++d) acc[d] = madd(w, part.o[r * D + d], acc[d]);
    }
    const float inv = 1.0f / total;
    T* orow = out + ((row0 + r / G) * P.num_q_heads + h * G + r % G) * D;
    for (index_t d = 0; d < D; ++d) store_float(orow + d, acc[d] * inv);
  }
}

}  // namespace

// Work item (request b, kv head h, row chunk `chunk`, KV split `split`); `scratch` holds
// PagedCpuScratch::floats floats. A chunk with several splits (PagedCpuChunk::splits) leaves each
// split's state in `partial` (PagedCpuPartial) and block_attention_combine writes its rows;
// otherwise partial is null and the item writes them.
void block_attention_item(const BlockAttentionProblem& P, index_t b, index_t h, index_t chunk, index_t split,
                          float* scratch, float* partial) {
  with_float_type(P.dtype, [&](auto t) { attention_item<decltype(t)>(P, b, h, chunk, split, scratch, partial); });
}

// Output rows of (request b, kv head h, row chunk `chunk`) from its splits' consecutive states.
void block_attention_combine(const BlockAttentionProblem& P, index_t b, index_t h, index_t chunk, float* partials) {
  with_float_type(P.dtype, [&](auto t) { combine_item<decltype(t)>(P, b, h, chunk, partials); });
}

}  // namespace dspark::cpu::DSPARK_ISA
