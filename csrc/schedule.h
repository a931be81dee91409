// 1-Cycle / LR-range-test schedule evaluated from the integer step, in float64.
//
// C++ twin of onecycle_fused/schedule.py (the spec) and of
// backends/reference.py:schedule_values. Same operations in the same order,
// each rounded separately, so a kernel's lr / momentum equal the host's bit
// for bit. That is why every operation goes through oc_dmul / oc_dadd / ...:
// nvcc contracts `a * b + c` into an FMA by default (one rounding instead of
// two), which would move values by an ulp. Host builds of this header must use
// -ffp-contract=off (setup.py does) for the same reason.
//
// Compiled into both the CPU (g++) and the CUDA (nvcc) kernels. Functions are
// `static inline` on the host so that the CPU kernel, compiled once per CPU
// capability (DEFAULT / AVX2 / AVX512), never shares a symbol between
// capabilities.
#pragma once

#include <cmath>
#include <cstdint>

// ONECYCLE_HD: free functions; ONECYCLE_HDM: static member functions.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define ONECYCLE_HD __host__ __device__ __forceinline__
#define ONECYCLE_HDM __host__ __device__ __forceinline__
#else
#define ONECYCLE_HD static inline
#define ONECYCLE_HDM inline __attribute__((always_inline))
#endif

namespace onecycle_fused {

// Column layout of the per-group float64 row; mirrors schedule.Row.
namespace row {
constexpr int KIND = 0;  // 0: OneCycle, 1: LRRangeTest
constexpr int FIRST_STEP_SIZE = 1;  // LRRangeTest: step_size
constexpr int SECOND_STEP_SIZE = 2;
constexpr int FIRST_STAIR_COUNT = 3;  // LRRangeTest: staircase (0 / 1)
constexpr int SECOND_STAIR_COUNT = 4;
constexpr int DECAY_STEP_SIZE = 5;
constexpr int MIN_LR = 6;  // LRRangeTest: min_lr
constexpr int MAX_LR = 7;
constexpr int DECAY_LR_RATE = 8;  // LRRangeTest: step_rate
constexpr int MIN_MOM = 9;
constexpr int MAX_MOM = 10;
constexpr int DECAY_MOM_RATE = 11;
constexpr int CYCLE_MOMENTUM = 12;  // != 0: momentum from the schedule
constexpr int MOMENTUM = 13;  // constant momentum / beta1 otherwise
constexpr int WEIGHT_DECAY = 14;
constexpr int DAMPENING = 15;
constexpr int NESTEROV = 16;
constexpr int MAXIMIZE = 17;
constexpr int BETA2 = 18;
constexpr int EPS = 19;
constexpr int AMSGRAD = 20;
constexpr int DECOUPLED = 21;  // AdamW
constexpr int HAS_MOMENTUM_BUFFER = 22;
constexpr int WIDTH = 24;  // ROW_WIDTH
}  // namespace row

constexpr int KIND_ONECYCLE = 0;
constexpr int KIND_LRRANGETEST = 1;

// Separately rounded float64 operations (never contracted into an FMA).
#if defined(__CUDA_ARCH__)
ONECYCLE_HD double oc_dadd(double a, double b) { return __dadd_rn(a, b); }
ONECYCLE_HD double oc_dsub(double a, double b) { return __dsub_rn(a, b); }
ONECYCLE_HD double oc_dmul(double a, double b) { return __dmul_rn(a, b); }
ONECYCLE_HD double oc_ddiv(double a, double b) { return __ddiv_rn(a, b); }
#else
ONECYCLE_HD double oc_dadd(double a, double b) { return a + b; }
ONECYCLE_HD double oc_dsub(double a, double b) { return a - b; }
ONECYCLE_HD double oc_dmul(double a, double b) { return a * b; }
ONECYCLE_HD double oc_ddiv(double a, double b) { return a / b; }
#endif

// Learning rate and momentum (SGD momentum / Adam beta1) of the step that runs
// after `k` applied steps, for the group whose row starts at `r`
// (row::WIDTH doubles).
ONECYCLE_HD void schedule_lr_mom(const double* r, int64_t k_steps, double* lr_out, double* mom_out) {
  const double k = static_cast<double>(k_steps);
  const double kind = r[row::KIND];
  const double first = r[row::FIRST_STEP_SIZE];
  const double min_lr = r[row::MIN_LR];
  const double lr_rate = r[row::DECAY_LR_RATE];
  double lr, mom;
  if (kind == KIND_LRRANGETEST) {
    // lr = min_lr * (1 + rate * i), i = k / step_size (floored with staircase)
    double interval = oc_ddiv(k, first);
    if (r[row::FIRST_STAIR_COUNT] != 0) interval = floor(interval);
    lr = oc_dmul(min_lr, oc_dadd(1.0, oc_dmul(lr_rate, interval)));
    mom = r[row::MOMENTUM];
  } else {
    const double second = r[row::SECOND_STEP_SIZE];
    const double total = oc_dadd(first, second);
    const double max_lr = r[row::MAX_LR];
    const double min_mom = r[row::MIN_MOM];
    const double max_mom = r[row::MAX_MOM];
    if (k <= total) {
      // cycle phase: DeepSpeed's _get_scale_factor, operation for operation
      const double ratio = oc_ddiv(first, total);
      const double k_over_total = oc_ddiv(k, total);
      const double cycle = floor(oc_dadd(1.0, k_over_total));
      const double x = oc_dsub(oc_dadd(1.0, k_over_total), cycle);
      double scale, stairs;
      if (x <= ratio) {
        scale = oc_ddiv(x, ratio);
        stairs = r[row::FIRST_STAIR_COUNT];
      } else {
        scale = oc_ddiv(oc_dsub(x, 1.0), oc_dsub(ratio, 1.0));
        stairs = r[row::SECOND_STAIR_COUNT];
      }
      if (stairs > 0) {
        // quantised from the integer offset (exact: k and total are integers)
        const double c = fmod(k, total);
        const double pos = c <= first ? oc_ddiv(oc_dmul(c, stairs), first)
                                      : oc_ddiv(oc_dmul(oc_dsub(total, c), stairs), second);
        scale = oc_ddiv(floor(pos), stairs);
      }
      lr = oc_dadd(min_lr, oc_dmul(oc_dsub(max_lr, min_lr), scale));
      mom = oc_dsub(max_mom, oc_dmul(oc_dsub(max_mom, min_mom), scale));
    } else {
      // decay phase: continuous, divides both lr and momentum
      const double decay_step = r[row::DECAY_STEP_SIZE];
      const double mom_rate = r[row::DECAY_MOM_RATE];
      lr = min_lr;
      mom = max_mom;
      if (decay_step != 0) {
        const double interval = oc_ddiv(oc_dsub(k, total), decay_step);
        if (lr_rate != 0) lr = oc_ddiv(min_lr, oc_dadd(1.0, oc_dmul(lr_rate, interval)));
        if (mom_rate != 0) mom = oc_ddiv(max_mom, oc_dadd(1.0, oc_dmul(mom_rate, interval)));
      }
    }
    if (r[row::CYCLE_MOMENTUM] == 0) mom = r[row::MOMENTUM];
  }
  *lr_out = lr;
  *mom_out = mom;
}

}  // namespace onecycle_fused
