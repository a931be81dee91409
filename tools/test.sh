#!/usr/bin/env bash
# Run the test suite (after tools/setup.sh). Fails on any failure, and on an
# empty run (pytest exits 5 when it collects nothing; that is not hidden).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# shellcheck disable=SC1091
[ -x "$VENV/bin/python" ] && . "$VENV/bin/activate"
# 1. every CUDA source compiles (nothing runs without a GPU)
if [ -x tools/check_cuda_compile.sh ]; then
  bash tools/check_cuda_compile.sh
fi
# 2. the main suite (gpu-marked tests skip without a CUDA device). The tests
#    of the compiled CPU library skip where it did not load, and the Triton
#    file where triton is missing (requirements-dev.txt installs it on Linux),
#    and the schedule tests (DeepSpeed's OneCycle is their oracle) where
#    deepspeed is: here, a skip would pass CI untested, so each is a failure
python -c "import sys, onecycle_fused.ops as ops; sys.exit(0 if ops.cpu_library_loaded() else
  'test.sh: onecycle_fused._C is not built (run tools/setup.sh) or failed to load (a warning above says why)')"
if [ "$(uname -s)" = Linux ]; then python -c "import triton"; fi
python -c "import deepspeed.runtime.lr_schedules" ||
  { echo "test.sh: deepspeed does not import (the schedule tests' oracle; run tools/setup.sh)"; exit 1; }
python -m pytest -q -ra "$@"
# 3. the Triton kernels on CPU tensors through the interpreter, in a process of
#    their own: TRITON_INTERPRET must be set before triton compiles anything
if [ -f tests/test_triton.py ]; then
  TRITON_INTERPRET=1 python -m pytest -q -ra tests/test_triton.py
fi
