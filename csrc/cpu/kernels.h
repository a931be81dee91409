// Interface between the op (csrc/ops.cpp, compiled with the default flags)
// and the vectorized CPU kernels (csrc/cpu/kernels.inc), which are compiled
// once per CPU capability (kernels_default.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp) like ATen's own kernels. Only plain structs and raw
// pointers cross this boundary, never an at::vec type or a Tensor.
#pragma once

#include <cstdint>

#include "../update.h"

namespace onecycle_fused {
namespace cpu {

enum class Dtype : int32_t { Float = 0, Double = 1, BFloat16 = 2, Half = 3 };

// One tensor's update: pointers to contiguous (dense, same-strided) data of
// `numel` elements, and its per-tensor scalars (the float set for
// fp32/bf16/fp16, the double set for fp64).
struct TensorWork {
  void* param;
  const void* grad;
  void* state0;  // SGD: momentum buffer (null: none); Adam: exp_avg
  void* state1;  // Adam: exp_avg_sq
  void* state2;  // Adam: max_exp_avg_sq (null: no amsgrad)
  int64_t numel;
  Dtype dtype;
  SgdScalars<float> sgd_f;
  SgdScalars<double> sgd_d;
  AdamScalars<float> adam_f;
  AdamScalars<double> adam_d;
};

// Update elements [begin, end) of one tensor.
using ChunkFn = void (*)(const TensorWork& work, int64_t begin, int64_t end);

struct Kernels {
  ChunkFn sgd;
  ChunkFn adam;
  const char* capability;
};

// One per compiled capability; null where a capability was not compiled in.
const Kernels* kernels_DEFAULT();
const Kernels* kernels_AVX2();
const Kernels* kernels_AVX512();

}  // namespace cpu
}  // namespace onecycle_fused
