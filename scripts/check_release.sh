#!/usr/bin/env bash
# Checks this tree against one torch and Triton release, on a CPU machine (README, "Triton kernels"):
#
#   scripts/check_release.sh TORCH TRITON [NUMPY_SPEC]     # e.g. 2.11.0 3.6.0 '<2.4' (the GPU machines')
#
# In a virtual environment of its own (BGPO_RELEASE_VENV, default under TMPDIR), kept for the next run:
# installs those releases, copies the working tree (tracked and untracked-not-ignored files), builds the
# C++/CUDA extension there with warnings as errors (the CUDA kernels for sm_80 and sm_90 when this torch
# is a CUDA build and nvcc is on the PATH), then runs the Philox, op and GPU-check tests (the Triton ones
# under the interpreter) and the Triton compile checks for sm_80/sm_90.  Exits non-zero on the first failure.
set -euo pipefail
TORCH=${1:?usage: scripts/check_release.sh TORCH TRITON [NUMPY_SPEC]}
TRITON=${2:?usage: scripts/check_release.sh TORCH TRITON [NUMPY_SPEC]}
NUMPY_SPEC=${3:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${BGPO_RELEASE_VENV:-${TMPDIR:-/tmp}/bgpo-torch$TORCH-triton$TRITON}
say() { echo "check_release: $*"; }

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
say "installing torch==$TORCH triton==$TRITON numpy$NUMPY_SPEC into $VENV"
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH" "triton==$TRITON" "numpy$NUMPY_SPEC" pytest \
    pybind11 ninja setuptools wheel
PY=$VENV/bin/python

SRC=$(mktemp -d "${TMPDIR:-/tmp}/bgpo-release-src.XXXXXX")
trap 'rm -rf "$SRC"' EXIT
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf -) \
    | tar -xf - -C "$SRC"
cd "$SRC"
source scripts/cuda_env.sh
export BGPO_WERROR=1 MAX_JOBS=${MAX_JOBS:-2}
if command -v nvcc >/dev/null && "$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
    export BGPO_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
    say "building the extension with its CUDA kernels ($TORCH_CUDA_ARCH_LIST)"
else
    say "building the extension for the CPU only (no nvcc, or a CPU build of torch)"
fi
"$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index -e .
TRITON_INTERPRET=1 "$PY" - <<'PYEOF'
import numpy, torch, triton
import bgpo
from bgpo.backends import available_backends
print(f"check_release: torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}; "
      f"fused_elbo_loss backends on the CPU, Triton's interpreter on: {available_backends('fused_elbo_loss', 'cpu')}")
PYEOF
say "tests"
TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_philox.py tests/test_fused_elbo_loss.py \
    tests/test_random_mask.py tests/test_triton_kernels.py tests/test_extension.py tests/test_gpu.py \
    tests/test_gpu_check.py
for arch in 90 80; do
    say "Triton compile check, sm_$arch"
    "$PY" -m bgpo_kernels._compile_check --arch "$arch" --strict
done
say "passed: torch $TORCH, triton $TRITON"
