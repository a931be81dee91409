// Whether two tensors walk their elements in the same memory order: same
// sizes, and the same strides wherever a size is > 1 (a size-1 dim's stride
// is free). The CUDA table (cuda/tensor_table.cu) walks a parameter's states
// with the parameter's offsets, so it needs this of them; a StepPlan built
// for it checks it per step (ops.cpp), so a parameter whose memory format
// changed sends the step to the list path, which lays the states out anew.
#pragma once

#include <ATen/core/Tensor.h>

namespace onecycle_fused {

inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  if (a.numel() == 0) return true;  // no element: any strides
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

}  // namespace onecycle_fused
