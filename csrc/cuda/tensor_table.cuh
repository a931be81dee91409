// Host side of the multi-tensor launch (csrc/multi_tensor.cuh): checks an op
// call's tensors, groups them by dtype, finds or builds each bucket's device
// table, and launches one kernel per bucket on the current stream.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls
// in cuBLAS/cuSPARSE headers a bare CUDA toolkit may lack), so the check in
// tools/check_cuda_compile.sh compiles this glue against a CPU wheel's
// headers too.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../multi_tensor.cuh"

namespace onecycle_fused {
namespace cuda_impl {

// The tensors of one op call, as the op received them.
struct StepInputs {
  const char* op;  // op name, for error messages
  at::TensorList params;
  at::TensorList grads;
  // up to 3 per-parameter state lists, in TensorSlot order s0, s1, s2; an
  // undefined/empty TensorList means the algorithm has no such state
  at::TensorList states[3];
  // per state list: true if an empty tensor means "this parameter has none"
  bool optional_state[3];
  const char* state_names[3];
  at::TensorList steps;
  at::IntArrayRef group_ids;
  const at::Tensor& table;
  const at::Tensor& counter;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
};

// One dtype bucket, ready to launch.
struct Bucket {
  at::ScalarType dtype;
  unsigned char* table;  // device table (kept alive by the cache)
  int64_t total_chunks;
};

struct Prepared {
  std::vector<Bucket> buckets;  // in launch order; the last advances the counter
  mt::LaunchArgs args;  // everything but `table` / `advance_counter`
  // tensors made here (a grad_scale / found_inf converted to float32) that
  // must outlive the launches
  std::vector<at::Tensor> keep;
};

// Checks the inputs (ValueError naming the bad argument) and returns the
// buckets. The current device must be the counter's (the caller holds a
// CUDAGuard). Uploads a table only when a bucket's set of storages is new.
Prepared prepare_step(const StepInputs& in, const c10::cuda::CUDAStream& stream);

// Grid size for a bucket: a few blocks per SM, never more than the chunks,
// at least one (the last block also advances the step counts).
int grid_size(int64_t total_chunks);

// One launch per bucket of prepare_step's result, Op's kernel for each
// bucket's dtype. Only the last bucket advances the counter, after every
// block of the earlier (stream-ordered) launches has read it.
template <typename Op>
void launch_step(const StepInputs& in) {
  // before the guard, which would raise a RuntimeError of its own (or crash
  // on an undefined tensor) for a counter that is not a CUDA tensor, e.g. a
  // CPU counter with CUDA params (the op dispatches to CUDA by the params)
  TORCH_CHECK_VALUE(in.counter.defined() && in.counter.is_cuda(), in.op, ": counter must be a CUDA tensor, got ",
                    in.counter.defined() ? in.counter.device().str() : std::string("an undefined tensor"));
  const c10::cuda::CUDAGuard guard(in.counter.device());
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream();
  const cudaStream_t stream = current.stream();
  Prepared prep = prepare_step(in, current);
  for (size_t b = 0; b < prep.buckets.size(); ++b) {
    const Bucket& bucket = prep.buckets[b];
    mt::LaunchArgs args = prep.args;
    args.table = bucket.table;
    args.advance_counter = b + 1 == prep.buckets.size() ? 1 : 0;
    const dim3 grid(grid_size(bucket.total_chunks));
    const dim3 block(mt::kBlockThreads);
    switch (bucket.dtype) {
      case at::kFloat:
        mt::multi_tensor_step_kernel<float, Op><<<grid, block, 0, stream>>>(args);
        break;
      case at::kHalf:
        mt::multi_tensor_step_kernel<__half, Op><<<grid, block, 0, stream>>>(args);
        break;
      case at::kBFloat16:
        mt::multi_tensor_step_kernel<__nv_bfloat16, Op><<<grid, block, 0, stream>>>(args);
        break;
      case at::kDouble:
        mt::multi_tensor_step_kernel<double, Op><<<grid, block, 0, stream>>>(args);
        break;
      default:
        TORCH_CHECK(false, in.op, ": internal error, unexpected bucket dtype ", bucket.dtype);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace cuda_impl
}  // namespace onecycle_fused
