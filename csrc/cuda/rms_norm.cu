// CUDA kernel of `rms_norm` / `add_rms_norm`: one CTA per row. Each thread
// owns the elements i = threadIdx.x (mod kThreads): it writes their residual
// sum, reads them back for the sum of squares (double, cub block sum) and
// scales them, so no other thread's writes are read. Row math: dspark/rms_norm.h.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cub/block/block_reduce.cuh>

#include "../bindings/rms_norm.h"
#include "dspark/rms_norm.h"

namespace dspark {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(RmsNormProblem P) {
  using BlockSum = cub::BlockReduce<double, kThreads>;
  __shared__ typename BlockSum::TempStorage storage;
  __shared__ float inverse_shared;
  const index_t n = P.dim, row = blockIdx.x;
  const T* x = static_cast<const T*>(P.x) + row * n;
  if (P.residual != nullptr) {
    const T* r = static_cast<const T*>(P.residual) + row * n;
    T* s = static_cast<T*>(P.sum) + row * n;
    for (index_t i = threadIdx.x; i < n; i += kThreads) s[i] = add_rounded(x[i], r[i]);
    x = s;
  }
  double acc = 0.0;
  for (index_t i = threadIdx.x; i < n; i += kThreads) {
    const double v = to_float(x[i]);
    acc += v * v;
  }
  const double total = BlockSum(storage).Sum(acc);
  if (threadIdx.x == 0) inverse_shared = rms_inverse(total, n, P.eps);
  __syncthreads();
  const float inverse = inverse_shared;
  const T* w = static_cast<const T*>(P.weight);
  T* out = static_cast<T*>(P.out) + row * n;
  for (index_t i = threadIdx.x; i < n; i += kThreads) out[i] = rms_scaled(x[i], inverse, w[i]);
}

}  // namespace

void rms_norm_cuda_launch(const RmsNormProblem& P) {
  if (P.rows == 0) return;
  TORCH_CHECK(P.rows <= 0x7FFFFFFF, "rms_norm: too many rows for one launch");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_float_type(P.dtype, [&](auto t) {
    rms_norm_kernel<decltype(t)><<<static_cast<unsigned>(P.rows), kThreads, 0, stream>>>(P);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dspark
