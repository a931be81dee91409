// Custom-op schemas (namespace onecycle_fused) and their CPU implementations.
//
// The CUDA implementations are registered by the separate _C_cuda library
// (csrc/cuda/*.cu) for the same schemas; fake (meta) kernels are registered
// in Python (onecycle_fused/ops.py).
//
// CPU implementation: per op call, lr / momentum of every group are computed
// from the step counter by schedule.h, per-tensor constants by update.h, and
// then one at::parallel_for gives each thread an equal share of all the
// tensors' elements, run through the vectorized kernels of the best CPU
// capability (csrc/cpu/kernels.inc).
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "layout.h"
#include "overlap.h"
#include "schedule.h"

namespace onecycle_fused {

PyObject* launch_key(PyObject* module, PyObject* const* args, Py_ssize_t nargs);  // launch_key.cpp

namespace {

// plan_fingerprint(param_groups, state) -> bytes | None
//
// What a step plan is built from (onecycle_fused/step_plan.py), as one bytes
// object to compare with ==: the group dicts, each group's params list and
// its tensors, the state's keys, each per-param state dict and its keys and
// values, all by address, with every length before its items. Python needs a
// call of id() per object for the same (~30 ns each, 5 or 6 per parameter);
// this walks the dicts and lists directly. Addresses are only compared while
// the plan keeps what could be reused alive or detects its death (see
// StepPlan). None when the structures are not what an Optimizer holds.
PyObject* plan_fingerprint(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "plan_fingerprint(param_groups, state) takes 2 arguments");
    return nullptr;
  }
  PyObject* groups = args[0];
  PyObject* state = args[1];
  if (!PyList_Check(groups) || !PyDict_Check(state)) Py_RETURN_NONE;
  static PyObject* params_key = PyUnicode_InternFromString("params");
  if (params_key == nullptr) return nullptr;
  std::vector<uintptr_t> out;
  out.reserve(8 + 4 * PyList_GET_SIZE(groups) + 8 * PyDict_GET_SIZE(state));
  auto put = [&out](const void* p) { out.push_back(reinterpret_cast<uintptr_t>(p)); };
  out.push_back(PyList_GET_SIZE(groups));
  for (Py_ssize_t g = 0; g < PyList_GET_SIZE(groups); ++g) {
    PyObject* group = PyList_GET_ITEM(groups, g);
    if (!PyDict_Check(group)) Py_RETURN_NONE;
    PyObject* params = PyDict_GetItemWithError(group, params_key);  // borrowed
    if (params == nullptr) {
      if (PyErr_Occurred()) return nullptr;
      Py_RETURN_NONE;
    }
    if (!PyList_Check(params)) Py_RETURN_NONE;
    put(group);
    put(params);
    out.push_back(PyList_GET_SIZE(params));
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) put(PyList_GET_ITEM(params, i));
  }
  out.push_back(PyDict_GET_SIZE(state));
  Py_ssize_t pos = 0;
  PyObject *key, *value;
  while (PyDict_Next(state, &pos, &key, &value)) {
    if (!PyDict_Check(value)) Py_RETURN_NONE;
    put(key);
    put(value);
    out.push_back(PyDict_GET_SIZE(value));
    Py_ssize_t pos2 = 0;
    PyObject *k2, *v2;
    while (PyDict_Next(value, &pos2, &k2, &v2)) {
      put(k2);
      put(v2);
    }
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out.data()),
                                   static_cast<Py_ssize_t>(out.size() * sizeof(uintptr_t)));
}

PyMethodDef module_methods[] = {
    {"plan_fingerprint", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&plan_fingerprint)),
     METH_FASTCALL, "What a step plan is built from, as bytes (onecycle_fused/step_plan.py)."},
    {"launch_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&launch_key)), METH_FASTCALL,
     "The triton backend's launch-table cache key, as bytes (csrc/launch_key.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace onecycle_fused

// ops.py loads the library with torch.ops.load_library (the ops need no
// module); step_plan.py and backends/triton.py import it as the module
// onecycle_fused._C for plan_fingerprint and launch_key.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, onecycle_fused::module_methods};
  return PyModule_Create(&module_def);
}

