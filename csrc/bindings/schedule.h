// Argument checking shared by the CPU and CUDA implementations of the scheduler ops.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "dspark/schedule.h"

namespace dspark {

// Checks shapes, dtypes and devices (naming the bad argument) and allocates the output.
ScheduleProblem check_schedule_args(const char* op, const at::Tensor& confidence, const at::Tensor& sps_table,
                                    const std::optional<at::Tensor>& capacity,
                                    const std::optional<at::Tensor>& max_len, ScheduleMode mode, at::Tensor* out);

#if defined(DSPARK_WITH_CUDA)
// Largest R * G one CTA ranks.
constexpr int64_t kScheduleCudaMaxCandidates = 4096;
void schedule_cuda_launch(const ScheduleProblem& problem);
#endif

}  // namespace dspark
