// Helpers of the op bindings: argument checks (each failure names the argument)
// and the parallel grain of the CPU row-wise ops.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <initializer_list>

#include "dspark/common.h"

namespace dspark {

// Device, dtype, exact shape and contiguity of a tensor argument.
inline void check_tensor(const at::Tensor& t, const char* name, c10::Device device, at::ScalarType dtype,
                         std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.defined(), name, " is required");
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the op runs on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), name, " must have shape ", c10::IntArrayRef(shape), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// fp32 / bf16 / fp16 tensors are read directly by the kernels.
inline FloatCode float_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatCode::f32;
    case at::kBFloat16: return FloatCode::bf16;
    case at::kHalf: return FloatCode::f16;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// Items of `elems_per_item` elements each thread takes at least: below about 32K elements a parallel region
// costs more than it saves, so a decode step's few rows run inline on the calling thread.
inline int64_t row_op_grain(int64_t elems_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, elems_per_item));
}

}  // namespace dspark
