// CPU kernel of `rms_norm` / `add_rms_norm`: rows [begin, end), each in two
// passes (sum of squares, then scale), the residual sum written in the first.
// Compiled once per ISA (cmake/cpu_isa.cmake); the row math is dspark/rms_norm.h.
#include "dspark/rms_norm.h"

namespace dspark::cpu::DSPARK_ISA {
namespace {

constexpr int kLanes = 8;  // independent double accumulators: the loop vectorises without reassociating

template <typename T>
void norm_rows(const RmsNormProblem& P, index_t begin, index_t end) {
  const index_t n = P.dim;
  const T* w = static_cast<const T*>(P.weight);
  for (index_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(P.x) + row * n;
    if (P.residual != nullptr) {  // the norm reads the rounded sum, as the unfused add-then-norm does
      const T* r = static_cast<const T*>(P.residual) + row * n;
      T* s = static_cast<T*>(P.sum) + row * n;
      for (index_t i = 0; i < n; ++i) s[i] = add_rounded(x[i], r[i]);
      x = s;
    }
    double acc[kLanes] = {};
    index_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const double v = to_float(x[i + l]);
        acc[l] += v * v;
      }
    for (; i < n; ++i) {
      const double v = to_float(x[i]);
      acc[0] += v * v;
    }
    double total = 0.0;
    for (int l = 0; l < kLanes; ++l) total += acc[l];
    const float inverse = rms_inverse(total, n, P.eps);
    T* out = static_cast<T*>(P.out) + row * n;
    for (index_t j = 0; j < n; ++j) out[j] = rms_scaled(x[j], inverse, w[j]);
  }
}

}  // namespace

void rms_norm_rows(const RmsNormProblem& P, index_t begin, index_t end) {
  with_float_type(P.dtype, [&](auto t) { norm_rows<decltype(t)>(P, begin, end); });
}

}  // namespace dspark::cpu::DSPARK_ISA
