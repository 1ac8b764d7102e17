// Plain-data description of one small-block linear call (torch.ops.dspark.linear /
// linear_silu_mul) for the CPU kernel, and the packed weight layout it reads.
//
// Packed layout ("groups"): the [N, K] weight is cut into G = ceil(N / 32)
// groups of 32 output columns, each stored as [K][32] (for each input index
// k, the 32 weights of columns 32g..32g+31), zero-padded past N. A thread's
// share of the weight is then one contiguous stream that every row of the
// block reuses while it is in L1; one k-step is two 64-byte lines (fp32) or
// one (bf16). A gate/up weight for the SiLU-gate-multiply epilogue puts 16
// gate columns then the 16 matching up columns in each group:
// G = ceil(I / 16), group q = [gate 16q..16q+15 | up 16q..16q+15].
#pragma once
#include "dspark/common.h"

namespace dspark {

constexpr index_t kLinearGroupCols = 32;  // columns per packed group (the unit threads split)
constexpr index_t kLinearMaxRows = 64;    // rows the kernel takes; more go to matmul

enum class LinearEpilogue : int32_t {
  bias_residual = 0,  // y = x W^T (+ bias) (+ residual)
  silu_mul = 1,       // y = silu(x Wg^T) * (x Wu^T)
};

struct LinearProblem {
  index_t rows = 0;      // M (1..kLinearMaxRows)
  index_t in = 0;        // K
  index_t out = 0;       // columns of y (N, or I for silu_mul)
  index_t groups = 0;    // G
  const float* x = nullptr;         // [M, K] contiguous
  const void* w = nullptr;          // [G, K, 32] contiguous
  FloatCode w_dtype = FloatCode::f32;  // f32 or bf16
  const float* bias = nullptr;      // [N] or null (bias_residual only)
  const float* residual = nullptr;  // [M, N] contiguous or null (bias_residual only)
  float* y = nullptr;               // [M, out] contiguous
  LinearEpilogue epilogue = LinearEpilogue::bias_residual;
};

}  // namespace dspark
