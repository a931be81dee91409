// Per-element SGD / Adam / AdamW updates in "opmath" (float for
// fp32/bf16/fp16 parameters, double for fp64), shared by the CPU and the CUDA
// kernels.
//
// The oracle is onecycle_fused/backends/reference.py, which is torch.optim's
// single-tensor code with device-side lr / momentum. Each step here rounds
// where the reference's torch ops round, and fuses (one rounding) exactly
// where torch's vectorized CPU kernels do: `add(x, alpha=a)`, `lerp` and
// `addcmul` (self + (value * t1) * t2 as one fma; measured with torch 2.13 on
// AVX512: 100% equal to the fused form, 98% to the unfused one). Everything
// else is separately rounded, so the arithmetic goes through Arith<T> (nvcc
// would otherwise contract `a * b + c`).
//
// Usage, per tensor:
//   1. lr, mom = schedule_lr_mom(row, k)                      (schedule.h)
//   2. s = sgd_scalars<S>(row, lr, mom, step_before, ...)     once per tensor
//   3. sgd_update(p, g, buf, s) per element (or per vector of elements)
// where S is the opmath scalar type and T the element type of the math: S
// itself, or a SIMD vector of S for which the kernel specialises Arith<T>
// (the CPU kernel does so for at::vec::Vectorized).
#pragma once

#include <cmath>
#include <cstdint>

#include "schedule.h"

