// The CUDA step kernel run on the CPU, so that CI (no GPU) executes the very
// kernel source nvcc compiles: multi_tensor.cuh's multi_tensor_step_kernel
// with step_ops.cuh's algorithms over a table from build_table_image. Only
// the CUDA built-ins are replaced:
//   * each CUDA thread is a std::thread, 32 per block (see below); the
//     blocks of a grid run one after another (so the "last block" is the
//     last one run);
//   * __syncthreads is a barrier of the block's threads;
//   * __shared__ variables are function statics (one block uses them at a
//     time), atomics and fences are the host's.
// A vector access off a 16-byte boundary (a fault on a GPU) makes the op
// raise. What it cannot show: real concurrency between blocks, the memory
// model of the GPU, performance. Compiled by a host compiler only:
// tests/test_cuda_backend.py builds it with torch.utils.cpp_extension and
// registers onecycle_fused_emu::step. Never include it in a .cu file.
#pragma once
#if defined(__CUDACC__)
#error "cpu_emulation.cuh is for a host compiler"
#endif

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// CUDA qualifiers for a host compiler (after the CUDA headers, which define
// them as attributes g++ ignores: __shared__ must really be shared)
#undef __host__
#undef __device__
#undef __global__
#undef __shared__
#undef __launch_bounds__
#undef __noinline__
#undef __forceinline__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline __attribute__((always_inline))
#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __launch_bounds__(...)

