// One kernel launch over a device-resident table of tensors.
//
// CUDA runtime headers only, no ATen: the kernel and the table layout
// (with its host-side image builder) compile on their own, with nvcc for the
// GPU or with a host compiler for the CPU emulation CI runs
// (csrc/cuda/cpu_emulation.cuh). Checking inputs, caching and uploading the
// tables is csrc/cuda/tensor_table.{cuh,cu}.
//
// Layout of a table (one device allocation, built once per set of storages):
//
//   [ TableHeader | TensorSlot[n] | int64 chunk_start[n + 1] ]
//
// Every tensor is cut into chunks of `chunk_elems<T>()` elements; chunk_start
// is the prefix sum of the chunk counts, so global chunk c belongs to the
// tensor t with chunk_start[t] <= c < chunk_start[t + 1]. A grid of at most
// a few blocks per SM walks the chunks grid-stride, so one launch covers any
// number of tensors of any size (torch and apex split at ~36-110 tensors and
// rebuild their argument structs on the host every step instead).
//
// Step bookkeeping happens on the device. Every block reads the counter and
// the per-tensor step counts *before* anything advances them; the last block
// to finish (atomic done-count after a __threadfence) advances each tensor's
// step and, for the last dtype bucket of the device, the counter, then resets
// the done-count for the next launch. One launch, no second kernel, no host
// value: a CUDA graph replays it with the schedule advancing.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "schedule.h"

