"""The examples run as a user would run them, in a fresh interpreter."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_own_loop_runs_one_step():
    pytest.importorskip("transformers")
    script = EXAMPLES / "own_loop.py"
    assert len(script.read_text().splitlines()) <= 60  # the point is that it is small
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "parameters updated" in done.stdout
