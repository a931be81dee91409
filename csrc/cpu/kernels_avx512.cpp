// CPU kernels for AVX512 machines (at::vec's 512-bit vectors). setup.py compiles this
// file on its own with the instruction-set flags torch uses for its AVX512
// kernels (see CPU_CAPABILITY_FLAGS there); ops.cpp calls it only when
// torch runs at AVX512. See kernels.inc.
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels.inc"

const onecycle_fused::cpu::Kernels* onecycle_fused::cpu::kernels_AVX512() { return &AVX512::kKernels; }
