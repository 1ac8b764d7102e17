// Plain-data description of one small-block linear call (torch.ops.dspark.linear /
// linear_silu_mul) for the CPU kernel, and the packed weight layout it reads.
//
// Packed layout ("panels"): the [N, K] weight is cut into P = ceil(N / 16)
// panels of 16 output columns; panel p is stored as [K][16] (for each input
// index k, the 16 weights of columns 16p..16p+15), zero-padded past N. One
// k-step of a panel is one 64-byte line (fp32) or half a line (bf16), so a
// panel streams contiguously while every row of the block reuses it.
// The kernel works on groups of two panels (32 columns); a gate/up weight for
// the SiLU-gate-multiply epilogue interleaves its panels (gate panel q at 2q,
// up panel q at 2q+1) so each group holds matching gate and up columns.
#pragma once
#include "dspark/common.h"

namespace dspark {

constexpr index_t kLinearPanel = 16;    // output columns per packed panel
constexpr index_t kLinearGroup = 2;     // panels per work group (the unit threads split)
constexpr index_t kLinearMaxRows = 16;  // rows the kernel takes; more go to matmul

enum class LinearEpilogue : int32_t {
  bias_residual = 0,  // y = x W^T (+ bias) (+ residual)
  silu_mul = 1,       // y = silu(x Wg^T) * (x Wu^T)
};

struct LinearProblem {
  index_t rows = 0;      // M (1..kLinearMaxRows)
  index_t in = 0;        // K
  index_t out = 0;       // columns of y (N, or I for silu_mul)
  index_t panels = 0;    // P
  const float* x = nullptr;         // [M, K] contiguous
  const void* w = nullptr;          // [P, K, 16] contiguous
  FloatCode w_dtype = FloatCode::f32;  // f32 or bf16
  const float* bias = nullptr;      // [N] or null (bias_residual only)
  const float* residual = nullptr;  // [M, N] contiguous or null (bias_residual only)
  float* y = nullptr;               // [M, out] contiguous
  LinearEpilogue epilogue = LinearEpilogue::bias_residual;

  DSPARK_HD index_t groups() const { return (panels + kLinearGroup - 1) / kLinearGroup; }
};

}  // namespace dspark
