#!/usr/bin/env bash
# Wheels the GPU machine lacks, into .whl/ (git-ignored), for the device
# tool's `carry`. That machine cannot download anything; its image has torch,
# triton, lightning, transformers, psutil, py-cpuinfo, msgpack, einops, tqdm
# and ninja, but not DeepSpeed, whose OneCycle is one of the benchmark's host
# schedulers (the "DS-OneCycle" rows) and the oracle of the DeepSpeed fp16
# test. tools/gpu_session.sh installs whatever is in .whl/ before it starts.
#
#   bash tools/gpu_wheels.sh      # then: run(..., carry=[".whl"])
#
# DeepSpeed ships an sdist only: its wheel is built here with no ops
# (pure Python, ~2 MB); the others are the GPU image's Python 3.12 binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-$VENV/bin/python}
DEST=.whl
rm -rf "$DEST" && mkdir -p "$DEST"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
# deepspeed's needs the image lacks (pydantic pins its core; pydantic wants typing-extensions >= 4.16)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0
ls -l "$DEST"
du -sh "$DEST"