namespace onecycle_fused {
namespace {

using at::Tensor;
using at::TensorList;

// Below this many elements in total the step runs on the calling thread: a
// parallel region costs more than it saves.
constexpr int64_t kSerialBelow = 1 << 15;
// Fewest elements worth giving a thread of their own.
constexpr int64_t kGrain = 1 << 14;

// The kernel variant, per dtype, never above torch's own capability (which
// honours ATEN_CPU_CAPABILITY):
// * float32 / float64: at most AVX2, as torch runs its own fused optimizer
//   kernels on AVX512 machines (ATen registers AVX512 variants only for the
//   kernels that gain from them). These steps stream memory; measured on an
//   AVX512 AMD EPYC, our AVX512 SGD ran ~10% slower than the AVX2 one.
// * bfloat16 / float16: the best available. Widening to float and rounding
//   back cost enough instructions to matter; measured there, AVX512 AdamW is
//   1.2-1.4x faster than AVX2 in bf16 and fp16.
// ONECYCLE_FUSED_CPU_KERNELS=default | avx2 | avx512 asks for one variant for
// every dtype (still capped by torch's capability).
std::string upper(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::toupper(c); });
  return s;
}

const cpu::Kernels* capped(const std::string& want) {
  const cpu::Kernels* k = cpu::kernels_DEFAULT();
#if defined(ONECYCLE_FUSED_CPU_CAPABILITIES)  // setup.py built the AVX2 / AVX512 variants
  const std::string cap = at::get_cpu_capability();
  const bool has512 = cap == "AVX512", has2 = has512 || cap == "AVX2";
  if (want == "AVX512" && has512) k = cpu::kernels_AVX512();
  if ((want == "AVX2" || (want == "AVX512" && !has512)) && has2) k = cpu::kernels_AVX2();
#endif
  return k;
}

struct Variants {
  const cpu::Kernels* wide;     // float32 / float64
  const cpu::Kernels* reduced;  // bfloat16 / float16
};

const Variants& variants() {
  static const Variants v = [] {
    const char* env = std::getenv("ONECYCLE_FUSED_CPU_KERNELS");
    const std::string want = upper(env == nullptr ? "" : env);
    if (want == "DEFAULT" || want == "AVX2" || want == "AVX512") return Variants{capped(want), capped(want)};
    // a misspelt value would otherwise select the slow DEFAULT kernels
    // silently; unset and empty mean the automatic choice
    // (a static's initializer: said once per process)
    if (!want.empty()) {
      TORCH_WARN("onecycle_fused: ONECYCLE_FUSED_CPU_KERNELS=", env,
                 " is not one of default, avx2, avx512; ignored (the automatic choice is used)");
    }
    return Variants{capped("AVX2"), capped("AVX512")};
  }();
  return v;
}

const cpu::Kernels& kernels_for(cpu::Dtype d) {
  const Variants& v = variants();
  return (d == cpu::Dtype::BFloat16 || d == cpu::Dtype::Half) ? *v.reduced : *v.wide;
}

// One op call may hold tensors of several dtypes: each chunk takes its dtype's variant.
void sgd_chunk(const cpu::TensorWork& w, int64_t begin, int64_t end) { kernels_for(w.dtype).sgd(w, begin, end); }
void adam_chunk(const cpu::TensorWork& w, int64_t begin, int64_t end) { kernels_for(w.dtype).adam(w, begin, end); }

cpu::Dtype to_dtype(const Tensor& t, const char* op, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return cpu::Dtype::Float;
    case at::kDouble: return cpu::Dtype::Double;
    case at::kBFloat16: return cpu::Dtype::BFloat16;
    case at::kHalf: return cpu::Dtype::Half;
    default:
      TORCH_CHECK_VALUE(false, "onecycle_fused::", op, ": params[", i, "] has dtype ", t.scalar_type(),
                        "; supported: float32, float64, bfloat16, float16");
  }
  return cpu::Dtype::Float;  // unreachable
}

// Reads a CPU scalar tensor as double.
double scalar_value(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.numel() == 1, "onecycle_fused::", op, ": ", name, " must hold one value, got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "onecycle_fused::", op, ": ", name, " must be on the CPU, got ",
                    t.device());
  return t.item<double>();
}

int64_t* int64_scalar(const Tensor& t, const char* op, const char* name, size_t i) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.numel() == 1 && t.device().is_cpu(), "onecycle_fused::", op,
                    ": ", name, (i == size_t(-1) ? "" : "[" + std::to_string(i) + "]"),
                    " must be a CPU int64 tensor with one element, got ", t.scalar_type(), " ", t.sizes(), " on ",
                    t.device());
  return t.data_ptr<int64_t>();
}

