// torch.ops.dspark.linear / linear_silu_mul: schemas, argument checks, CPU / CUDA / Meta implementations.
//
// The weight arrives packed (python/dspark_ops/linear.py): on CPU as column
// groups [G, K, 32] (dspark/linear_problem.h), on CUDA as plain rows [N, K] for
// cuBLAS. Blocks of more than kLinearMaxRows rows (prefill) go to matmul on CPU.
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "checks.h"

#if defined(DSPARK_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif
#include "dspark/cpu_isa.h"
#include "dspark/linear_problem.h"

DSPARK_DECLARE_ISA_FN(void, linear_groups,
                      (const dspark::LinearProblem& P, dspark::index_t group_begin, dspark::index_t group_end))

namespace dspark {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Output shape [..., out] for x [..., in]; checks x itself.
std::vector<int64_t> output_shape(const char* op, const at::Tensor& x, int64_t out_features) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension ([..., in]), got a scalar");
  TORCH_CHECK(out_features >= 1, op, ": out_features must be >= 1, got ", out_features);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return shape;
}

int64_t leading_rows(const at::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

void check_common(const char* op, const at::Tensor& x, const at::Tensor& w_packed,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                  c10::IntArrayRef out_shape, int64_t out_features) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(w_packed.device() == x.device(), op, ": w_packed is on ", w_packed.device(), " but x is on ",
              x.device());
  TORCH_CHECK(w_packed.scalar_type() == at::kFloat || w_packed.scalar_type() == at::kBFloat16, op,
              ": w_packed must be float32 or bfloat16, got ", w_packed.scalar_type());
  TORCH_CHECK(w_packed.is_contiguous(), op, ": w_packed must be contiguous");
  if (bias.has_value()) check_tensor(*bias, "bias", x.device(), at::kFloat, {out_features});
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.device() == x.device(), op, ": residual is on ", r.device(), " but x is on ", x.device());
    TORCH_CHECK(r.scalar_type() == at::kFloat, op, ": residual must be float32, got ", r.scalar_type());
    TORCH_CHECK(r.sizes().equals(out_shape), op, ": residual must have the output's shape ", out_shape, ", got ",
                r.sizes());
  }
}

// Groups in the CPU layout for `out_features` output columns.
int64_t cpu_groups(int64_t out_features, LinearEpilogue epilogue) {
  return epilogue == LinearEpilogue::silu_mul ? ceil_div(out_features, kLinearGroupCols / 2)
                                              : ceil_div(out_features, kLinearGroupCols);
}

void check_cpu_weight(const char* op, const at::Tensor& x, const at::Tensor& w_packed, int64_t out_features,
                      LinearEpilogue epilogue) {
  const int64_t in = x.size(-1);
  TORCH_CHECK(w_packed.dim() == 3 && w_packed.size(2) == kLinearGroupCols, op,
              ": w_packed must be a weight packed for CPU by dspark_ops.pack_linear_weight ([G, in, ",
              kLinearGroupCols, "]), got shape ", w_packed.sizes(),
              w_packed.dim() == 2 ? " (an unpacked [out, in] weight or one packed for CUDA)" : "");
  const int64_t groups = cpu_groups(out_features, epilogue);
  TORCH_CHECK(w_packed.size(0) == groups, op, ": w_packed has ", w_packed.size(0), " column groups but ",
              out_features, " output features need ", groups,
              epilogue == LinearEpilogue::silu_mul ? " (16 gate + 16 up columns each)" : "");
  TORCH_CHECK(w_packed.size(1) == in, op, ": w_packed has in_features ", w_packed.size(1), " but x has ", in);
}

// y for a block too tall for the kernel: matmul on the packed layout, one
// [M, K] x [K, 32] product per group, then the groups laid side by side.
at::Tensor matmul_on_groups(const at::Tensor& x2, const at::Tensor& w_packed, int64_t out_features,
                            LinearEpilogue epilogue) {
  const at::Tensor w = w_packed.scalar_type() == at::kFloat ? w_packed : w_packed.to(at::kFloat);
  at::Tensor y = at::matmul(x2, w);  // [G, M, 32]
  if (epilogue == LinearEpilogue::silu_mul) {
    constexpr int64_t kHalf = kLinearGroupCols / 2;
    y = at::silu(y.narrow(2, 0, kHalf)) * y.narrow(2, kHalf, kHalf);  // [G, M, 16]
  }
  return y.permute({1, 0, 2}).reshape({x2.size(0), -1}).narrow(1, 0, out_features);
}

