#!/usr/bin/env bash
# The peers benchmarks/fused_elbo_loss.py compares bgpo with on a GPU, as wheels, for a GPU machine that
# has no network (README, "GPU check"):
#
#   scripts/gpu_wheels.sh [DIR]        # default DIR: .whl in the repository root (git-ignored)
#
# Run it where the package registries answer, then carry DIR to the GPU machine; scripts/gpu_check.sh
# installs every wheel it finds there (BGPO_GPU_CHECK_WHEELS, default .whl) before anything else.
# Both peers are pure Python (Triton kernels): one wheel each, no dependency beyond torch and triton.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT/.whl}
PEERS=("cut-cross-entropy==25.1.1" "liger-kernel==0.8.5")
mkdir -p "$DEST"
# The GPU machine's interpreter is CPython 3.12 on x86-64 (the device tool's notes).
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$DEST" "${PEERS[@]}"
echo "gpu_wheels: in $DEST:"
ls -1 "$DEST"
