// Rotate-half rotary embedding of one head row, shared by the CPU and CUDA
// kernels of `rotary`: out = x cos + [x2, x1] signed_sin, with signed_sin the
// sin whose first half is negated (dspark_ops.models.layers.rope_cos_sin).
// That is x cos + [-x2, x1] sin term for term, negation being exact, and each
// product is rounded before the add (no FMA), so the result equals the
// Hugging Face formula bit for bit.
#pragma once
#include "dspark/convert.h"
#include "dspark/math.h"

namespace dspark {

struct RotaryProblem {
  index_t tokens = 0, heads = 0, head_dim = 0;  // x [tokens, heads, head_dim]
  index_t x_stride_t = 0, x_stride_h = 0;       // elements; the last dimension is contiguous
  FloatCode dtype = FloatCode::f32;             // x, cos, sin and out share it
  const void* x = nullptr;
  const void* cos = nullptr;  // [tokens, head_dim], contiguous
  const void* sin = nullptr;  // [tokens, head_dim], signed as above
  void* out = nullptr;        // [tokens, heads, head_dim], contiguous
};

// Element d of a rotated row: the two products rounded to the storage type as
// torch's elementwise ops round them, then their sum.
template <typename T>
DSPARK_HD T rotary_element(const T* x, const T* cos, const T* sin, index_t d, index_t half) {
  const index_t partner = d < half ? d + half : d - half;
#if defined(__CUDA_ARCH__)
  const float a = __fmul_rn(to_float(x[d]), to_float(cos[d]));
  const float b = __fmul_rn(to_float(x[partner]), to_float(sin[d]));
#else
  const float a = to_float(x[d]) * to_float(cos[d]);  // the CPU objects build with -ffp-contract=off
  const float b = to_float(x[partner]) * to_float(sin[d]);
#endif
  T ar, br, out;
  store_float(&ar, a);
  store_float(&br, b);
  store_float(&out, to_float(ar) + to_float(br));
  return out;
}

}  // namespace dspark
