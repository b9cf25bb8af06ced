#!/usr/bin/env bash
# Create .venv and install bgpo into it, with torch (the CUDA 13.0 build, which also runs on the CPU),
# the test and benchmark extras, and the C++/CUDA extension when a CUDA toolkit (nvcc) is found.
set -euo pipefail
cd "$(dirname "$0")/.."
# The code reward's sandbox: bubblewrap (setpriv, also used, is in util-linux).  Installed when missing and
# this is root on a Debian/Ubuntu machine (CI); otherwise only a note (the code reward refuses to run without it).
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap
    else
        echo "setup: bubblewrap (bwrap) not found: the code reward needs it (e.g. sudo apt-get install bubblewrap)" >&2
    fi
fi
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" numpy
source scripts/cuda_env.sh
.venv/bin/python -m pip install --quiet --no-build-isolation -e ".[test,triton,bench]"
