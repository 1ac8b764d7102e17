// CPU kernel of `verify`: one request row at a time, positions in order, and
// only as far as the chain goes (a rejected draft ends the row: later
// positions are never read). Compiled once per ISA (cmake/cpu_isa.cmake);
// the inner loops are written in 16-lane blocks so the compiler vectorises
// them without reassociating floating-point sums.
#include <cmath>
#include <cstring>

#include "dspark/filters.h"
#include "dspark/verify_problem.h"
#include "row_ops.h"

namespace dspark::cpu::DSPARK_ISA {
namespace {

// Fixed-point mass of the tokens with bits(e) >= floor_bits.
uint64_t kept_mass(const float* e, index_t n, uint32_t floor_bits) {
  return mass_total(n, [&](index_t v) -> uint64_t { return float_bits(e[v]) >= floor_bits ? mass_of(e[v]) : 0; });
}

// Exact radix select (filters.h): the largest threshold t >= floor_bits such
// that the candidates with bits(e) >= t hold at least `want` (count or mass).
// After the first level only the chosen bin matters: it is copied to `buf`
// (a few percent of V) so the finer levels do not rescan the vocabulary.
template <bool kByMass>
uint32_t radix_select(const float* e, index_t n, uint32_t floor_bits, uint64_t want, float* buf) {
  uint64_t hist[kRadixBins];
  uint32_t prefix = 0;
  const float* cand = e;
  index_t count = n;
  for (int level = 0; level < kRadixLevels; ++level) {
    std::memset(hist, 0, sizeof(hist));
    for (index_t i = 0; i < count; ++i) {
      const uint32_t bits = float_bits(cand[i]);
      if (radix_candidate(bits, level, prefix, floor_bits))
        hist[radix_bin(bits, level)] += kByMass ? mass_of(cand[i]) : 1;
    }
    const int bin = radix_walk(hist, &want);
    if (bin < 0) return floor_bits;  // fewer than `want`: the filter keeps everything
    prefix = radix_extend(prefix, level, bin);
    if (level == 0) {
      index_t kept = 0;
      for (index_t i = 0; i < n; ++i)
        if (radix_candidate(float_bits(e[i]), 1, prefix, floor_bits)) buf[kept++] = e[i];
      cand = buf;
      count = kept;
    }
  }
  return prefix > floor_bits ? prefix : floor_bits;
}

// The kept set {v : bits(e_v) >= threshold} after top-k, top-p, min-p.
uint32_t filter_threshold(const float* e, index_t n, uint64_t z_all, const SamplingParams& sp, float* buf) {
  uint32_t t = 0;
  uint64_t z = z_all;
  if (sp.top_k > 0 && sp.top_k < n) {
    t = radix_select<false>(e, n, 0, static_cast<uint64_t>(sp.top_k), buf);
    z = kept_mass(e, n, t);
  }
  if (sp.top_p < 1.0f) t = radix_select<true>(e, n, t, top_p_target(sp.top_p, z), buf);
  const uint32_t min_p_bits = min_p_floor_bits(sp.min_p);
  return t > min_p_bits ? t : min_p_bits;
}

template <typename L, typename Q>
void verify_row(const VerifyProblem& P, const int32_t* draft_ids, index_t b, float* e) {
  const index_t V = P.vocab, K = P.num_draft_max;
  int32_t* out = P.tokens + b * (K + 1);
  for (index_t j = 0; j <= K; ++j) out[j] = -1;
  P.num_accepted[b] = -1;
  auto fail = [&](RowError err) { P.row_error[b] = err; };

  const SamplingParams sp = P.params(b);
  const RowError bad_row = P.row_check(b, sp);
  if (bad_row != kRowOk) return fail(bad_row);
  const index_t l = P.num_draft[b];
  const int32_t* drafts = P.draft_tokens + b * K;
  const bool greedy = sp.temperature == 0.0f;
  const bool one_hot = P.draft_probs == nullptr;

  for (index_t j = 0; j <= l; ++j) {
    const L* x = static_cast<const L*>(P.logits) + b * P.logits_stride_b + j * P.logits_stride_k;
    const RowMax rm = row_max(x, V);
    if (rm.error() != kRowOk) return fail(rm.error());
    const bool is_draft = j < l;
    const index_t xj = is_draft ? drafts[j] : 0;

    if (greedy) {
      const index_t best = rm.argmax;
      if (is_draft && xj == best) { out[j] = static_cast<int32_t>(xj); continue; }
      out[j] = static_cast<int32_t>(best);
      P.num_accepted[b] = static_cast<int32_t>(j);
      P.row_error[b] = kRowOk;
      return;
    }

    const uint64_t z_all = softmax_numerators(x, V, rm.max, 1.0f / sp.temperature, e);
    const uint32_t t = filter_threshold(e, V, z_all, sp, e + V);
    const uint64_t z = t == 0 ? z_all : kept_mass(e, V, t);
    auto p_mass = [&](index_t v) -> uint64_t { return float_bits(e[v]) >= t ? mass_of(e[v]) : 0; };

    index_t token;
    if (is_draft) {
      const Q* q_row = one_hot ? nullptr : P.draft_row<Q>(b, j);
      const float q = one_hot ? 1.0f : P.draft_prob(q_row, xj);
      if (!(q > 0.0f)) return fail(kRowZeroDraftProb);
      const float u = uniform_open01(random_words(sp.seed, sp.stream, sp.offset, j, Purpose::kVerifyAccept).v[0]);
      if (accept_draft(u, q, p_mass(xj), z)) { out[j] = static_cast<int32_t>(xj); continue; }
      // Rejected: draw from normalize(max(0, p - q)).
      auto resample = [&](auto q_at) -> index_t {
        auto residual = [&](index_t v) -> uint64_t {
          const uint64_t qm = one_hot ? (v == xj ? z : 0) : draft_mass(q_at(v), z);
          return residual_mass(p_mass(v), qm);
        };
        const uint64_t r_total = mass_total(V, residual);
        const uint64_t bits = random_u64(random_words(sp.seed, sp.stream, sp.offset, j, Purpose::kVerifySample));
        // r_total == 0 only through rounding (p(x) < q(x) implies some p_v > q_v): fall back to p.
        return r_total > 0 ? draw(V, r_total, bits, residual) : draw(V, z, bits, p_mass);
      };
      if (P.draft_index == nullptr) {
        token = resample([&](index_t v) { return to_float(q_row[v]); });
      } else {
        // q over a draft vocabulary: written out over the V ids into the scratch's second half (free after
        // the filters) by column, so the two passes read it contiguously as they read a dense q. The binding
        // checked that draft_index is one-to-one, so this is q(v) = draft_prob(q_row, v) for every v.
        float* q_dense = e + V;
        std::memset(q_dense, 0, static_cast<size_t>(V) * sizeof(float));
        for (index_t c = 0; c < P.draft_cols; ++c)
          if (draft_ids[c] >= 0) q_dense[draft_ids[c]] = to_float(q_row[c]);
        token = resample([&](index_t v) { return q_dense[v]; });
      }
    } else {
      const uint64_t bits = random_u64(random_words(sp.seed, sp.stream, sp.offset, j, Purpose::kVerifySample));
      token = draw(V, z, bits, p_mass);
    }
    out[j] = static_cast<int32_t>(token);
    P.num_accepted[b] = static_cast<int32_t>(j);
    P.row_error[b] = kRowOk;
    return;
  }
}

template <typename L>
void verify_rows_typed(const VerifyProblem& P, const int32_t* draft_ids, index_t begin, index_t end,
                       float* scratch) {
  for (index_t b = begin; b < end; ++b) {
    with_float_type(P.draft_probs_dtype, [&](auto q) { verify_row<L, decltype(q)>(P, draft_ids, b, scratch); });
  }
}

}  // namespace

// Rows [begin, end); `scratch` holds 2 V floats; `draft_ids` [Vd]: the target id of each column of
// draft_probs (-1: none), the inverse of a checked draft_index (null without one).
void verify_rows(const VerifyProblem& P, const int32_t* draft_ids, index_t begin, index_t end, float* scratch) {
  with_float_type(P.logits_dtype,
                  [&](auto l) { verify_rows_typed<decltype(l)>(P, draft_ids, begin, end, scratch); });
}

}  // namespace dspark::cpu::DSPARK_ISA