// lr and momentum of every group after k applied steps: [lr0, mom0, lr1, ...]
std::vector<double> group_schedules(const Tensor& table, int64_t k, const char* op) {
  TORCH_CHECK_VALUE(table.scalar_type() == at::kDouble && table.dim() == 2 && table.size(1) >= row::WIDTH,
                    "onecycle_fused::", op, ": table must be float64 [groups, ", row::WIDTH, "], got ",
                    table.scalar_type(), " ", table.sizes());
  TORCH_CHECK_VALUE(table.device().is_cpu(), "onecycle_fused::", op, ": table must be on the CPU, got ",
                    table.device());
  const Tensor t = table.contiguous();
  const double* data = t.data_ptr<double>();
  std::vector<double> out(2 * t.size(0));
  for (int64_t g = 0; g < t.size(0); ++g) schedule_lr_mom(data + g * t.size(1), k, &out[2 * g], &out[2 * g + 1]);
  return out;
}

// Gathers one op call's tensors into TensorWork items. A tensor whose layout
// differs from its parameter's (or which is not dense) is replaced by a
// contiguous copy that is written back after the kernel: correct for any
// layout, fast for the usual one (states made with zeros_like(p)).
class Batch {
 public:
  Batch(const char* op, TensorList params, TensorList grads) : op_(op), params_(params), grads_(grads) {
    TORCH_CHECK_VALUE(grads.size() == params.size(), "onecycle_fused::", op, ": got ", params.size(),
                      " params but ", grads.size(), " grads");
  }

  // Check only (a skipped step): data() validates but neither copies nor
  // schedules a write-back; its pointer is never dereferenced.
  void set_check_only(bool on) { check_only_ = on; }

  void check_list(TensorList list, const char* name) const {
    TORCH_CHECK_VALUE(list.size() == params_.size(), "onecycle_fused::", op_, ": got ", params_.size(),
                      " params but ", list.size(), " ", name);
  }

  // Starts tensor i; returns false when it has no elements.
  bool begin(size_t i, cpu::TensorWork& w) {
    const Tensor& p = params_[i];
    TORCH_CHECK_VALUE(p.device().is_cpu(), "onecycle_fused::", op_, ": params[", i, "] must be on the CPU, got ",
                      p.device());
    w = cpu::TensorWork{};
    states_.clear();
    w.dtype = to_dtype(p, op_, i);
    w.numel = p.numel();
    dense_ = p.is_non_overlapping_and_dense();
    w.param = data(p, "params", i, /*mutated=*/true);
    w.grad = data(grads_[i], "grads", i, /*mutated=*/false);
    return w.numel > 0;
  }

  // Data pointer of a tensor that must match params[i]; optional ones may be
  // empty (returns null).
  void* data(const Tensor& t, const char* name, size_t i, bool mutated, bool optional = false) {
    const Tensor& p = params_[i];
    if (optional && t.numel() == 0) return nullptr;
    TORCH_CHECK_VALUE(t.device() == p.device() && t.scalar_type() == p.scalar_type() && t.sizes() == p.sizes(),
                      "onecycle_fused::", op_, ": ", name, "[", i, "] must match params[", i, "] (",
                      p.scalar_type(), " ", p.sizes(), " on ", p.device(), "), got ", t.scalar_type(), " ",
                      t.sizes(), " on ", t.device());
    // (overlap.h; on the tensors as given, before a copy could hide it)
    const bool is_grad = !mutated;  // (the one tensor the op only reads)
    if (mutated) check_writable(t, name, i, op_);
    if (mutated && !t.is_same(p)) {
      check_state_apart(p, "params", t, name, i, op_);
      check_state_apart(grads_[i], "grads", t, name, i, op_);
      for (const auto& [seen, seen_name] : states_) check_state_apart(*seen, seen_name, t, name, i, op_);
      states_.emplace_back(&t, name);
    }
    if (check_only_) return t.data_ptr();
    Tensor copy;
    if (dense_) {
      // a grad sharing part of its parameter's memory is read from a copy
      if (t.strides() == p.strides() && !(is_grad && partially_overlap(p, t))) return t.data_ptr();
      // the kernel walks p's memory in order: give t the same layout
      copy = at::empty_strided(p.sizes(), p.strides(), t.options());
      copy.copy_(t);
    } else {
      // p itself is walked as a contiguous copy
      copy = t.contiguous();
      if (copy.is_same(t)) return t.data_ptr();
    }
    if (mutated) writebacks_.emplace_back(t, copy);
    keep_.push_back(copy);
    return copy.data_ptr();
  }

