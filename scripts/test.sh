#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the tests: what CI runs (.ci/run calls this script).
# The C++/CUDA extension must build with warnings as errors (its CUDA kernels too when nvcc is found),
# the same sources must build with CMake, and then the whole test suite runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-2} BGPO_WERROR=1 BGPO_REQUIRE_EXTENSION=1 BGPO_REQUIRE_SANDBOX=1
if command -v nvcc >/dev/null 2>&1; then
  # A toolkit is present: the CUDA kernels must build and register (no GPU needed).
  export BGPO_FORCE_CUDA_BUILD=1 BGPO_REQUIRE_CUDA_EXTENSION=1
fi
source scripts/cuda_env.sh  # CMake below needs it too
bash scripts/setup.sh
# CMake configure + build of the CPU library (the CUDA sources are compiled by the setup.py build above;
# torch's CMake config also needs cuBLAS/nvrtc libraries for a CMake CUDA build, which this toolkit lacks).
cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  -DBGPO_WERROR=ON
cmake --build build/cmake -j "$MAX_JOBS"
export BGPO_CMAKE_LIBRARY=$PWD/build/cmake/libbgpo_C.so
.venv/bin/python -m pytest tests -q "$@"