at::Tensor linear_cpu_impl(const char* op, const at::Tensor& x, const at::Tensor& w_packed, int64_t out_features,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                           LinearEpilogue epilogue) {
  const std::vector<int64_t> out_shape = output_shape(op, x, out_features);
  check_common(op, x, w_packed, bias, residual, out_shape, out_features);
  check_cpu_weight(op, x, w_packed, out_features, epilogue);
  const int64_t M = leading_rows(x), K = x.size(-1);
  const at::Tensor x2 = x.reshape({M, K}).contiguous();
  if (M > kLinearMaxRows) {
    at::Tensor y = matmul_on_groups(x2, w_packed, out_features, epilogue);
    if (bias.has_value()) y = y + *bias;
    if (residual.has_value()) y = y + residual->reshape({M, out_features});
    return y.contiguous().view(out_shape);
  }
  at::Tensor y = at::empty(out_shape, x.options());
  if (M == 0) return y;
  at::Tensor r2;
  LinearProblem P;
  P.rows = M;
  P.in = K;
  P.out = out_features;
  P.groups = w_packed.size(0);
  P.x = x2.data_ptr<float>();
  P.w = w_packed.data_ptr();
  P.w_dtype = float_code(w_packed, "w_packed");
  if (bias.has_value()) P.bias = bias->data_ptr<float>();
  if (residual.has_value()) {
    r2 = residual->reshape({M, out_features}).contiguous();
    P.residual = r2.data_ptr<float>();
  }
  P.y = y.data_ptr<float>();
  P.epilogue = epilogue;
  auto* groups = DSPARK_ISA_DISPATCH(linear_groups);
  // A thread gets at least ~64K weights (a few microseconds of streaming), so
  // that tiny layers do not pay for waking threads.
  const int64_t weights_per_group = std::max<int64_t>(K, 1) * kLinearGroupCols;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / weights_per_group);
  at::parallel_for(0, P.groups, grain, [&](int64_t begin, int64_t end) { groups(P, begin, end); });
  return y;
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& w_packed, int64_t out_features,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  return linear_cpu_impl("linear", x, w_packed, out_features, bias, residual, LinearEpilogue::bias_residual);
}

at::Tensor linear_silu_mul_cpu(const at::Tensor& x, const at::Tensor& w_packed, int64_t out_features) {
  return linear_cpu_impl("linear_silu_mul", x, w_packed, out_features, std::nullopt, std::nullopt,
                         LinearEpilogue::silu_mul);
}

at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& w_packed, int64_t out_features,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  return at::empty(output_shape("linear", x, out_features), x.options());
}

at::Tensor linear_silu_mul_meta(const at::Tensor& x, const at::Tensor& w_packed, int64_t out_features) {
  return at::empty(output_shape("linear_silu_mul", x, out_features), x.options());
}

#if defined(DSPARK_WITH_CUDA)
// On CUDA the packed weight is plain rows [N, K] (gate rows then up rows for
// silu_mul) and the product is cuBLAS's, in fp32.
int64_t weight_rows(int64_t out_features, LinearEpilogue epilogue) {
  return epilogue == LinearEpilogue::silu_mul ? 2 * out_features : out_features;
}

at::Tensor linear_cuda_impl(const char* op, const at::Tensor& x, const at::Tensor& w_packed, int64_t out_features,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                            LinearEpilogue epilogue) {
  const c10::cuda::CUDAGuard guard(x.device());
  const std::vector<int64_t> out_shape = output_shape(op, x, out_features);
  check_common(op, x, w_packed, bias, residual, out_shape, out_features);
  TORCH_CHECK(w_packed.dim() == 2, op,
              ": w_packed must be a weight packed for CUDA by dspark_ops.pack_linear_weight ([out, in]), got shape ",
              w_packed.sizes(), w_packed.dim() == 3 ? " (packed for CPU: re-pack it on the GPU)" : "");
  TORCH_CHECK(w_packed.size(0) == weight_rows(out_features, epilogue), op, ": w_packed has ", w_packed.size(0),
              " rows but ", out_features, " output features need ", weight_rows(out_features, epilogue));
  TORCH_CHECK(w_packed.size(1) == x.size(-1), op, ": w_packed has in_features ", w_packed.size(1), " but x has ",
              x.size(-1));
  const at::Tensor w = w_packed.scalar_type() == at::kFloat ? w_packed : w_packed.to(at::kFloat);
  at::Tensor y = at::linear(x, w, bias);
  if (epilogue == LinearEpilogue::silu_mul)
    y = at::silu(y.narrow(-1, 0, out_features)) * y.narrow(-1, out_features, out_features);
  if (residual.has_value()) y = y + *residual;
  return y.contiguous();
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& w_packed, int64_t out_features,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  return linear_cuda_impl("linear", x, w_packed, out_features, bias, residual, LinearEpilogue::bias_residual);
}

at::Tensor linear_silu_mul_cuda(const at::Tensor& x, const at::Tensor& w_packed, int64_t out_features) {
  return linear_cuda_impl("linear_silu_mul", x, w_packed, out_features, std::nullopt, std::nullopt,
                          LinearEpilogue::silu_mul);
}
#endif

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def("linear(Tensor x, Tensor w_packed, int out_features, Tensor? bias=None, Tensor? residual=None) -> Tensor");
  m.def("linear_silu_mul(Tensor x, Tensor w_packed, int out_features) -> Tensor");
}
TORCH_LIBRARY_IMPL(dspark, CPU, m) {
  m.impl("linear", &dspark::linear_cpu);
  m.impl("linear_silu_mul", &dspark::linear_silu_mul_cpu);
}
TORCH_LIBRARY_IMPL(dspark, Meta, m) {
  m.impl("linear", &dspark::linear_meta);
  m.impl("linear_silu_mul", &dspark::linear_silu_mul_meta);
}
#if defined(DSPARK_WITH_CUDA)
TORCH_LIBRARY_IMPL(dspark, CUDA, m) {
  m.impl("linear", &dspark::linear_cuda);
  m.impl("linear_silu_mul", &dspark::linear_silu_mul_cuda);
}
#endif
