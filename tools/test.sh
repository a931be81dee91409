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
# 2. the main suite (gpu-marked tests skip without a CUDA device)
python -m pytest -q -ra "$@"
# 3. the Triton kernels on CPU tensors through the interpreter, in a process of
#    their own: TRITON_INTERPRET must be set before triton compiles anything
if [ -f tests/test_triton.py ]; then
  TRITON_INTERPRET=1 python -m pytest -q -ra tests/test_triton.py
fi
