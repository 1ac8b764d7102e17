// torch.ops.dspark.schedule_verify_lengths / plan_capacity: schemas, argument
// checks, CPU / CUDA / Meta implementations.
#include "schedule.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"

#if defined(DSPARK_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif
#include "dspark/cpu_isa.h"

DSPARK_DECLARE_ISA_FN(int32_t, schedule_run, (const dspark::ScheduleProblem& P, uint64_t* keys))

namespace dspark {

ScheduleProblem check_schedule_args(const char* op, const at::Tensor& confidence, const at::Tensor& sps_table,
                                    const std::optional<at::Tensor>& capacity,
                                    const std::optional<at::Tensor>& max_len, ScheduleMode mode, at::Tensor* out) {
  const auto device = confidence.device();
  TORCH_CHECK(confidence.dim() == 2, op, ": confidence must be [R, G], got ", confidence.sizes());
  const int64_t R = confidence.size(0), G = confidence.size(1);
  TORCH_CHECK(R * (G + 1) < (int64_t{1} << kScheduleIndexBits), op, ": confidence [R, G] needs R * (G + 1) < 2^",
              kScheduleIndexBits, ", got ", confidence.sizes());
  check_tensor(confidence, "confidence", device, at::kFloat, {R, G});
  TORCH_CHECK(sps_table.dim() == 1 && sps_table.size(0) >= 1, op, ": sps_table must be a non-empty [N] table, got ",
              sps_table.sizes());
  check_tensor(sps_table, "sps_table", device, at::kDouble, {sps_table.size(0)});
  ScheduleProblem P;
  P.requests = R;
  P.steps = G;
  P.confidence = confidence.data_ptr<float>();
  P.sps = sps_table.data_ptr<double>();
  P.sps_len = sps_table.size(0);
  P.mode = mode;
  if (max_len.has_value()) {
    check_tensor(*max_len, "max_len", device, at::kInt, {R});
    P.max_len = max_len->data_ptr<int32_t>();
  }
  if (mode == ScheduleMode::kAsync) {
    TORCH_CHECK(capacity.has_value(), op, ": capacity is required in async mode");
    check_tensor(*capacity, "capacity", device, at::kInt, {1});
    P.capacity = capacity->data_ptr<int32_t>();
  }
  const auto i_opts = confidence.options().dtype(at::kInt);
  if (mode == ScheduleMode::kPlan) {
    *out = at::empty({1}, i_opts);
    P.capacity_out = out->data_ptr<int32_t>();
  } else {
    *out = at::empty({R}, i_opts);
    P.lengths = out->data_ptr<int32_t>();
  }
  return P;
}

namespace {

at::Tensor run(const char* op, const at::Tensor& confidence, const at::Tensor& sps_table,
               const std::optional<at::Tensor>& capacity, const std::optional<at::Tensor>& max_len, ScheduleMode mode) {
  at::Tensor out;
  const ScheduleProblem P = check_schedule_args(op, confidence, sps_table, capacity, max_len, mode, &out);
  if (confidence.is_cpu()) {
    std::vector<uint64_t> keys(static_cast<size_t>(P.requests * P.steps));
    switch (DSPARK_ISA_DISPATCH(schedule_run)(P, keys.data())) {
      case kScheduleBadConfidence: TORCH_CHECK(false, op, ": confidence must lie in [0, 1] (no NaN)");
      case kScheduleBadSps: TORCH_CHECK(false, op, ": sps_table entries must be finite and >= 0");
      case kScheduleBadMaxLen: TORCH_CHECK(false, op, ": max_len entries must lie in [0, G = ", P.steps, "]");
      case kScheduleBadCapacity:
        TORCH_CHECK(false, op, ": capacity = ", P.capacity[0], " is below the number of requests R = ", P.requests,
                    " (every request verifies at least its bonus token)");
      default: break;
    }
    return out;
  }
#if defined(DSPARK_WITH_CUDA)
  TORCH_CHECK(P.requests * P.steps <= kScheduleCudaMaxCandidates, op, ": confidence [R, G] needs R * G <= ",
              kScheduleCudaMaxCandidates, " on CUDA (one CTA ranks all candidates), got ", confidence.sizes());
  const c10::cuda::CUDAGuard guard(confidence.device());  // the tensors' device and its current stream
  // Invalid values cannot raise without a host sync: the output reads -1 (see the python wrapper).
  schedule_cuda_launch(P);
  return out;
#else
  TORCH_CHECK(false, op, ": this build has no CUDA kernels");
#endif
}

at::Tensor schedule_impl(const at::Tensor& confidence, const at::Tensor& sps_table,
                         const std::optional<at::Tensor>& capacity, const std::optional<at::Tensor>& max_len) {
  return run("schedule_verify_lengths", confidence, sps_table, capacity, max_len,
             capacity.has_value() ? ScheduleMode::kAsync : ScheduleMode::kSync);
}

at::Tensor plan_impl(const at::Tensor& confidence, const at::Tensor& sps_table,
                     const std::optional<at::Tensor>& max_len) {
  return run("plan_capacity", confidence, sps_table, std::nullopt, max_len, ScheduleMode::kPlan);
}

at::Tensor schedule_meta(const at::Tensor& confidence, const at::Tensor& sps_table,
                         const std::optional<at::Tensor>& capacity, const std::optional<at::Tensor>& max_len) {
  TORCH_CHECK(confidence.dim() == 2, "schedule_verify_lengths: confidence must be [R, G], got ", confidence.sizes());
  return at::empty({confidence.size(0)}, confidence.options().dtype(at::kInt));
}

at::Tensor plan_meta(const at::Tensor& confidence, const at::Tensor& sps_table,
                     const std::optional<at::Tensor>& max_len) {
  return at::empty({1}, confidence.options().dtype(at::kInt));
}

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def("schedule_verify_lengths(Tensor confidence, Tensor sps_table, Tensor? capacity, Tensor? max_len) -> Tensor");
  m.def("plan_capacity(Tensor confidence, Tensor sps_table, Tensor? max_len) -> Tensor");
}
TORCH_LIBRARY_IMPL(dspark, CPU, m) {
  m.impl("schedule_verify_lengths", &dspark::schedule_impl);
  m.impl("plan_capacity", &dspark::plan_impl);
}
TORCH_LIBRARY_IMPL(dspark, Meta, m) {
  m.impl("schedule_verify_lengths", &dspark::schedule_meta);
  m.impl("plan_capacity", &dspark::plan_meta);
}
#if defined(DSPARK_WITH_CUDA)
TORCH_LIBRARY_IMPL(dspark, CUDA, m) {
  m.impl("schedule_verify_lengths", &dspark::schedule_impl);
  m.impl("plan_capacity", &dspark::plan_impl);
}
#endif
