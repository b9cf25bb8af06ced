#!/usr/bin/env bash
# Create .venv and install bgpo into it, with torch (the CUDA 13.0 build, which also runs on the CPU),
# the test and benchmark extras, and the C++/CUDA extension when a CUDA toolkit (nvcc) is found.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" numpy
source scripts/cuda_env.sh
.venv/bin/python -m pip install --quiet --no-build-isolation -e ".[test,triton,bench]"
