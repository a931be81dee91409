// The algorithms plugged into multi_tensor_step_kernel (multi_tensor.cuh):
// per-chunk coefficients and the per-element update, both from the shared
// math of update.h / schedule.h. Included by sgd_step.cu / adam_step.cu and
// by the host-thread emulation of the kernel that CI runs
// (cpu_emulation.cuh).
#pragma once

#include "../multi_tensor.cuh"
#include "../update.h"

namespace onecycle_fused {
namespace cuda_impl {

// torch.optim.SGD: s0 = momentum buffer (absent: the group uses no momentum).
// S is the opmath type: float, or double for fp64 parameters.
struct SgdOp {
  template <typename S>
  using Coef = SgdScalars<S>;

  template <typename S>
  static __device__ __forceinline__ void coefficients(const double* row, int64_t k, int64_t step, int flags,
                                                      bool scaled, float scale, Coef<S>& c) {
    double lr, mom;
    schedule_lr_mom(row, k, &lr, &mom);
    c = sgd_scalars<S>(row, lr, mom, step, (flags & mt::kHasS0) != 0, scaled, static_cast<double>(scale));
  }

  template <typename S>
  static __device__ __forceinline__ void update(const Coef<S>& c, S& p, S g, S& buf, S& /*unused*/,
                                                S& /*unused*/) {
    sgd_update<S, S>(p, g, buf, c);
  }
};

// torch.optim.Adam / AdamW (the row's DECOUPLED column): s0 = exp_avg,
// s1 = exp_avg_sq, s2 = max_exp_avg_sq (absent: no amsgrad)
struct AdamOp {
  template <typename S>
  using Coef = AdamScalars<S>;

  template <typename S>
  static __device__ __forceinline__ void coefficients(const double* row, int64_t k, int64_t step, int flags,
                                                      bool scaled, float scale, Coef<S>& c) {
    double lr, beta1;
    schedule_lr_mom(row, k, &lr, &beta1);
    c = adam_scalars<S>(row, lr, beta1, step, (flags & mt::kHasS2) != 0, scaled, static_cast<double>(scale));
  }

  template <typename S>
  static __device__ __forceinline__ void update(const Coef<S>& c, S& p, S g, S& exp_avg, S& exp_avg_sq,
                                                S& max_exp_avg_sq) {
    adam_update<S, S>(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, c);
  }
};

}  // namespace cuda_impl
}  // namespace onecycle_fused