  void finish() {
    for (auto& [dst, src] : writebacks_) dst.copy_(src);
  }

 private:
  const char* op_;
  TensorList params_;
  TensorList grads_;
  bool dense_ = true;
  bool check_only_ = false;
  std::vector<std::pair<Tensor, Tensor>> writebacks_;
  std::vector<Tensor> keep_;
  std::vector<std::pair<const Tensor*, const char*>> states_;  // tensor i's states so far (the op's lists)
};

// Runs `fn` over every element of every work item. The items are laid end to
// end and the threads get equal shares of *elements* (a share may start or
// end inside a tensor): splitting by tensor, or by fixed-size chunks with
// every small tensor a chunk of its own, leaves one thread with most of the
// bytes when sizes are as uneven as a real model's (ResNet-50: 106 of 161
// tensors are BatchNorm vectors of at most 2,048 elements). Shares are cut
// in units of kAlign elements counted from each tensor's start, so a share
// inside a tensor starts on a 64-byte boundary (for 4-byte and smaller
// types) and its vector loads do not straddle cache lines.
constexpr int64_t kAlign = 16;

void run(const std::vector<cpu::TensorWork>& works, cpu::ChunkFn fn) {
  std::vector<int64_t> starts(works.size() + 1, 0);  // first unit of each item
  int64_t total = 0;
  for (size_t i = 0; i < works.size(); ++i) {
    starts[i + 1] = starts[i] + (works[i].numel + kAlign - 1) / kAlign;
    total += works[i].numel;
  }
  auto body = [&](int64_t begin, int64_t end) {  // in units
    size_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (; begin < end; ++i) {
      const int64_t stop = std::min(end, starts[i + 1]);
      fn(works[i], (begin - starts[i]) * kAlign, std::min(works[i].numel, (stop - starts[i]) * kAlign));
      begin = stop;
    }
  };
  if (total < kSerialBelow || at::get_num_threads() == 1 || at::in_parallel_region()) {
    body(0, starts.back());
  } else {
    at::parallel_for(0, starts.back(), kGrain / kAlign, body);
  }
}

// What both ops do around their per-tensor work: the checks shared by all
// arguments, every group's lr / momentum at this step, and afterwards the
// kernels, the write-backs and the step counts. Nothing is written before
// finish(), so a failed check leaves every tensor as it was.
class Step {
 public:
  Step(const char* op, TensorList params, TensorList grads, TensorList steps, at::IntArrayRef group_ids,
       const Tensor& table, const Tensor& counter, const std::optional<Tensor>& grad_scale,
       const std::optional<Tensor>& found_inf)
      : batch(op, params, grads), group_ids_(group_ids) {
    batch.check_list(steps, "steps");
    TORCH_CHECK_VALUE(group_ids.size() == params.size(), "onecycle_fused::", op, ": got ", params.size(),
                      " params but ", group_ids.size(), " group_ids");
    for (size_t i = 0; i < steps.size(); ++i) step_ptrs_.push_back(int64_scalar(steps[i], op, "steps", i));
    counter_ = int64_scalar(counter, op, "counter", size_t(-1));
    // A skipped step still checks every argument (and copies nothing, see
    // Batch::data): a bad state raises on the step that received it, not on
    // the next unskipped one.
    skipped_ = found_inf.has_value() && scalar_value(*found_inf, op, "found_inf") != 0;
    batch.set_check_only(skipped_);
    schedules_ = group_schedules(table, *counter_, op);
    const int64_t groups = table.size(0);
    for (size_t i = 0; i < group_ids.size(); ++i) {
      TORCH_CHECK_VALUE(group_ids[i] >= 0 && group_ids[i] < groups, "onecycle_fused::", op, ": group_ids[", i,
                        "] = ", group_ids[i], " is not a row of the table (", groups, " groups)");
    }
    if (grad_scale.has_value()) {
      has_grad_scale = true;
      this->grad_scale = scalar_value(*grad_scale, op, "grad_scale");
    }
    rows_ = table.contiguous();
  }

