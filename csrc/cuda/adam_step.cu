// onecycle_fused::adam_step_ on CUDA: torch.optim.Adam / AdamW's update
// (update.h; AdamW when the group's DECOUPLED column is set) with lr and
// beta1 from the 1-Cycle / range-test schedule (schedule.h), one launch per
// dtype bucket (multi_tensor.cuh).
#include <torch/library.h>

#include "step_ops.cuh"
#include "tensor_table.cuh"

namespace onecycle_fused {
namespace cuda_impl {
namespace {

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                    at::IntArrayRef group_ids, const at::Tensor& table, const at::Tensor& counter,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  // an empty max_exp_avg_sq: the parameter's group does not use amsgrad
  const StepInputs in{"adam_step_",
                      params,
                      grads,
                      {exp_avgs, exp_avg_sqs, max_exp_avg_sqs},
                      {false, false, true},
                      {"exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"},
                      steps,
                      group_ids,
                      table,
                      counter,
                      grad_scale,
                      found_inf};
  launch_step<AdamOp>(in);
}

}  // namespace
}  // namespace cuda_impl
}  // namespace onecycle_fused

TORCH_LIBRARY_IMPL(onecycle_fused, CUDA, m) {
  m.impl("adam_step_", &onecycle_fused::cuda_impl::adam_step_cuda);
}
