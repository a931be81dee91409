// onecycle_fused::sgd_step_ on CUDA: torch.optim.SGD's update (update.h) with
// lr and momentum from the 1-Cycle / range-test schedule (schedule.h), one
// launch per dtype bucket (multi_tensor.cuh).
#include <torch/library.h>

#include "step_ops.cuh"
#include "tensor_table.cuh"

namespace onecycle_fused {
namespace cuda_impl {
namespace {

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList steps, at::IntArrayRef group_ids, const at::Tensor& table,
                   const at::Tensor& counter, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  // an empty momentum buffer: the parameter's group uses no momentum
  const StepInputs in{"sgd_step_",
                      params,
                      grads,
                      {momentum_buffers, {}, {}},
                      {true, false, false},
                      {"momentum_buffers", nullptr, nullptr},
                      steps,
                      group_ids,
                      table,
                      counter,
                      grad_scale,
                      found_inf};
  launch_step<SgdOp>(in);
}

}  // namespace
}  // namespace cuda_impl
}  // namespace onecycle_fused

TORCH_LIBRARY_IMPL(onecycle_fused, CUDA, m) {
  m.impl("sgd_step_", &onecycle_fused::cuda_impl::sgd_step_cuda);
}
