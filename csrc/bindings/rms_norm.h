// The CUDA launch of `rms_norm` / `add_rms_norm` (csrc/cuda/rms_norm.cu).
#pragma once
#include "dspark/rms_norm.h"

namespace dspark {

#if defined(DSPARK_WITH_CUDA)
void rms_norm_cuda_launch(const RmsNormProblem& P);
#endif

}  // namespace dspark
