// CPU kernels with the compiler's default instruction set (at::vec's generic
// vectors): the fallback on any machine. See kernels.inc.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "kernels.inc"

const onecycle_fused::cpu::Kernels* onecycle_fused::cpu::kernels_DEFAULT() { return &DEFAULT::kKernels; }
