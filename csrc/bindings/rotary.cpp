// torch.ops.dspark.rotary: schema, argument checks, CPU / CUDA / Meta
// implementations. One op for what the eager form does in about eight
// (two multiplies, the add, the half-swap as a roll, broadcasts).
#include "rotary.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"

#if defined(DSPARK_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif
#include "dspark/cpu_isa.h"

DSPARK_DECLARE_ISA_FN(void, rotary_tokens,
                      (const dspark::RotaryProblem& P, dspark::index_t begin, dspark::index_t end))

namespace dspark {
namespace {

// x [..., H, D] against cos / signed_sin [..., D] with x's leading dimensions.
void check_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() >= 2, "rotary: x must be [..., heads, head_dim], got ", x.sizes());
  const int64_t D = x.size(-1);
  TORCH_CHECK(D >= 2 && D % 2 == 0, "rotary: x's head_dim must be even and >= 2, got ", D);
  float_code(x, "x");
  std::vector<int64_t> want(x.sizes().begin(), x.sizes().end() - 2);
  want.push_back(D);
  for (const auto& [t, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "signed_sin"}}) {
    TORCH_CHECK(t->device() == x.device(), "rotary: ", name, " is on ", t->device(), " but x is on ", x.device());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "rotary: ", name, " must be ", x.scalar_type(), " like x, got ",
                t->scalar_type());
    TORCH_CHECK(t->sizes().equals(want), "rotary: ", name, " must have shape ", c10::IntArrayRef(want),
                " (x's leading dimensions, head_dim), got ", t->sizes());
  }
}

at::Tensor rotary_impl(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  check_args(x_in, cos_in, sin_in);
  const int64_t H = x_in.size(-2), D = x_in.size(-1);
  at::Tensor x = x_in.reshape({-1, H, D});  // a view for the q / k slices of a fused QKV output
  if (x.stride(2) != 1) x = x.contiguous();
  const at::Tensor cos = cos_in.reshape({-1, D}).contiguous(), sin = sin_in.reshape({-1, D}).contiguous();
  at::Tensor out = at::empty(x_in.sizes(), x_in.options());
  RotaryProblem P;
  P.tokens = x.size(0);
  P.heads = H;
  P.head_dim = D;
  P.x_stride_t = x.stride(0);
  P.x_stride_h = x.stride(1);
  P.dtype = float_code(x, "x");
  P.x = x.data_ptr();
  P.cos = cos.data_ptr();
  P.sin = sin.data_ptr();
  P.out = out.data_ptr();
  if (x.is_cpu()) {
    const auto tokens = DSPARK_ISA_DISPATCH(rotary_tokens);
    at::parallel_for(0, P.tokens, row_op_grain(H * D), [&](int64_t begin, int64_t end) { tokens(P, begin, end); });
    return out;
  }
#if defined(DSPARK_WITH_CUDA)
  const c10::cuda::CUDAGuard guard(x.device());
  rotary_cuda_launch(P);
  return out;
#else
  TORCH_CHECK(false, "rotary: this build has no CUDA kernels");
#endif
}

at::Tensor rotary_meta(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_args(x, cos, sin);
  return at::empty(x.sizes(), x.options());
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def("rotary(Tensor x, Tensor cos, Tensor signed_sin) -> Tensor");
}
TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("rotary", &dspark::rotary_impl); }
TORCH_LIBRARY_IMPL(dspark, Meta, m) { m.impl("rotary", &dspark::rotary_meta); }
#if defined(DSPARK_WITH_CUDA)
TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("rotary", &dspark::rotary_impl); }
#endif
