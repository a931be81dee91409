// onecycle_fused::schedule_values on CUDA (debug / tests): lr and momentum of
// every group after k applied steps, evaluated by the same device code the
// step kernels run (schedule.h), so tests can compare it with schedule.py
// bit for bit.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../schedule.h"

namespace onecycle_fused {
namespace cuda_impl {
namespace {

__global__ void schedule_values_kernel(const double* rows, int64_t groups, int64_t k, double* out) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g < groups) schedule_lr_mom(rows + g * row::WIDTH, k, &out[2 * g], &out[2 * g + 1]);
}

at::Tensor schedule_values_cuda(const at::Tensor& table, int64_t k) {
  TORCH_CHECK_VALUE(k >= 0, "onecycle_fused::schedule_values: k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(table.scalar_type() == at::kDouble && table.dim() == 2 && table.size(1) == row::WIDTH,
                    "onecycle_fused::schedule_values: table must be float64 [groups, ", row::WIDTH, "], got ",
                    table.scalar_type(), " ", table.sizes());
  const c10::cuda::CUDAGuard guard(table.device());
  const at::Tensor rows = table.contiguous();
  const int64_t groups = rows.size(0);
  at::Tensor out = at::empty({groups, 2}, rows.options());
  if (groups == 0) return out;
  constexpr int kThreads = 128;
  const dim3 grid(static_cast<unsigned int>((groups + kThreads - 1) / kThreads));
  schedule_values_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      rows.data_ptr<double>(), groups, k, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda_impl
}  // namespace onecycle_fused

TORCH_LIBRARY_IMPL(onecycle_fused, CUDA, m) {
  m.impl("schedule_values", &onecycle_fused::cuda_impl::schedule_values_cuda);
}
