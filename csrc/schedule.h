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
constexpr int KIND = 0;  // 0: OneCycle, 1: LRRangeTest, 2: TorchOneCycle
// OneCycle columns; what LRRangeTest (RT) and TorchOneCycle (TOC) keep in them
constexpr int FIRST_STEP_SIZE = 1;  // RT: step_size; TOC: end step of phase 1
constexpr int SECOND_STEP_SIZE = 2;  // TOC: end step of phase 2 (three_phase)
constexpr int FIRST_STAIR_COUNT = 3;  // RT: staircase (0 / 1); TOC: anneal (0 cos, 1 linear)
constexpr int SECOND_STAIR_COUNT = 4;  // TOC: three_phase (0 / 1)
constexpr int DECAY_STEP_SIZE = 5;  // TOC: end step of the last phase, T - 1
constexpr int MIN_LR = 6;  // RT: min_lr; TOC: initial_lr
constexpr int MAX_LR = 7;  // TOC: max_lr
constexpr int DECAY_LR_RATE = 8;  // RT: step_rate; TOC: min_lr
constexpr int MIN_MOM = 9;  // TOC: base_momentum
constexpr int MAX_MOM = 10;  // TOC: max_momentum
constexpr int DECAY_MOM_RATE = 11;  // TOC: last step evaluated as is (later: T - 1)
constexpr int CYCLE_MOMENTUM = 12;  // != 0: momentum from the schedule
constexpr int MOMENTUM = 13;  // constant momentum / beta1 otherwise
constexpr int WEIGHT_DECAY = 14;
constexpr int DAMPENING = 15;
constexpr int NESTEROV = 16;
constexpr int MAXIMIZE = 17;
constexpr int BETA2 = 18;
constexpr int EPS = 19;
constexpr int AMSGRAD = 20;  // (this and HAS_MOMENTUM_BUFFER: see schedule.py's Row)
constexpr int DECOUPLED = 21;  // AdamW
constexpr int HAS_MOMENTUM_BUFFER = 22;
constexpr int WIDTH = 24;  // ROW_WIDTH
}  // namespace row

constexpr int KIND_ONECYCLE = 0;
constexpr int KIND_LRRANGETEST = 1;
constexpr int KIND_TORCH_ONECYCLE = 2;
constexpr int ANNEAL_LINEAR = 1;  // TorchOneCycle's anneal column; 0 is cos

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

// step + 1 for the int64 step counts, wrapping at 2^63 as torch's int64 add
// does (the reference backend's `step + 1`); a signed overflow would be
// undefined behaviour. (Counts that large only come from a loaded
// state_dict: load_state_dict accepts any int64 >= 0.)
ONECYCLE_HD int64_t oc_next_step(int64_t step) {
  return static_cast<int64_t>(static_cast<uint64_t>(step) + 1u);
}

// math.pi as a double
constexpr double kPi = 3.141592653589793;

// torch's OneCycleLR._annealing_cos / _annealing_linear, operation for
// operation. cos is the C library's on the host (glibc's, as Python's
// math.cos) and CUDA's on the device (within an ulp or two of it).
ONECYCLE_HD double torch_anneal(double start, double end, double pct, bool linear) {
  if (linear) return oc_dadd(oc_dmul(oc_dsub(end, start), pct), start);
  const double cos_out = oc_dadd(cos(oc_dmul(kPi, pct)), 1.0);
  return oc_dadd(end, oc_dmul(oc_ddiv(oc_dsub(start, end), 2.0), cos_out));
}

// torch's OneCycleLR.get_lr at last_epoch == k, from the constants
// TorchOneCycle.row() precomputed on the host as torch does in Python.
ONECYCLE_HD void torch_onecycle_lr_mom(const double* r, double k, double* lr_out, double* mom_out) {
  // past the end (torch raises there) the values of k = T - 1 hold
  const double last_end = r[row::DECAY_STEP_SIZE];
  if (k > r[row::DECAY_MOM_RATE]) k = last_end;
  const double end1 = r[row::FIRST_STEP_SIZE];
  const double end2 = r[row::SECOND_STEP_SIZE];
  const bool three = r[row::SECOND_STAIR_COUNT] != 0;
  const double initial_lr = r[row::MIN_LR], max_lr = r[row::MAX_LR], min_lr = r[row::DECAY_LR_RATE];
  const double base_mom = r[row::MIN_MOM], max_mom = r[row::MAX_MOM];
  // torch's phase search: the first phase whose end is >= k, else the last;
  // each phase starts where the previous one ends (the first at 0.0)
  double start, end, lr_from, lr_to, mom_from, mom_to;
  if (k <= end1) {
    start = 0.0, end = end1, lr_from = initial_lr, lr_to = max_lr, mom_from = max_mom, mom_to = base_mom;
  } else if (three && k <= end2) {
    start = end1, end = end2, lr_from = max_lr, lr_to = initial_lr, mom_from = base_mom, mom_to = max_mom;
  } else if (three) {
    start = end2, end = last_end, lr_from = initial_lr, lr_to = min_lr, mom_from = max_mom, mom_to = max_mom;
  } else {
    start = end1, end = last_end, lr_from = max_lr, lr_to = min_lr, mom_from = base_mom, mom_to = max_mom;
  }
  const double pct = oc_ddiv(oc_dsub(k, start), oc_dsub(end, start));
  const bool linear = r[row::FIRST_STAIR_COUNT] == ANNEAL_LINEAR;
  *lr_out = torch_anneal(lr_from, lr_to, pct, linear);
  *mom_out = torch_anneal(mom_from, mom_to, pct, linear);
}

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
  } else if (kind == KIND_TORCH_ONECYCLE) {
    torch_onecycle_lr_mom(r, k, &lr, &mom);
    if (r[row::CYCLE_MOMENTUM] == 0) mom = r[row::MOMENTUM];
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
