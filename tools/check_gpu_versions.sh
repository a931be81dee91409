#!/usr/bin/env bash
# The test suite on this (CPU) machine under the torch and triton of the GPU
# machine: torch 2.11 (its CUDA 13.0 wheel) and triton 3.6. What it checks
# that CI (torch 2.13 CPU, triton 3.9) cannot:
#   * _C_cuda is really built and linked against a CUDA torch (setup.py, not
#     the compile-only check), and loads: every symbol resolves;
#   * the Python side against that torch's dynamo / library API (torch 2.11's
#     dynamo refused an attribute write on an Optimizer that 2.13 dropped);
#   * the sm_90 compile-only Triton checks with triton 3.6's compiler.
# Not in CI: the CUDA wheel and its nvidia-* packages are ~3 GB to download.
#
#   bash tools/check_gpu_versions.sh            # venv in .venv-gpu-versions (Python 3.12 if found)
#   VENV=/path/to/venv bash tools/check_gpu_versions.sh -k compile
#
# Extra arguments go to pytest. Triton's interpreter at 3.6 needs numpy < 2.3
# (it converts a 1-element array to a scalar, which newer numpy refuses: every
# kernel with a loop over a runtime bound fails), so that pin is here too.
# Built into a copy of the tree (build/gpu-versions), so the in-place _C of
# the main .venv is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv-gpu-versions}
TORCH=${TORCH_SPEC:-torch==2.11.0}
TRITON=${TRITON_SPEC:-triton==3.6.0}
# the GPU machine's python3 is 3.12 (KINDS.md of the device tool): that one where it is here
BASE_PY=${BASE_PY:-$(command -v python3.12 || command -v python3)}
if [ ! -x "$VENV/bin/python" ]; then
  "$BASE_PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q "$TORCH" "$TRITON" "numpy<2.3" -r requirements-dev.txt
"$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

TREE=$ROOT/build/gpu-versions
rm -rf "$TREE" && mkdir -p "$TREE"
git ls-files -z | xargs -0 cp --parents -t "$TREE"
cd "$TREE"
# nvcc on PATH may be a wrapper script: CUDA_HOME is where lib/ or lib64/ holds libcudart
if [ -z "${CUDA_HOME:-}" ]; then
  NVCC=$(command -v nvcc || true)
  [ -n "$NVCC" ] && NVCC=$(readlink -f "$NVCC")
  if [ -n "$NVCC" ] && head -c 2 "$NVCC" | grep -q '#!'; then  # a wrapper: the exec'd nvcc
    NVCC=$(grep -o '/[^ "]*/bin/nvcc' "$NVCC" | head -n 1)
  fi
  [ -n "$NVCC" ] && export CUDA_HOME=$(dirname "$(dirname "$NVCC")")
fi
echo "CUDA_HOME=${CUDA_HOME:-none}"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} ONECYCLE_FUSED_FORCE_CUDA=1 \
  "$VENV/bin/python" setup.py -q build_ext --inplace
PYTHONPATH=$TREE "$VENV/bin/python" -c "
import onecycle_fused.ops as ops
assert ops.cuda_library_loaded(), 'the CUDA library did not load'
print('_C_cuda loads; cpu kernels', ops.cpu_capability())"
status=0 rc=0
PYTHONPATH=$TREE "$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider tests/ "$@" || status=$?
PYTHONPATH=$TREE TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider tests/test_triton.py "$@" || rc=$?
[ $status -ne 0 ] || status=$rc
exit $status
