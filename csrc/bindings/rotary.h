// The CUDA launch of `rotary` (csrc/cuda/rotary.cu).
#pragma once
#include "dspark/rotary.h"

namespace dspark {

#if defined(DSPARK_WITH_CUDA)
void rotary_cuda_launch(const RotaryProblem& P);
#endif

}  // namespace dspark