  // tensor i's row of the table, lr and momentum (beta1), and its step count before this step
  const double* row(size_t i) const { return rows_.data_ptr<double>() + group_ids_[i] * rows_.size(1); }
  double lr(size_t i) const { return schedules_[2 * group_ids_[i]]; }
  double mom(size_t i) const { return schedules_[2 * group_ids_[i] + 1]; }
  int64_t step_before(size_t i) const { return *step_ptrs_[i]; }
  int64_t group(size_t i) const { return group_ids_[i]; }

  void finish(const std::vector<cpu::TensorWork>& works, cpu::ChunkFn fn) {
    if (skipped_) return;  // found_inf: nothing changes, not even the counters
    run(works, fn);
    batch.finish();
    for (int64_t* s : step_ptrs_) *s = oc_next_step(*s);  // (wraps at 2^63 like torch's int64 add)
    *counter_ = oc_next_step(*counter_);
  }

  Batch batch;
  bool has_grad_scale = false;
  double grad_scale = 1.0;

 private:
  at::IntArrayRef group_ids_;
  std::vector<int64_t*> step_ptrs_;
  int64_t* counter_ = nullptr;
  bool skipped_ = false;
  std::vector<double> schedules_;  // lr, mom per group
  Tensor rows_;
};

void sgd_step_cpu(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList steps,
                  at::IntArrayRef group_ids, const Tensor& table, const Tensor& counter,
                  const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  Step st("sgd_step_", params, grads, steps, group_ids, table, counter, grad_scale, found_inf);
  st.batch.check_list(momentum_buffers, "momentum_buffers");
  std::vector<cpu::TensorWork> works;
  works.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    cpu::TensorWork w;
    const bool nonempty = st.batch.begin(i, w);
    const bool has_buffer = momentum_buffers[i].numel() > 0;
    w.sgd_f = sgd_scalars<float>(st.row(i), st.lr(i), st.mom(i), st.step_before(i), has_buffer, st.has_grad_scale,
                                 st.grad_scale);
    w.sgd_d = sgd_scalars<double>(st.row(i), st.lr(i), st.mom(i), st.step_before(i), has_buffer, st.has_grad_scale,
                                  st.grad_scale);
    const bool use_buffer = w.dtype == cpu::Dtype::Double ? w.sgd_d.use_buffer : w.sgd_f.use_buffer;
    if (!nonempty) continue;
    // a buffer that momentum 0 leaves alone is not touched (nor copied)
    w.state0 = use_buffer ? st.batch.data(momentum_buffers[i], "momentum_buffers", i, true, true) : nullptr;
    works.push_back(w);
  }
  st.finish(works, &sgd_chunk);
}

void adam_step_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                   TensorList max_exp_avg_sqs, TensorList steps, at::IntArrayRef group_ids, const Tensor& table,
                   const Tensor& counter, const std::optional<Tensor>& grad_scale,
                   const std::optional<Tensor>& found_inf) {
  Step st("adam_step_", params, grads, steps, group_ids, table, counter, grad_scale, found_inf);
  st.batch.check_list(exp_avgs, "exp_avgs");
  st.batch.check_list(exp_avg_sqs, "exp_avg_sqs");
  st.batch.check_list(max_exp_avg_sqs, "max_exp_avg_sqs");
  std::vector<cpu::TensorWork> works;
  works.reserve(params.size());
  // A tensor's constants depend only on its group, its step count and
  // whether it has max_exp_avg_sq. A group's tensors usually step together,
  // so they are computed once per run of tensors with equal ones: each set
  // costs two pow(), which take libm's slow path once beta^t underflows
  // (~10% of a planned step of 161 one-element tensors, perf).
  int64_t last_group = -1, last_step = 0;
  bool last_max = false;
  AdamScalars<float> adam_f{};
  AdamScalars<double> adam_d{};
  for (size_t i = 0; i < params.size(); ++i) {
    cpu::TensorWork w;
    if (!st.batch.begin(i, w)) continue;
    w.state0 = st.batch.data(exp_avgs[i], "exp_avgs", i, true);
    w.state1 = st.batch.data(exp_avg_sqs[i], "exp_avg_sqs", i, true);
    w.state2 = st.batch.data(max_exp_avg_sqs[i], "max_exp_avg_sqs", i, true, true);
    const bool has_max = w.state2 != nullptr;
    if (st.group(i) != last_group || st.step_before(i) != last_step || has_max != last_max) {
      last_group = st.group(i);
      last_step = st.step_before(i);
      last_max = has_max;
      adam_f = adam_scalars<float>(st.row(i), st.lr(i), st.mom(i), last_step, has_max, st.has_grad_scale,
                                   st.grad_scale);
      adam_d = adam_scalars<double>(st.row(i), st.lr(i), st.mom(i), last_step, has_max, st.has_grad_scale,
                                    st.grad_scale);
    }
    w.adam_f = adam_f;
    w.adam_d = adam_d;
    works.push_back(w);
  }
  st.finish(works, &adam_chunk);
}