namespace onecycle_fused {
namespace mt {

// 512 threads x 4 vectors of 16 bytes per chunk: 8192 fp32 / 16384 bf16 /
// 4096 fp64 elements, i.e. 32 KiB of each array per chunk. Small enough that a few
// thousand small tensors spread over the grid, large enough that the
// per-chunk scalar work (schedule and bias corrections on one thread) is
// noise next to the memory traffic.
#ifndef ONECYCLE_MT_BLOCK_THREADS  // the CPU emulation uses 32: cheaper, more chunks
#define ONECYCLE_MT_BLOCK_THREADS 512
#endif
constexpr int kBlockThreads = ONECYCLE_MT_BLOCK_THREADS;
constexpr int kVecsPerThread = 4;
constexpr int kVecBytes = 16;
// Blocks per SM for the grid-stride grid: 2048 threads per SM is the sm_80 /
// sm_90 limit, but at the 64-register cap below only 2 blocks of 512 are
// resident at once (65536 registers), so the grid runs as two waves of
// equal work; to be measured on a GPU against kBlocksPerSM = 2 (one wave).
constexpr int kBlocksPerSM = 4;
// At least two blocks resident per SM (registers capped at 64 per thread):
// with one, the SM idles while thread 0 reads a step count / evaluates the
// schedule between chunks. Without the cap the bf16 Adam kernel took 128
// registers, i.e. one block per SM (ptxas -v, sm_90).
constexpr int kMinBlocksPerSM = 2;

template <typename T>
constexpr int vec_elems() {
  return kVecBytes / static_cast<int>(sizeof(T));
}

template <typename T>
constexpr int64_t chunk_elems() {
  return static_cast<int64_t>(kBlockThreads) * kVecsPerThread * vec_elems<T>();
}

// The tensors one parameter needs. Unused state pointers are null (SGD uses
// s0 = momentum buffer; Adam s0 = exp_avg, s1 = exp_avg_sq, s2 =
// max_exp_avg_sq). 64 bytes, so the slot array stays 16-byte aligned.
struct alignas(16) TensorSlot {
  void* param;
  const void* grad;
  void* s0;
  void* s1;
  void* s2;
  int64_t* step;  // int64 0-dim, advanced by the last block
  int64_t numel;
  int32_t group;  // row of the schedule table
  int32_t vec_ok;  // 1: every pointer above is 16-byte aligned
};
static_assert(sizeof(TensorSlot) == 64, "TensorSlot layout is shared with the host");

struct alignas(16) TableHeader {
  unsigned int done;  // blocks finished in the running launch; 0 between launches
  int32_t num_tensors;
  int64_t total_chunks;
};
static_assert(sizeof(TableHeader) == 16, "TableHeader layout is shared with the host");

// Byte offsets inside a table of n tensors (host and device agree on these).
__host__ __device__ inline int64_t slots_offset() { return sizeof(TableHeader); }
__host__ __device__ inline int64_t chunk_start_offset(int64_t n) {
  return slots_offset() + n * static_cast<int64_t>(sizeof(TensorSlot));
}
__host__ __device__ inline int64_t table_bytes(int64_t n) {
  // rounded up to 16 bytes so that the upload kernel copies whole words
  const int64_t end = chunk_start_offset(n) + (n + 1) * static_cast<int64_t>(sizeof(int64_t));
  return (end + 15) / 16 * 16;
}

// 1 when every pointer of the slot allows 16-byte vector accesses.
inline int32_t slot_vec_ok(const TensorSlot& s) {
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; };
  return aligned(s.param) && aligned(s.grad) && aligned(s.s0) && aligned(s.s1) && aligned(s.s2) ? 1 : 0;
}

// The table's bytes for `slots` (host side): header, slots, prefix sums of
// the chunk counts with `chunk` elements per chunk. Returned as 8-byte words
// (table_bytes(n) / 8 of them); *total_chunks receives the chunk count.
inline std::vector<uint64_t> build_table_image(const std::vector<TensorSlot>& slots, int64_t chunk,
                                               int64_t* total_chunks) {
  const int64_t n = static_cast<int64_t>(slots.size());
  std::vector<uint64_t> words(static_cast<size_t>(table_bytes(n) / 8), 0);
  auto* base = reinterpret_cast<unsigned char*>(words.data());
  std::vector<int64_t> start(static_cast<size_t>(n) + 1, 0);
  for (int64_t i = 0; i < n; ++i) start[i + 1] = start[i] + (slots[i].numel + chunk - 1) / chunk;
  TableHeader header{};
  header.done = 0;
  header.num_tensors = static_cast<int32_t>(n);
  header.total_chunks = start[n];
  std::memcpy(base, &header, sizeof(header));
  if (n > 0) std::memcpy(base + slots_offset(), slots.data(), n * sizeof(TensorSlot));
  std::memcpy(base + chunk_start_offset(n), start.data(), (n + 1) * sizeof(int64_t));
  *total_chunks = start[n];
  return words;
}

// Arguments of one launch. Everything that may change from step to step
// (GradScaler's tensors, the schedule table, which is rebuilt when a
// hyper-parameter changes) is passed by value here, not cached in the table.
struct LaunchArgs {
  unsigned char* table;  // the device table above
  const double* rows;  // float64 [groups, row::WIDTH], contiguous
  int64_t* counter;  // int64 0-dim: optimizer steps applied so far
  const float* grad_scale;  // null: grads are not scaled
  const float* found_inf;  // null: never skip
  int advance_counter;  // 1 for the last dtype bucket of the device
};

// ---------------------------------------------------------------------------
// element conversions: to the "opmath" type (float for fp32/bf16/fp16, double
// for fp64, as torch.optim computes), stored back with round-to-nearest-even

template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

__device__ __forceinline__ float to_opmath(float x) { return x; }
__device__ __forceinline__ float to_opmath(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_opmath(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_opmath(double x) { return x; }

template <typename T>
__device__ __forceinline__ T from_opmath(opmath_t<T> x);
template <>
__device__ __forceinline__ float from_opmath<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_opmath<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_opmath<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ double from_opmath<double>(double x) { return x; }

// The CPU emulation of this kernel (csrc/cuda/cpu_emulation.cuh) defines
// this to count, and skip, any vector access off a 16-byte boundary, which
// on a GPU would fault; the CUDA build compiles it away. Used as a statement
// in a void function, before the access.
#ifndef ONECYCLE_CHECK_VEC_ALIGNED
#define ONECYCLE_CHECK_VEC_ALIGNED(address) ((void)0)
#endif

// N = vec_elems<T>() elements through one 16-byte access. Only called when
// the address is 16-byte aligned (the slot's vec_ok and a chunk-aligned
// offset guarantee it).
template <typename T>
__device__ __forceinline__ void load_vec(const void* base, int64_t i, opmath_t<T>* out) {
  constexpr int N = vec_elems<T>();
  union {
    uint4 raw;
    T v[N];
  } u;
  ONECYCLE_CHECK_VEC_ALIGNED(static_cast<const T*>(base) + i);
  u.raw = *reinterpret_cast<const uint4*>(static_cast<const T*>(base) + i);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_opmath(u.v[j]);
}

template <typename T>
__device__ __forceinline__ void store_vec(void* base, int64_t i, const opmath_t<T>* in) {
  constexpr int N = vec_elems<T>();
  union {
    uint4 raw;
    T v[N];
  } u;
#pragma unroll
  for (int j = 0; j < N; ++j) u.v[j] = from_opmath<T>(in[j]);
  ONECYCLE_CHECK_VEC_ALIGNED(static_cast<T*>(base) + i);
  *reinterpret_cast<uint4*>(static_cast<T*>(base) + i) = u.raw;
}

template <typename T>
__device__ __forceinline__ opmath_t<T> load_one(const void* base, int64_t i) {
  return to_opmath(static_cast<const T*>(base)[i]);
}

template <typename T>
__device__ __forceinline__ void store_one(void* base, int64_t i, opmath_t<T> x) {
  static_cast<T*>(base)[i] = from_opmath<T>(x);
}

// The tensor that global chunk c belongs to: the last t with
// chunk_start[t] <= c (empty tensors own no chunk and are stepped over).
__device__ __forceinline__ int find_tensor(const int64_t* chunk_start, int n, int64_t c) {
  int lo = 0, hi = n;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (chunk_start[mid] <= c) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// ---------------------------------------------------------------------------
// The kernel.
//
// Op (an algorithm: csrc/cuda/step_ops.cuh) provides, for the opmath type S
// (opmath_t<T>: float, or double for fp64 parameters)
//   template <typename S> using Coef;  per-chunk scalars, trivially copyable
//       (lives in shared memory)
//   template <typename S>
//   static __device__ void coefficients(const double* row, int64_t k, int64_t step,
//                                       int flags, bool scaled, float scale, Coef<S>& c);
//       k: optimizer steps applied (the counter); step: this tensor's step
//       count before this step; flags: kHasS0 / kHasS2 (which optional states
//       the tensor has); scale: GradScaler's scale when `scaled`. A function
//       of its arguments only, so a block reuses it while (group, step,
//       flags) stay the same. Runs on one thread per chunk.
//   template <typename S>
//   static __device__ void update(const Coef<S>& c, S& p, S g, S& s0, S& s1, S& s2);
//       one element in opmath (grad not yet unscaled: Coef carries the scale);
//       states the tensor lacks are passed as 0 and not stored.

constexpr int kHasS0 = 1;
constexpr int kHasS2 = 2;

__device__ __forceinline__ int slot_flags(const TensorSlot& s) {
  return (s.s0 != nullptr ? kHasS0 : 0) | (s.s2 != nullptr ? kHasS2 : 0);
}

template <typename Op, typename S>
using coef_t = typename Op::template Coef<S>;

template <typename T, typename Op>
__device__ __forceinline__ void update_scalar(const coef_t<Op, opmath_t<T>>& c, const TensorSlot& s, int64_t i) {
  using S = opmath_t<T>;
  S p = load_one<T>(s.param, i);
  const S g = load_one<T>(s.grad, i);
  S a = s.s0 ? load_one<T>(s.s0, i) : S(0);
  S b = s.s1 ? load_one<T>(s.s1, i) : S(0);
  S m = s.s2 ? load_one<T>(s.s2, i) : S(0);
  Op::update(c, p, g, a, b, m);
  store_one<T>(s.param, i, p);
  if (s.s0) store_one<T>(s.s0, i, a);
  if (s.s1) store_one<T>(s.s1, i, b);
  if (s.s2) store_one<T>(s.s2, i, m);
}

template <typename T, typename Op>
__device__ __forceinline__ void update_vector(const coef_t<Op, opmath_t<T>>& c, const TensorSlot& s, int64_t i) {
  using S = opmath_t<T>;
  constexpr int N = vec_elems<T>();
  S p[N], g[N], a[N], b[N], m[N];
  // all loads first, then the math, then all stores: the loads of one
  // vector are in flight together
  load_vec<T>(s.param, i, p);
  load_vec<T>(s.grad, i, g);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    a[j] = S(0);
    b[j] = S(0);
    m[j] = S(0);
  }
  if (s.s0) load_vec<T>(s.s0, i, a);
  if (s.s1) load_vec<T>(s.s1, i, b);
  if (s.s2) load_vec<T>(s.s2, i, m);
#pragma unroll
  for (int j = 0; j < N; ++j) Op::update(c, p[j], g[j], a[j], b[j], m[j]);
  store_vec<T>(s.param, i, p);
  if (s.s0) store_vec<T>(s.s0, i, a);
  if (s.s1) store_vec<T>(s.s1, i, b);
  if (s.s2) store_vec<T>(s.s2, i, m);
}

// Out of line: the float64 schedule and pow() of the bias corrections need
// many registers, the element loop few; inlined, the loop would be
// allocated (and spill) for the worst of both.
template <typename Op, typename S>
__device__ __noinline__ void compute_coefficients(const double* row, int64_t k, int64_t step, int flags, bool scaled,
                                                  float scale, coef_t<Op, S>* out) {
  Op::coefficients(row, k, step, flags, scaled, scale, *out);
}

template <typename T, typename Op>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) multi_tensor_step_kernel(LaunchArgs args) {
  // A skipped step (GradScaler found an inf/nan) changes nothing: every
  // block sees the same flag and leaves, so the done-count stays 0 too.
  if (args.found_inf != nullptr && *args.found_inf != 0.f) return;

  auto* header = reinterpret_cast<TableHeader*>(args.table);
  const TensorSlot* slots = reinterpret_cast<const TensorSlot*>(args.table + slots_offset());
  const int n = header->num_tensors;
  const int64_t* chunk_start = reinterpret_cast<const int64_t*>(args.table + chunk_start_offset(n));
  const int64_t total_chunks = header->total_chunks;

  const bool scaled = args.grad_scale != nullptr;

  using S = opmath_t<T>;
  __shared__ coef_t<Op, S> coef_shared;
  __shared__ int is_last_block;

  // coef_shared keeps the last (group, step, flags) thread 0 evaluated, so
  // that consecutive chunks of one tensor, or of tensors of one group, do
  // not redo the float64 schedule / bias corrections. The counter is read
  // once, before any block can have advanced it (the last block does, at the
  // end).
  const int64_t k = threadIdx.x == 0 ? *args.counter : 0;
  int cached_group = -1;
  int64_t cached_step = -1;
  int cached_flags = -1;

  constexpr int64_t kChunk = chunk_elems<T>();
  constexpr int N = vec_elems<T>();
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int t = find_tensor(chunk_start, n, c);
    const TensorSlot s = slots[t];
    if (threadIdx.x == 0) {
      const int64_t step = *s.step;
      const int flags = slot_flags(s);
      if (s.group != cached_group || step != cached_step || flags != cached_flags) {
        compute_coefficients<Op, S>(args.rows + static_cast<int64_t>(s.group) * row::WIDTH, k, step, flags, scaled,
                                 scaled ? *args.grad_scale : 1.f, &coef_shared);
        cached_group = s.group;
        cached_step = step;
        cached_flags = flags;
      }
    }
    __syncthreads();
    const coef_t<Op, S> coef = coef_shared;

    const int64_t begin = (c - chunk_start[t]) * kChunk;
    const int64_t end = begin + kChunk < s.numel ? begin + kChunk : s.numel;
    if (s.vec_ok) {
      // begin is a multiple of N, so every full vector is 16-byte aligned;
      // the thread holding a partial last vector finishes it element-wise
      for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * N; i < end; i += kBlockThreads * N) {
        if (i + N <= end) {
          update_vector<T, Op>(coef, s, i);
        } else {
          for (int64_t j = i; j < end; ++j) update_scalar<T, Op>(coef, s, j);
        }
      }
    } else {
      for (int64_t i = begin + threadIdx.x; i < end; i += kBlockThreads) update_scalar<T, Op>(coef, s, i);
    }
    __syncthreads();  // coef_shared may be rewritten for the next chunk
  }

  // ---- the last block to finish advances the step counts
  if (gridDim.x > 1) {
    if (threadIdx.x == 0) {
      // every read of a step count / the counter by this block is done (they
      // fed coef_shared before a barrier); make this block's writes visible
      // before it is counted
      __threadfence();
      const unsigned int prev = atomicAdd(&header->done, 1u);
      is_last_block = (prev == gridDim.x - 1) ? 1 : 0;
    }
    __syncthreads();
    if (!is_last_block) return;
    __threadfence();
  }
  // (oc_next_step: wraps at 2^63 like torch's int64 add, no signed overflow)
  for (int i = threadIdx.x; i < n; i += blockDim.x) *slots[i].step = oc_next_step(*slots[i].step);
  if (threadIdx.x == 0) {
    if (args.advance_counter) *args.counter = oc_next_step(*args.counter);
    header->done = 0;  // ready for the next launch (stream-ordered)
  }
}

}  // namespace mt
}  // namespace onecycle_fused
