// RMSNorm (optionally after a residual add) of one row, shared by the CPU and
// CUDA kernels of `rms_norm` / `add_rms_norm`.
//
// Rounding follows the Llama / Qwen form in Hugging Face transformers: the
// row is normalised in fp32, cast to the storage type, then multiplied by the
// weight in the storage type. The one change is the sum of squares, taken in
// double: each square of a float is exact there and the sum's own rounding
// error (about dim * 2^-53 relative) is far below a float ulp, so the mean
// rounds to the same float whatever order the CPU lanes or CUDA threads add
// in, unless it falls that close to a rounding boundary (about one row in a
// million). So the kernels agree with each other and with the reference
// (dspark_ops.reference.rms_norm), and fp32 torch, which sums in float,
// differs from them by at most about an ulp of the mean.
#pragma once
#include <cmath>

#include "dspark/convert.h"
#include "dspark/math.h"

namespace dspark {

struct RmsNormProblem {
  index_t rows = 0, dim = 0;
  FloatCode dtype = FloatCode::f32;  // x, residual, weight, out and sum share it
  float eps = 0.0f;
  const void* x = nullptr;        // [rows, dim]
  const void* residual = nullptr; // [rows, dim] or null (plain rms_norm)
  const void* weight = nullptr;   // [dim]
  void* out = nullptr;            // [rows, dim]: the normalised row times the weight
  void* sum = nullptr;            // [rows, dim]: x + residual in the storage type (null without residual)
};

// x + residual rounded to the storage type (torch's add: computed in float, rounded once).
template <typename T>
DSPARK_HD T add_rounded(T x, T r) {
  T s;
  store_float(&s, to_float(x) + to_float(r));
  return s;
}

// 1 / sqrt(mean(x^2) + eps) from the row's sum of squares: the mean and the
// float add as torch rounds them, then the square root and division in double,
// rounded once (torch's vectorised float sqrt / rsqrt are not correctly
// rounded, so no float formula here could match it on every row anyway).
DSPARK_HD float rms_inverse(double sum_squares, index_t dim, float eps) {
  const float mean = static_cast<float>(sum_squares / static_cast<double>(dim));
  return static_cast<float>(1.0 / sqrt(static_cast<double>(mean + eps)));
}

// One output element: weight * T(x * inverse), each product rounded as torch rounds it.
template <typename T>
DSPARK_HD T rms_scaled(T x, float inverse, T weight) {
  T normed, out;
  store_float(&normed, to_float(x) * inverse);
  store_float(&out, to_float(weight) * to_float(normed));
  return out;
}

}  // namespace dspark
