// CPU kernels for AVX2 machines (at::vec's 256-bit vectors). setup.py compiles this
// file on its own with the instruction-set flags torch uses for its AVX2
// kernels (see CPU_CAPABILITY_FLAGS there); ops.cpp calls it only when
// torch runs at AVX2. See kernels.inc.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels.inc"

const onecycle_fused::cpu::Kernels* onecycle_fused::cpu::kernels_AVX2() { return &AVX2::kKernels; }
