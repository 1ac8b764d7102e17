// Elementwise math shared by CPU and CUDA kernels, written so that both compute
// bit-identical results: every multiply-add is an explicit fmaf (no contraction
// ambiguity), no library exp/log whose last bit differs between libm and CUDA.
#pragma once
#include <cmath>
#include "dspark/common.h"

namespace dspark {

DSPARK_HD uint32_t float_bits(float x) {
  union { float f; uint32_t u; } c{x};
  return c.u;
}
DSPARK_HD float bits_float(uint32_t u) {
  union { uint32_t u; float f; } c{u};
  return c.f;
}

// exp(x) for x <= 0 (softmax numerators after subtracting the max); relative
// error about 2 ulp; exactly 1 at x = 0; 0 below -87 (flushed: such masses
// are below the fixed-point resolution anyway). Branch-free so it vectorises.
DSPARK_HD float exp_nonpositive(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;       // exact in float
  const float kLn2Lo = 1.428606765330187045e-06f; // ln 2 - kLn2Hi
  const float xc = x < -87.0f ? -87.0f : x;
  const float n = rintf(xc * kLog2e);
  float r = fmaf(-n, kLn2Hi, xc);
  r = fmaf(-n, kLn2Lo, r);
  // Taylor polynomial of e^r on |r| <= ln2/2, Horner form with explicit FMAs.
  float p = 1.0f / 5040.0f;
  p = fmaf(p, r, 1.0f / 720.0f);
  p = fmaf(p, r, 1.0f / 120.0f);
  p = fmaf(p, r, 1.0f / 24.0f);
  p = fmaf(p, r, 1.0f / 6.0f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  const float scale = bits_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  const float y = p * scale;
  return x < -87.0f ? 0.0f : y;
}

// Logistic sigmoid from exp_nonpositive (never exponentiates a positive number,
// so it cannot overflow): sigmoid(x) = 1 / (1 + e^-x) for x >= 0, and
// e^x / (1 + e^x) for x < 0.
DSPARK_HD float sigmoid(float x) {
  const float e = exp_nonpositive(x >= 0.0f ? -x : x);
  return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

// x * sigmoid(x) (the SwiGLU gate).
DSPARK_HD float silu(float x) { return x * sigmoid(x); }

// Probability masses are summed in 40-bit fixed point: integer sums are exact,
// so totals and cumulative sums do not depend on summation order, thread count
// or device. A mass below 2^-40 (relative to the row max) counts as zero.
constexpr double kMassScale = 1099511627776.0;  // 2^40
DSPARK_HD uint64_t mass_of(float e) {  // e in [0, 1]
  return static_cast<uint64_t>(e * 1099511627776.0f);
}

// bf16 / fp16 storage read as float by bit manipulation (same on host and device).
struct bf16_bits { uint16_t x; };
struct fp16_bits { uint16_t x; };

// Calls f(T{}) with T the storage type `code` names (float, bf16_bits or fp16_bits): the one place that
// turns a runtime dtype into a template argument, for the CPU and CUDA kernels alike.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename F>
DSPARK_HD void with_float_type(FloatCode code, F&& f) {
  switch (code) {
    case FloatCode::f32: f(float{}); break;
    case FloatCode::bf16: f(bf16_bits{}); break;
    case FloatCode::f16: f(fp16_bits{}); break;
  }
}

DSPARK_HD float to_float(float v) { return v; }
DSPARK_HD float to_float(bf16_bits v) { return bits_float(static_cast<uint32_t>(v.x) << 16); }
DSPARK_HD float to_float(fp16_bits v) {
  // Shift exponent+mantissa into float position and rescale by 2^112: exact for
  // normal and subnormal halves, branch-free so loops vectorise.
  const uint32_t h = v.x;
  const uint32_t t = (h & 0x7FFFu) << 13;
  const float mag = (h & 0x7C00u) == 0x7C00u ? bits_float(t | 0x7F800000u)
                                             : bits_float(t) * 5.192296858534828e33f;  // 2^112
  return bits_float(float_bits(mag) | ((h & 0x8000u) << 16));
}

}  // namespace dspark
