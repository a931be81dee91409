#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment (.venv) with CPU torch, the
# test/benchmark dependencies, and this package built in place (the CPU
# library always; the CUDA one when a CUDA torch and nvcc are present).
#   VENV=path      where the environment goes (default .venv)
#   TORCH_SPEC=..  what to install for torch (default torch==2.13.0, the CPU
#                  wheel on this project's machines; set to "" to keep the torch
#                  already installed, e.g. on a GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv ${VENV_FLAGS:-} "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
if [ -n "$TORCH_SPEC" ]; then
  python -m pip install -q "$TORCH_SPEC"
fi
python -m pip install -q -r requirements-dev.txt
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation -e .
python -c "import torch, onecycle_fused; print('torch', torch.__version__, '| backends:', onecycle_fused.available_backends())"
