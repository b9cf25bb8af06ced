"""scripts/gpu_check.sh runs on a machine without a GPU and says, in its JSON, that it skipped."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def test_gpu_check_skips_cleanly_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU machine
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "--no-install"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary["status"] == "skipped" and "no GPU" in summary["reason"]
    assert summary["environment"]["cuda_available"] is False and summary["environment"]["torch"]
    assert summary["stages"] == [] and summary["tests"] is None  # nothing was run, nothing claimed
    assert "environment:" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_gpu_check_needs_an_outdir():
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "usage" in run.stderr