namespace onecycle_fused {

// ---------------------------------------------------------------------------
// Separately rounded arithmetic on T. Specialise for SIMD types.
template <typename T>
struct Arith;

#if defined(__CUDA_ARCH__)
#define ONECYCLE_DEV_OR_HOST(dev, host) dev
#else
#define ONECYCLE_DEV_OR_HOST(dev, host) host
#endif

template <>
struct Arith<float> {
  ONECYCLE_HDM static float add(float a, float b) { return ONECYCLE_DEV_OR_HOST(__fadd_rn(a, b), a + b); }
  ONECYCLE_HDM static float sub(float a, float b) { return ONECYCLE_DEV_OR_HOST(__fsub_rn(a, b), a - b); }
  ONECYCLE_HDM static float mul(float a, float b) { return ONECYCLE_DEV_OR_HOST(__fmul_rn(a, b), a * b); }
  ONECYCLE_HDM static float div(float a, float b) { return ONECYCLE_DEV_OR_HOST(__fdiv_rn(a, b), a / b); }
  ONECYCLE_HDM static float fma(float a, float b, float c) { return ONECYCLE_DEV_OR_HOST(__fmaf_rn(a, b, c), std::fma(a, b, c)); }
  ONECYCLE_HDM static float sqrt(float a) { return ONECYCLE_DEV_OR_HOST(__fsqrt_rn(a), std::sqrt(a)); }
  // torch.maximum: NaN in either operand wins
  ONECYCLE_HDM static float max(float a, float b) { return (a > b || a != a) ? a : b; }
  ONECYCLE_HDM static float neg(float a) { return -a; }
  ONECYCLE_HDM static float splat(float s) { return s; }
};

template <>
struct Arith<double> {
  ONECYCLE_HDM static double add(double a, double b) { return ONECYCLE_DEV_OR_HOST(__dadd_rn(a, b), a + b); }
  ONECYCLE_HDM static double sub(double a, double b) { return ONECYCLE_DEV_OR_HOST(__dsub_rn(a, b), a - b); }
  ONECYCLE_HDM static double mul(double a, double b) { return ONECYCLE_DEV_OR_HOST(__dmul_rn(a, b), a * b); }
  ONECYCLE_HDM static double div(double a, double b) { return ONECYCLE_DEV_OR_HOST(__ddiv_rn(a, b), a / b); }
  ONECYCLE_HDM static double fma(double a, double b, double c) { return ONECYCLE_DEV_OR_HOST(__fma_rn(a, b, c), std::fma(a, b, c)); }
  ONECYCLE_HDM static double sqrt(double a) { return ONECYCLE_DEV_OR_HOST(__dsqrt_rn(a), std::sqrt(a)); }
  ONECYCLE_HDM static double max(double a, double b) { return (a > b || a != a) ? a : b; }
  ONECYCLE_HDM static double neg(double a) { return -a; }
  ONECYCLE_HDM static double splat(double s) { return s; }
};

// ---------------------------------------------------------------------------
// SGD (torch.optim.SGD, _single_tensor_sgd)

template <typename S>
struct SgdScalars {
  S lr;                   // (S) lr(k)
  S momentum;             // (S) mom(k)
  S one_minus_dampening;  // (S) (1 - dampening), computed in double like Python
  S weight_decay;         // (S) weight_decay
  S grad_scale;           // (S) GradScaler scale; grads are divided by it
  bool has_grad_scale;
  bool has_weight_decay;
  bool maximize;
  bool nesterov;
  bool use_buffer;  // the tensor has a buffer and (S) momentum != 0
  bool first_step;  // step count was 0: the buffer starts as the gradient
};

// Per-tensor constants. `step_before` is the tensor's step count before this
// step; `has_buffer` says whether it has a momentum buffer (a tensor of a
// group that never uses momentum has none).
template <typename S>
ONECYCLE_HD SgdScalars<S> sgd_scalars(const double* r, double lr, double mom, int64_t step_before, bool has_buffer,
                                      bool has_grad_scale, double grad_scale) {
  SgdScalars<S> s;
  s.lr = static_cast<S>(lr);
  s.momentum = static_cast<S>(mom);
  s.one_minus_dampening = static_cast<S>(oc_dsub(1.0, r[row::DAMPENING]));
  s.weight_decay = static_cast<S>(r[row::WEIGHT_DECAY]);
  s.grad_scale = static_cast<S>(grad_scale);
  s.has_grad_scale = has_grad_scale;
  s.has_weight_decay = r[row::WEIGHT_DECAY] != 0;
  s.maximize = r[row::MAXIMIZE] != 0;
  s.nesterov = r[row::NESTEROV] != 0;
  // torch: a momentum of 0 steps with the gradient and leaves the buffer alone
  s.use_buffer = has_buffer && s.momentum != 0;
  s.first_step = step_before == 0;
  return s;
}

// One SGD update of the parameter `p` (and its momentum buffer `buf`, ignored
// unless s.use_buffer) with gradient `g`; all in opmath.
template <typename T, typename S>
ONECYCLE_HD void sgd_update(T& p, T g, T& buf, const SgdScalars<S>& s) {
  using A = Arith<T>;
  if (s.has_grad_scale) g = A::div(g, A::splat(s.grad_scale));
  if (s.maximize) g = A::neg(g);
  if (s.has_weight_decay) g = A::fma(p, A::splat(s.weight_decay), g);  // grad.add(p, alpha=wd)
  T direction = g;
  if (s.use_buffer) {
    if (s.first_step) {
      buf = g;
    } else {
      // buf.mul_(mom).add_(grad, alpha=1 - dampening)
      buf = A::fma(g, A::splat(s.one_minus_dampening), A::mul(buf, A::splat(s.momentum)));
    }
    // nesterov: grad + buf * mom, as addcmul (mom is a tensor there): fused
    direction = s.nesterov ? A::fma(buf, A::splat(s.momentum), g) : buf;
  }
  // p.addcmul(direction, lr, value=-1): fused
  p = A::fma(direction, A::splat(-s.lr), p);
}

// ---------------------------------------------------------------------------
// Adam / AdamW (torch.optim.Adam / AdamW, _single_tensor_adam)

template <typename S>
struct AdamScalars {
  S lerp_coeff;        // exp_avg.lerp(grad, w): w if |w| < 0.5 else w - 1
  bool lerp_small;     // |w| < 0.5 (torch's lerp picks its formula by this)
  S beta2;             // (S) beta2
  S one_minus_beta2;   // (S) (1 - beta2)
  S neg_step_size;     // -(S) (lr / (1 - beta1^t))
  S bias_correction2_sqrt;  // (S) sqrt(1 - beta2^t)
  S eps;
  S weight_decay;
  S decay_factor;      // AdamW: (S) (1 - lr * weight_decay)
  S grad_scale;
  bool has_grad_scale;
  bool has_weight_decay;
  bool decoupled;
  bool maximize;
  bool amsgrad;        // the tensor has a max_exp_avg_sq buffer
};

// Per-tensor constants; `beta1` is the schedule's momentum; bias corrections
// use it and the tensor's new step count (step_before + 1), in double.
template <typename S>
ONECYCLE_HD AdamScalars<S> adam_scalars(const double* r, double lr, double beta1, int64_t step_before, bool has_max,
                                        bool has_grad_scale, double grad_scale) {
  AdamScalars<S> s;
  const double beta2 = r[row::BETA2];
  const double wd = r[row::WEIGHT_DECAY];
  const double t = static_cast<double>(oc_next_step(step_before));
  const double bias_correction1 = oc_dsub(1.0, pow(beta1, t));
  const double bias_correction2 = oc_dsub(1.0, pow(beta2, t));
  const S weight = static_cast<S>(oc_dsub(1.0, beta1));
  s.lerp_small = (weight < 0 ? -weight : weight) < S(0.5);
  s.lerp_coeff = s.lerp_small ? weight : Arith<S>::sub(weight, S(1));
  s.beta2 = static_cast<S>(beta2);
  s.one_minus_beta2 = static_cast<S>(oc_dsub(1.0, beta2));
  s.neg_step_size = -static_cast<S>(oc_ddiv(lr, bias_correction1));
  s.bias_correction2_sqrt = static_cast<S>(sqrt(bias_correction2));
  s.eps = static_cast<S>(r[row::EPS]);
  s.weight_decay = static_cast<S>(wd);
  s.decay_factor = static_cast<S>(oc_dsub(1.0, oc_dmul(lr, wd)));
  s.grad_scale = static_cast<S>(grad_scale);
  s.has_grad_scale = has_grad_scale;
  s.has_weight_decay = wd != 0;
  s.decoupled = r[row::DECOUPLED] != 0;
  s.maximize = r[row::MAXIMIZE] != 0;
  s.amsgrad = has_max;
  return s;
}

// One Adam/AdamW update of `p`, `exp_avg`, `exp_avg_sq` and (if s.amsgrad)
// `max_exp_avg_sq` with gradient `g`; all in opmath.
template <typename T, typename S>
ONECYCLE_HD void adam_update(T& p, T g, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq, const AdamScalars<S>& s) {
  using A = Arith<T>;
  if (s.has_grad_scale) g = A::div(g, A::splat(s.grad_scale));
  if (s.maximize) g = A::neg(g);
  if (s.has_weight_decay) {
    if (s.decoupled) {
      p = A::mul(p, A::splat(s.decay_factor));
    } else {
      g = A::fma(p, A::splat(s.weight_decay), g);  // grad.add(p, alpha=wd)
    }
  }
  // exp_avg.lerp_(grad, 1 - beta1), as torch's vectorized lerp: one fma
  const T diff = A::sub(g, exp_avg);
  exp_avg = A::fma(A::splat(s.lerp_coeff), diff, s.lerp_small ? exp_avg : g);
  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): addcmul is
  // fma(value * grad, grad, self) in torch's CPU kernel
  exp_avg_sq = A::fma(A::mul(A::splat(s.one_minus_beta2), g), g, A::mul(exp_avg_sq, A::splat(s.beta2)));
  T second = exp_avg_sq;
  if (s.amsgrad) {
    max_exp_avg_sq = A::max(max_exp_avg_sq, exp_avg_sq);
    second = max_exp_avg_sq;
  }
  // denom = (sqrt(v) / sqrt(bias_correction2)) + eps; p += (exp_avg * -step_size) / denom
  const T denom = A::add(A::div(A::sqrt(second), A::splat(s.bias_correction2_sqrt)), A::splat(s.eps));
  p = A::add(p, A::div(A::mul(exp_avg, A::splat(s.neg_step_size)), denom));
}

}  // namespace onecycle_fused