// Debug / test op: [groups, 2] float64 (lr, momentum) after k applied steps,
// from schedule.h, to compare with schedule.py bit for bit.
Tensor schedule_values_cpu(const Tensor& table, int64_t k) {
  TORCH_CHECK_VALUE(k >= 0, "onecycle_fused::schedule_values: k must be >= 0, got ", k);
  const std::vector<double> v = group_schedules(table, k, "schedule_values");
  Tensor out = at::empty({table.size(0), 2}, table.options());
  std::copy(v.begin(), v.end(), out.data_ptr<double>());
  return out;
}

// ---------------------------------------------------------------------------
// StepPlan: the host side of a step, built once and reused.
//
// optimizer.step() used to rebuild 4-5 Python lists of tensors per step and
// hand them to sgd_step_ / adam_step_, which pybind converts tensor by tensor:
// about 1.6 us per parameter on the host, which *is* the step time on a GPU
// with thousands of small tensors. A StepPlan holds the lists (all but the
// grads, which are new tensors whenever zero_grad(set_to_none=True) ran) and
// step_planned_ reads the grads here in C++ from param.grad(), then calls the
// same sgd_step_ / adam_step_ through the dispatcher: one implementation for
// every device, so the CUDA kernels and their table cache are reused as is.
//
// The Python side (onecycle_fused/step_plan.py) decides when a plan is still
// valid (same groups, params, state tensors, table rows). What only C++ can
// see cheaply is checked here, per step, and any surprise returns false
// before anything is written, so that Python takes the list path, which
// raises its usual errors or rebuilds the plan:
// * every planned param has a dense grad of its own dtype, shape and device;
// * no param that had no grad when the plan was built has one now;
// * every state tensor the plan was built from is still alive. State tensors
//   (not the 0-dim step counts) are held *weakly*: a user who offloads
//   optimizer state by assignment (state['exp_avg'] = t.to('cpu')) gets the
//   memory back, and Python, which compares addresses, cannot be fooled by a
//   new tensor reusing a dead one's address (a dead one is caught here; a
//   strongly held one cannot die).
using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct StepPlan : torch::CustomClassHolder {
  // algo: "sgd" (states: momentum_buffers) or "adam" (exp_avgs, exp_avg_sqs,
  // max_exp_avg_sqs); an empty tensor in an optional list means "none", as in
  // the list ops. watched: the optimizer's params on this device that had no
  // grad when the plan was built.
  StepPlan(std::string algo, std::vector<Tensor> params, std::vector<Tensor> state0, std::vector<Tensor> state1,
           std::vector<Tensor> state2, std::vector<Tensor> steps, std::vector<int64_t> group_ids,
           std::vector<Tensor> watched, bool check_layout)
      : adam_(algo == "adam"), check_layout_(check_layout), params_(std::move(params)),
        group_ids_(std::move(group_ids)), watched_(std::move(watched)) {
    TORCH_CHECK_VALUE(algo == "sgd" || algo == "adam", "StepPlan: algo must be 'sgd' or 'adam', got '", algo, "'");
    const size_t n = params_.size();
    const size_t n_states = adam_ ? 3 : 1;
    const std::vector<Tensor>* lists[3] = {&state0, &state1, &state2};
    for (size_t s = 0; s < 3; ++s) {
      const size_t want = s < n_states ? n : 0;
      TORCH_CHECK_VALUE(lists[s]->size() == want, "StepPlan: state list ", s, " has ", lists[s]->size(),
                        " tensors, expected ", want);
      for (const Tensor& t : *lists[s]) states_[s].emplace_back(weak(t));
    }
    TORCH_CHECK_VALUE(steps.size() == n && group_ids_.size() == n, "StepPlan: ", n, " params but ", steps.size(),
                      " steps and ", group_ids_.size(), " group_ids");
    steps_ = std::move(steps);
    for (const Tensor& t : steps_) TORCH_CHECK_VALUE(t.defined(), "StepPlan: undefined step tensor");
    if (n > 0) device_ = params_[0].device();
  }

  int64_t size() const { return static_cast<int64_t>(params_.size()); }

  // True when step() would step: the grads fit and every state tensor lives.
  bool ready() const {
    PythonGil gil;
    std::vector<Tensor> grads, states[3];
    return gather(grads, states);
  }

  // One step; false (nothing touched) when the plan does not fit the grads or
  // a state tensor it was built from is gone.
  bool step(const Tensor& table, const Tensor& counter, const std::optional<Tensor>& grad_scale,
            const std::optional<Tensor>& found_inf) const {
    std::vector<Tensor> grads, states[3];
    {
      PythonGil gil;
      if (!gather(grads, states)) {
        release(grads, states);
        return false;
      }
    }
    call(grads, states, table, counter, grad_scale, found_inf);
    PythonGil gil;
    release(grads, states);
    return true;  // the grads were released: set_to_none frees their memory as before
  }

 private:
  // A tensor that only Python holds (a state tensor: the plan's reference is
  // weak) has C++ refcount 1; taking a C++ reference makes it 2, and torch
  // then increfs its PyObject (and decrefs it on the way back), taking the
  // GIL each time, which torch.ops released before calling us: measured, a
  // take_gil/drop_gil pair per tensor cost more than all the rest of the
  // op. So the GIL is held around the references taken and dropped, once per
  // step, and not around the kernels.
  struct PythonGil {
    PythonGil() : held_(Py_IsInitialized() && !PyGILState_Check()) {
      if (held_) state_ = PyGILState_Ensure();
    }
    ~PythonGil() {
      if (held_) PyGILState_Release(state_);
    }
    PythonGil(const PythonGil&) = delete;
    PythonGil& operator=(const PythonGil&) = delete;
    bool held_;
    PyGILState_STATE state_{};
  };

  static void release(std::vector<Tensor>& grads, std::vector<Tensor> (&states)[3]) {
    grads.clear();
    for (auto& s : states) s.clear();
  }

  void call(const std::vector<Tensor>& grads, const std::vector<Tensor> (&states)[3],
            const Tensor& table, const Tensor& counter,
            const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) const {
    // Straight to the device kernel: through the Autograd / ADInplaceOrView
    // keys these ops (no derivative, no version-counter bumps: the list path
    // bumps none either) only meet torch's boxed fallbacks, which turn every
    // tensor of the lists into an IValue and back.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (adam_) {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("onecycle_fused::adam_step_", "")
                           .typed<void(TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
                                       at::IntArrayRef, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                       const std::optional<Tensor>&)>();
      op.call(params_, grads, states[0], states[1], states[2], steps_, group_ids_, table, counter, grad_scale,
              found_inf);
    } else {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("onecycle_fused::sgd_step_", "")
                           .typed<void(TensorList, TensorList, TensorList, TensorList, at::IntArrayRef,
                                       const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                       const std::optional<Tensor>&)>();
      op.call(params_, grads, states[0], steps_, group_ids_, table, counter, grad_scale, found_inf);
    }
  }

  bool gather(std::vector<Tensor>& grads, std::vector<Tensor> (&states)[3]) const {
    for (const Tensor& w : watched_) {
      if (w.grad().defined()) return false;  // a new grad: the lists must grow
    }
    grads.reserve(params_.size());
    for (const Tensor& p : params_) {
      const Tensor& g = p.grad();
      // anything unusual goes to the list path, which raises the clear error
      // (a param moved in place, module.cuda(), is on another device than the
      // plan's counter and states: the list path follows it)
      if (!g.defined() || g.layout() != at::kStrided || g.scalar_type() != p.scalar_type() ||
          g.device() != p.device() || p.device() != device_ || g.sizes() != p.sizes()) {
        return false;
      }
      grads.push_back(g);
    }
    for (size_t s = 0; s < 3; ++s) {
      if (!lock_all(states_[s], states[s])) return false;
    }
    if (check_layout_) {
      // a parameter whose memory format changed since the plan was built
      // (p.data replaced: model.to(memory_format=...)) while its states kept
      // theirs: the CUDA op would refuse them; the list path lays them out
      for (size_t s = 0; s < 3; ++s) {
        for (size_t i = 0; i < states[s].size(); ++i) {
          // (equal strides first: the usual case, a few ns; empty: "none")
          const Tensor& t = states[s][i];
          if (t.numel() != 0 && t.strides() != params_[i].strides() && !same_layout(t, params_[i])) return false;
        }
      }
    }
    return true;
  }

  static WeakTensor weak(const Tensor& t) {
    TORCH_CHECK_VALUE(t.defined(), "StepPlan: undefined tensor (use an empty tensor for 'none')");
    return WeakTensor(t.getIntrusivePtr());
  }

  static bool lock_all(const std::vector<WeakTensor>& weak, std::vector<Tensor>& out) {
    out.reserve(weak.size());
    for (const WeakTensor& w : weak) {
      auto impl = w.lock();
      if (!impl.defined()) return false;
      out.emplace_back(std::move(impl));
    }
    return true;
  }

  bool adam_;
  bool check_layout_;  // states must keep their parameter's layout (the CUDA op's rule)
  std::vector<Tensor> params_;
  std::vector<WeakTensor> states_[3];
  // held strongly: 0-dim, nothing to offload, and a C++ reference kept
  // makes passing them cost nothing (a reference taken per step from a
  // Python-only tensor costs a PyObject incref, see PythonGil)
  std::vector<Tensor> steps_;
  std::vector<int64_t> group_ids_;
  std::vector<Tensor> watched_;
  c10::Device device_{c10::kCPU};  // where the params were when the plan was built
};