namespace onecycle_fused {
namespace emu {

struct Dim {
  unsigned int x = 0, y = 0, z = 0;
};
inline thread_local Dim thread_idx;
inline Dim block_idx, grid_dim, block_dim;

class Barrier {
 public:
  explicit Barrier(unsigned int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const unsigned int generation = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  const unsigned int n_;
  unsigned int arrived_ = 0;
  unsigned int generation_ = 0;
};
inline Barrier* block_barrier = nullptr;

// vector accesses off a 16-byte boundary (a fault on a GPU), counted and
// not made: the host compiler emits aligned SSE moves for uint4, so the
// access itself would kill the test process with SIGSEGV instead of making
// the op raise
inline std::atomic<int64_t> misaligned_vector_accesses{0};
inline bool vec_aligned_or_count(const void* address) {
  if (reinterpret_cast<uintptr_t>(address) % 16 == 0) return true;
  misaligned_vector_accesses.fetch_add(1);
  return false;
}

}  // namespace emu
}  // namespace onecycle_fused

// (a statement in load_vec / store_vec: skips the access, the op raises at the end)
#define ONECYCLE_CHECK_VEC_ALIGNED(address) \
  if (!::onecycle_fused::emu::vec_aligned_or_count(address)) return

#define threadIdx (::onecycle_fused::emu::thread_idx)
#define blockIdx (::onecycle_fused::emu::block_idx)
#define gridDim (::onecycle_fused::emu::grid_dim)
#define blockDim (::onecycle_fused::emu::block_dim)
inline void __syncthreads() { ::onecycle_fused::emu::block_barrier->wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}

// 32 threads per block instead of 512: every loop of the kernel strides by
// kBlockThreads, so the logic is the same, with chunks of 512 fp32 / 1024
// bf16 elements (more chunks per test tensor) and 16x fewer threads to wake
// at each __syncthreads
#define ONECYCLE_MT_BLOCK_THREADS 32
#include "step_ops.cuh"

namespace onecycle_fused {
namespace emu {

// kernel(args) over `grid` blocks of `threads` threads.
template <typename Args>
void launch(void (*kernel)(Args), unsigned int grid, unsigned int threads, const Args& args) {
  grid_dim.x = grid;
  block_dim.x = threads;
  for (unsigned int b = 0; b < grid; ++b) {
    block_idx.x = b;
    Barrier barrier(threads);
    block_barrier = &barrier;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned int t = 0; t < threads; ++t) {
      pool.emplace_back([kernel, &args, t] {
        thread_idx.x = t;
        kernel(args);
      });
    }
    for (auto& th : pool) th.join();
  }
}

// One launch for tensors of one dtype (the caller buckets them, as
// cuda_impl::prepare_step does): the slots and table as the CUDA op builds
// them, but with CPU pointers. An empty tensor in s0/s1/s2 means "none".
inline void emulated_step(const std::string& algo, at::TensorList params, at::TensorList grads, at::TensorList s0,
                          at::TensorList s1, at::TensorList s2, at::TensorList steps, at::IntArrayRef group_ids,
                          const at::Tensor& table, const at::Tensor& counter,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                          int64_t grid, bool advance_counter) {
  const at::ScalarType dtype = params.empty() ? at::kFloat : params[0].scalar_type();
  auto ptr = [](at::TensorList list, size_t i, const at::Tensor& p) -> void* {
    if (list.empty() || !list[i].defined() || list[i].numel() == 0 || p.numel() == 0) return nullptr;
    return list[i].data_ptr();
  };
  std::vector<mt::TensorSlot> slots;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == dtype && p.is_contiguous() && grads[i].is_contiguous(), "emulated_step: bad input ",
                i);
    mt::TensorSlot s{};
    s.param = p.data_ptr();
    s.grad = grads[i].data_ptr();
    s.s0 = ptr(s0, i, p);
    s.s1 = ptr(s1, i, p);
    s.s2 = ptr(s2, i, p);
    s.step = steps[i].data_ptr<int64_t>();
    s.numel = p.numel();
    s.group = static_cast<int32_t>(group_ids[i]);
    s.vec_ok = mt::slot_vec_ok(s);
    slots.push_back(s);
  }
  const int64_t chunk = dtype == at::kFloat    ? mt::chunk_elems<float>()
                        : dtype == at::kDouble ? mt::chunk_elems<double>()
                                               : mt::chunk_elems<__half>();
  int64_t total = 0;
  const std::vector<uint64_t> words = mt::build_table_image(slots, chunk, &total);
  // torch's CPU allocator aligns to 64 bytes, like a device allocation
  at::Tensor image = at::empty({static_cast<int64_t>(words.size() * 8)}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(image.data_ptr(), words.data(), words.size() * 8);
  const at::Tensor rows = table.contiguous();

  mt::LaunchArgs args;
  args.table = static_cast<unsigned char*>(image.data_ptr());
  args.rows = rows.data_ptr<double>();
  args.counter = counter.data_ptr<int64_t>();
  args.grad_scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  args.found_inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  args.advance_counter = advance_counter ? 1 : 0;
  // the CUDA launcher's grid: a few blocks per SM, at most the chunks
  const unsigned int blocks = static_cast<unsigned int>(grid > 0 ? grid : std::max<int64_t>(1, std::min<int64_t>(total, 4)));
  const bool sgd = algo == "sgd";
  TORCH_CHECK(sgd || algo == "adam", "emulated_step: algo must be sgd or adam");
  switch (dtype) {
    case at::kFloat:
      launch(sgd ? &mt::multi_tensor_step_kernel<float, cuda_impl::SgdOp>
                 : &mt::multi_tensor_step_kernel<float, cuda_impl::AdamOp>,
             blocks, mt::kBlockThreads, args);
      break;
    case at::kHalf:
      launch(sgd ? &mt::multi_tensor_step_kernel<__half, cuda_impl::SgdOp>
                 : &mt::multi_tensor_step_kernel<__half, cuda_impl::AdamOp>,
             blocks, mt::kBlockThreads, args);
      break;
    case at::kBFloat16:
      launch(sgd ? &mt::multi_tensor_step_kernel<__nv_bfloat16, cuda_impl::SgdOp>
                 : &mt::multi_tensor_step_kernel<__nv_bfloat16, cuda_impl::AdamOp>,
             blocks, mt::kBlockThreads, args);
      break;
    case at::kDouble:
      launch(sgd ? &mt::multi_tensor_step_kernel<double, cuda_impl::SgdOp>
                 : &mt::multi_tensor_step_kernel<double, cuda_impl::AdamOp>,
             blocks, mt::kBlockThreads, args);
      break;
    default:
      TORCH_CHECK(false, "emulated_step: dtype ", dtype);
  }
  const int64_t misaligned = misaligned_vector_accesses.exchange(0);
  TORCH_CHECK(misaligned == 0, "emulated_step: ", misaligned, " vector accesses were not 16-byte aligned");
}

}  // namespace emu
}  // namespace onecycle_fused

TORCH_LIBRARY(onecycle_fused_emu, m) {
  m.def(
      "step(str algo, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] s0, Tensor(c!)[] s1, Tensor(d!)[] s2, "
      "Tensor(e!)[] steps, int[] group_ids, Tensor table, Tensor(f!) counter, Tensor? grad_scale, "
      "Tensor? found_inf, int grid, bool advance_counter) -> ()");
}

TORCH_LIBRARY_IMPL(onecycle_fused_emu, CPU, m) { m.impl("step", &onecycle_fused::emu::emulated_step); }
