// CUDA kernel of `rotary`: one CTA per token, its threads over (head, element).
// Element math: dspark/rotary.h.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "../bindings/rotary.h"
#include "dspark/rotary.h"

namespace dspark {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) rotary_kernel(RotaryProblem P) {
  const index_t t = blockIdx.x, D = P.head_dim;
  const T* cos = static_cast<const T*>(P.cos) + t * D;
  const T* sin = static_cast<const T*>(P.sin) + t * D;
  for (index_t e = threadIdx.x; e < P.heads * D; e += kThreads) {
    const index_t h = e / D, d = e % D;
    const T* x = static_cast<const T*>(P.x) + t * P.x_stride_t + h * P.x_stride_h;
    static_cast<T*>(P.out)[t * P.heads * D + e] = rotary_element(x, cos, sin, d, D / 2);
  }
}

}  // namespace

void rotary_cuda_launch(const RotaryProblem& P) {
  if (P.tokens == 0 || P.heads == 0) return;
  TORCH_CHECK(P.tokens <= 0x7FFFFFFF, "rotary: too many tokens for one launch");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_float_type(P.dtype, [&](auto t) {
    rotary_kernel<decltype(t)><<<static_cast<unsigned>(P.tokens), kThreads, 0, stream>>>(P);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dspark