bool step_planned(const c10::intrusive_ptr<StepPlan>& plan, const Tensor& table, const Tensor& counter,
                  const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  return plan->step(table, counter, grad_scale, found_inf);
}

// "AVX2": one variant for every dtype; "AVX2/AVX512": float32-float64 / bfloat16-float16
std::string cpu_capability() {
  const Variants& v = variants();
  const std::string wide = v.wide->capability, reduced = v.reduced->capability;
  return wide == reduced ? wide : wide + "/" + reduced;
}

}  // namespace
}  // namespace onecycle_fused

TORCH_LIBRARY(onecycle_fused, m) {
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] steps, "
      "int[] group_ids, Tensor table, Tensor(d!) counter, Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, int[] group_ids, Tensor table, Tensor(f!) counter, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def("schedule_values(Tensor table, int k) -> Tensor");
  // which vectorized CPU kernels this process uses (DEFAULT / AVX2 / AVX512)
  m.def("cpu_capability() -> str", &onecycle_fused::cpu_capability);
  // the host side of a step, cached (see StepPlan above); eager only: it is
  // never traced (no fake kernel), the optimizer uses the list ops under
  // torch.compile
  m.class_<onecycle_fused::StepPlan>("StepPlan")
      .def(torch::init<std::string, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>,
                       std::vector<at::Tensor>, bool>())
      .def("__len__", &onecycle_fused::StepPlan::size)
      .def("ready", &onecycle_fused::StepPlan::ready)
      // step_planned_ as a method: what step_plan.run_planned calls. Through
      // the op, torch looks for __torch_function__ on every argument, and on
      // the plan (a ScriptObject) that lookup fails by a C++ exception: ~7 us
      // of a ~9 us call, every step, on every device
      .def("step", &onecycle_fused::StepPlan::step);
  m.def(
      "step_planned_(__torch__.torch.classes.onecycle_fused.StepPlan plan, Tensor table, Tensor(a!) counter, "
      "Tensor? grad_scale, Tensor? found_inf) -> bool");
}

// One kernel for every device: it calls sgd_step_ / adam_step_, which
// dispatch to the CPU or CUDA implementation by the params' device.
TORCH_LIBRARY_IMPL(onecycle_fused, CompositeExplicitAutograd, m) {
  m.impl("step_planned_", &onecycle_fused::step_planned);
}

TORCH_LIBRARY_IMPL(onecycle_fused, CPU, m) {
  m.impl("sgd_step_", &onecycle_fused::sgd_step_cpu);
  m.impl("adam_step_", &onecycle_fused::adam_step_cpu);
  m.impl("schedule_values", &onecycle_fused::schedule_values_cpu);
}
