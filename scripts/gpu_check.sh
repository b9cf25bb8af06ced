#!/usr/bin/env bash
# The GPU check in one command (README, "GPU check"):
#
#   scripts/gpu_check.sh OUTDIR [--no-install]
#
# On a machine with one GPU, its own torch and Triton and no network: installs the project without
# dependencies (`pip install --no-deps --no-build-isolation -e .`; if the C++/CUDA extension fails to
# build, again with BGPO_SKIP_EXTENSION=1; if that fails too, runs from the source tree via PYTHONPATH),
# runs the GPU tests (BGPO_TEST_DEVICE=cuda: tests/test_gpu.py and the op tests on CUDA tensors) and
# benchmarks/fused_elbo_loss.py --peaked, and writes OUTDIR/gpu_check.log and OUTDIR/gpu_check.json.
# Each stage runs under `timeout`; the whole check ends within BGPO_GPU_CHECK_SECONDS (default 540 = 9 min).
# Without a GPU it writes {"status": "skipped", ...} and exits 0.  --no-install skips the install stage.
# Wheels in BGPO_GPU_CHECK_WHEELS (default .whl: scripts/gpu_wheels.sh fetches the benchmark's peers) are
# installed first, into a temporary folder put first on PYTHONPATH; the JSON's environment names them.
# PYTHON (default python3) is the interpreter that holds torch.
set -u
OUTDIR=${1:?usage: scripts/gpu_check.sh OUTDIR [--no-install]}
INSTALL=1
[ "${2:-}" = "--no-install" ] && INSTALL=0
PY=${PYTHON:-python3}
BUDGET=${BGPO_GPU_CHECK_SECONDS:-540}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_check.log
STAGES=$OUTDIR/stages.tsv
: >"$LOG"
: >"$STAGES"
START=$(date +%s)
cd "$ROOT" || exit 1

say() { echo "gpu_check: $*" | tee -a "$LOG"; }

# Wheels carried to a machine without network (scripts/gpu_wheels.sh: the benchmark's peers), installed
# into a folder of their own, first on PYTHONPATH; the environment line below names what they hold.
WHEELS=${BGPO_GPU_CHECK_WHEELS:-$ROOT/.whl}
SITE=$(mktemp -d "${TMPDIR:-/tmp}/bgpo_gpu_check_site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    if timeout 120 "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" \
            "$WHEELS"/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    else
        say "the wheels in $WHEELS did not install (see above): the benchmark runs without them"
    fi
fi

# stage NAME SECONDS CMD...: run CMD under timeout (at most what is left of the budget, less 20 s for the
# summary), log its output, record "name rc seconds" in stages.tsv.
stage() {
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - 20 - ($(date +%s) - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -le 5 ]; then
        say "$name: not run (time budget spent)"
        printf '%s\t%s\t%s\n' "$name" "not_run" 0 >>"$STAGES"
        return 124
    fi
    say "$name (timeout ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" $(($(date +%s) - t0)) >>"$STAGES"
    say "$name: exit $rc after $(($(date +%s) - t0)) s"
    return $rc
}

# The machine: torch, Triton, the GPU (one line of JSON).
ENV_JSON=$(BGPO_GPU_CHECK_SITE=$SITE timeout 120 "$PY" - <<'EOF' 2>>"$LOG"
import json
info = {}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        info["device_name"] = torch.cuda.get_device_name(0)
        info["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
except Exception as error:  # no torch: reported, and the check is skipped
    info["torch_error"] = repr(error)
try:
    import triton
    info["triton"] = triton.__version__
except Exception as error:
    info["triton_error"] = repr(error)
import os
from importlib.metadata import distributions
info["carried"] = {d.metadata["Name"]: d.version for d in distributions(path=[os.environ["BGPO_GPU_CHECK_SITE"]])}
print(json.dumps(info))
EOF
)
[ -n "$ENV_JSON" ] || ENV_JSON='{"torch_error": "the interpreter did not answer"}'
say "environment: $ENV_JSON"

summary() {  # summary STATUS REASON
    "$PY" "$ROOT/scripts/gpu_check_summary.py" "$OUTDIR" "$1" "$2" "$START" "$ENV_JSON" 2>>"$LOG"
}

if ! "$PY" -c 'import json, sys; sys.exit(0 if json.loads(sys.argv[1]).get("cuda_available") else 1)' "$ENV_JSON"; then
    summary skipped "no GPU: torch sees no CUDA device (or torch is missing); nothing was run"
    exit 0
fi

if [ "$INSTALL" = 1 ]; then
    # compile the CUDA extension for this GPU only (one architecture: half the build time)
    CAP=$("$PY" -c 'import json, sys; print(json.loads(sys.argv[1])["capability"])' "$ENV_JSON")
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP} MAX_JOBS=${MAX_JOBS:-$(nproc)}
    if ! stage install 240 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . ; then
        say "the extension did not build: installing without it (BGPO_SKIP_EXTENSION=1)"
        if ! BGPO_SKIP_EXTENSION=1 stage install_no_extension 90 "$PY" -m pip install --no-deps \
                --no-build-isolation --no-index -e . ; then
            say "pip install failed: running from the source tree (PYTHONPATH)"
            export PYTHONPATH=$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}
        fi
    fi
else
    export PYTHONPATH=$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
stage backends 60 "$PY" -c 'import torch, bgpo; from bgpo.backends import available_backends as a
print("fused_elbo_loss:", a("fused_elbo_loss", "cuda"), "random_mask:", a("random_mask", "cuda"))'

# The GPU tests, the benchmark, then the op tests on CUDA tensors with what time is left.  Each pytest
# writes its own JUnit XML and, with -v, a line per test to the log, from which the summary counts a stage
# that its timeout cut short (and names the test it was running); -x is not used: every failure is listed.
export BGPO_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
stage gpu_tests 170 "$PY" -m pytest -v -rfE -p no:cacheprovider --junitxml="$OUTDIR/gpu_tests.xml" tests/test_gpu.py
stage benchmark 130 "$PY" benchmarks/fused_elbo_loss.py --peaked --out "$OUTDIR"
stage op_tests 300 "$PY" -m pytest -v -rfE -p no:cacheprovider --junitxml="$OUTDIR/op_tests.xml" \
    tests/test_fused_elbo_loss.py tests/test_random_mask.py tests/test_triton_kernels.py tests/test_extension.py

STATUS=passed
REASON="every stage exited 0"
if awk -F'\t' '$2 != 0 {bad = 1} END {exit !bad}' "$STAGES"; then
    STATUS=failed
    REASON="a stage failed or timed out: see stages and $LOG"
fi
summary "$STATUS" "$REASON"
[ "$STATUS" = passed ]
