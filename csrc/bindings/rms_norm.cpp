// torch.ops.dspark.rms_norm / add_rms_norm: schemas, argument checks, CPU /
// CUDA / Meta implementations. One op does what the unfused form does in
// about ten (cast, square, mean, add, rsqrt, two multiplies, the residual add).
#include "rms_norm.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "checks.h"

#if defined(DSPARK_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif
#include "dspark/cpu_isa.h"

DSPARK_DECLARE_ISA_FN(void, rms_norm_rows,
                      (const dspark::RmsNormProblem& P, dspark::index_t begin, dspark::index_t end))

namespace dspark {
namespace {

void check_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension ([..., dim]), got a scalar");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(dim >= 1, op, ": x's last dimension must be >= 1, got ", x.sizes());
  float_code(x, "x");
  check_tensor(weight, "weight", x.device(), x.scalar_type(), {dim});
  if (residual.has_value()) {
    TORCH_CHECK(residual->device() == x.device(), op, ": residual is on ", residual->device(), " but x is on ",
                x.device());
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), op, ": residual must be ", x.scalar_type(),
                " like x, got ", residual->scalar_type());
    TORCH_CHECK(residual->sizes().equals(x.sizes()), op, ": residual must have x's shape ", x.sizes(), ", got ",
                residual->sizes());
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
}

void run(const char* op, const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
         const at::Tensor& weight, double eps, const at::Tensor& out, const at::Tensor& sum) {
  const at::Tensor x = x_in.contiguous();
  RmsNormProblem P;
  P.dim = x.size(-1);
  P.rows = x.numel() / P.dim;
  P.dtype = float_code(x, "x");
  P.eps = static_cast<float>(eps);
  P.x = x.data_ptr();
  P.weight = weight.data_ptr();
  P.out = out.data_ptr();
  at::Tensor residual;
  if (residual_in.has_value()) {
    residual = residual_in->contiguous();
    P.residual = residual.data_ptr();
    P.sum = sum.data_ptr();
  }
  if (x.is_cpu()) {
    const auto rows = DSPARK_ISA_DISPATCH(rms_norm_rows);
    at::parallel_for(0, P.rows, row_op_grain(P.dim), [&](int64_t begin, int64_t end) { rows(P, begin, end); });
    return;
  }
#if defined(DSPARK_WITH_CUDA)
  const c10::cuda::CUDAGuard guard(x.device());
  rms_norm_cuda_launch(P);
#else
  TORCH_CHECK(false, op, ": this build has no CUDA kernels");
#endif
}

at::Tensor rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_args("rms_norm", x, std::nullopt, weight, eps);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  run("rms_norm", x, std::nullopt, weight, eps, out, at::Tensor());
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_impl(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  check_args("add_rms_norm", x, residual, weight, eps);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor sum = at::empty_like(x, at::MemoryFormat::Contiguous);
  run("add_rms_norm", x, residual, weight, eps, out, sum);
  return {out, sum};
}

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_args("rms_norm", x, std::nullopt, weight, eps);
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_meta(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  check_args("add_rms_norm", x, residual, weight, eps);
  return {at::empty_like(x, at::MemoryFormat::Contiguous), at::empty_like(x, at::MemoryFormat::Contiguous)};
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(dspark, CPU, m) {
  m.impl("rms_norm", &dspark::rms_norm_impl);
  m.impl("add_rms_norm", &dspark::add_rms_norm_impl);
}
TORCH_LIBRARY_IMPL(dspark, Meta, m) {
  m.impl("rms_norm", &dspark::rms_norm_meta);
  m.impl("add_rms_norm", &dspark::add_rms_norm_meta);
}
#if defined(DSPARK_WITH_CUDA)
TORCH_LIBRARY_IMPL(dspark, CUDA, m) {
  m.impl("rms_norm", &dspark::rms_norm_impl);
  m.impl("add_rms_norm", &dspark::add_rms_norm_impl);
}
#endif
