// float -> bf16 / fp16 storage with round-to-nearest-even, by bit manipulation,
// so the CPU and CUDA kernels store identical bits (the inverse of to_float in
// math.h).
#pragma once
#include "dspark/math.h"

namespace dspark {

DSPARK_HD bf16_bits to_bf16(float x) {
  const uint32_t f = float_bits(x);
  if ((f & 0x7FFFFFFFu) > 0x7F800000u) return bf16_bits{static_cast<uint16_t>((f >> 16) | 0x40u)};  // quiet NaN
  return bf16_bits{static_cast<uint16_t>((f + 0x7FFFu + ((f >> 16) & 1u)) >> 16)};
}

DSPARK_HD fp16_bits to_fp16(float x) {
  uint32_t f = float_bits(x);
  const uint32_t sign = (f >> 16) & 0x8000u;
  f &= 0x7FFFFFFFu;
  uint32_t h;
  if (f >= 0x47800000u) {         // |x| >= 65536 is inf; NaN stays NaN (65520 <= |x| < 65536 rounds up below)
    h = f > 0x7F800000u ? 0x7E00u : 0x7C00u;
  } else if (f < 0x38800000u) {   // below the smallest normal half: let the FPU round into the subnormal grid
    const float shifted = bits_float(f) + 0.5f;  // 0.5 = 2^-1: the half subnormal step 2^-24 becomes 1 ulp
    h = float_bits(shifted) - 0x3F000000u;
  } else {                        // normal: rebias the exponent, round the 13 dropped mantissa bits to even
    const uint32_t odd = (f >> 13) & 1u;
    h = (f + 0xC8000FFFu + odd) >> 13;  // 0xC8000000 = (15 - 127) << 23 (mod 2^32)
  }
  return fp16_bits{static_cast<uint16_t>(h | sign)};
}

DSPARK_HD void store_float(float* p, float x) { *p = x; }
DSPARK_HD void store_float(bf16_bits* p, float x) { *p = to_bf16(x); }
DSPARK_HD void store_float(fp16_bits* p, float x) { *p = to_fp16(x); }

}  // namespace dspark
