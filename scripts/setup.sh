#!/usr/bin/env bash
# Create .venv and install bgpo into it, with torch (the CUDA 13.0 build, which also runs on the CPU),
# the test and benchmark extras, and the C++/CUDA extension when a CUDA toolkit (nvcc) is found.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.1"
if command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
  # torch otherwise guesses the toolkit root wrong and the link fails on -lcudart.  Ask nvcc where its
  # toolkit is (build_ext_config.find_cuda_home): dirname(dirname(nvcc)) is wrong when nvcc on the PATH
  # is a wrapper script (here /usr/local/bin/nvcc -> /usr/local/cuda-13.0).
  CUDA_HOME=$("$PYTHON" -c 'import build_ext_config as b; print(b.find_cuda_home() or "")')
  if [ -z "$CUDA_HOME" ]; then CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); fi
  export CUDA_HOME
fi
.venv/bin/python -m pip install --quiet --no-build-isolation -e ".[test,triton,bench]"
