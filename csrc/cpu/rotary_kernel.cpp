// CPU kernel of `rotary`: tokens [begin, end), every head of each.
// Compiled once per ISA (cmake/cpu_isa.cmake); the element math is dspark/rotary.h.
#include "dspark/rotary.h"

namespace dspark::cpu::DSPARK_ISA {
namespace {

template <typename T>
void rotate_tokens(const RotaryProblem& P, index_t begin, index_t end) {
  const index_t D = P.head_dim, half = D / 2;
  for (index_t t = begin; t < end; ++t) {
    const T* cos = static_cast<const T*>(P.cos) + t * D;
    const T* sin = static_cast<const T*>(P.sin) + t * D;
    for (index_t h = 0; h < P.heads; ++h) {
      const T* x = static_cast<const T*>(P.x) + t * P.x_stride_t + h * P.x_stride_h;
      T* out = static_cast<T*>(P.out) + (t * P.heads + h) * D;
      for (index_t d = 0; d < D; ++d) out[d] = rotary_element(x, cos, sin, d, half);
    }
  }
}

}  // namespace

void rotary_tokens(const RotaryProblem& P, index_t begin, index_t end) {
  with_float_type(P.dtype, [&](auto t) { rotate_tokens<decltype(t)>(P, begin, end); });
}

}  // namespace dspark::cpu::DSPARK_ISA
