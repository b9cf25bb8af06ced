"""scripts/gpu_check.sh runs on a machine without a GPU and says, in its JSON, that it skipped."""
import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _check_without_a_gpu(tmp_path: Path, wheels: Path) -> dict:
    """Runs the check with no GPU visible (even on a GPU machine) and the given wheel folder; its JSON."""
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "BGPO_GPU_CHECK_WHEELS": str(wheels),
           "TMPDIR": str(tmp_path)}
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "--no-install"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads((tmp_path / "out" / "gpu_check.json").read_text())


def test_gpu_check_skips_cleanly_without_a_gpu(tmp_path):
    summary = _check_without_a_gpu(tmp_path, tmp_path / "no-wheels")  # not whatever .whl/ holds here
    assert summary["status"] == "skipped" and "no GPU" in summary["reason"]
    assert summary["environment"]["cuda_available"] is False and summary["environment"]["torch"]
    assert summary["stages"] == [] and summary["tests"] is None  # nothing was run, nothing claimed
    assert summary["environment"]["carried"] == {}  # no wheels to carry
    assert "environment:" in (tmp_path / "out" / "gpu_check.log").read_text()


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel of one module (what pip needs: METADATA, WHEEL and a hashed RECORD)."""
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()}"
              f",{len(text.encode())}" for path, text in files.items()]
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record + [f"{name}-{version}.dist-info/RECORD,,"]) + "\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


def test_gpu_check_installs_the_carried_wheels(tmp_path):
    """The wheels of BGPO_GPU_CHECK_WHEELS (scripts/gpu_wheels.sh: the benchmark's peers, for a machine without
    network) are installed before anything runs, and the environment names them."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "bgpo_fake_peer", "1.2.3")
    summary = _check_without_a_gpu(tmp_path, wheels)
    assert summary["environment"]["carried"] == {"bgpo_fake_peer": "1.2.3"}
    assert not list(tmp_path.glob("bgpo_gpu_check_site.*"))  # the temporary install is removed on exit


def test_gpu_check_needs_an_outdir():
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "usage" in run.stderr


def test_check_release_needs_its_releases():
    """scripts/check_release.sh TORCH TRITON [NUMPY_SPEC]: without them, a usage line and nothing installed."""
    script = SCRIPT.parent / "check_release.sh"
    for argv in ([], ["2.11.0"]):
        run = subprocess.run(["bash", str(script), *argv], capture_output=True, text=True, timeout=60)
        assert run.returncode != 0 and "usage: scripts/check_release.sh TORCH TRITON" in run.stderr


def _summary_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_summary", SCRIPT.parent / "gpu_check_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_counts_a_stage_its_timeout_cut_from_the_log(tmp_path):
    """A pytest stage killed by its timeout leaves no JUnit XML: its counts come from its `pytest -v` lines,
    with the test it was running named; a finished stage is read from its XML; the benchmark JSON is kept."""
    summary_module = _summary_module()
    (tmp_path / "stages.tsv").write_text("install\t0\t40\ngpu_tests\t124\t170\nbenchmark\t0\t90\nop_tests\t1\t200\n")
    (tmp_path / "gpu_check.log").write_text(
        "gpu_check: gpu_tests (timeout 170s): python -m pytest -v tests/test_gpu.py\n"
        "tests/test_gpu.py::test_llada_head[triton-bias] PASSED                 [ 10%]\n"
        "tests/test_gpu.py::test_llada_head[cuda-bias] FAILED                   [ 20%]\n"
        "tests/test_gpu.py::test_skipped_one SKIPPED (no extension)             [ 30%]\n"
        "tests/test_gpu.py::test_compile_fullgraph[triton] gpu_check: gpu_tests: exit 124 after 170 s\n"
        "gpu_check: op_tests (timeout 300s): python -m pytest -v ...\n"
        "tests/test_random_mask.py::test_other PASSED                            [ 50%]\n")
    (tmp_path / "op_tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_x" name="a"/>'
        '<testcase classname="tests.test_x" name="b"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_x" name="c"><skipped/></testcase></testsuite></testsuites>')
    (tmp_path / "fused_elbo_loss_cuda_peaked.json").write_text('{"rows": [], "targets": []}')
    summary = summary_module.summarize(tmp_path, "failed", "a stage failed", 0, {"torch": "2.11.0"})
    gpu, ops = summary["tests"]["gpu_tests"], summary["tests"]["op_tests"]
    assert (gpu["passed"], gpu["failed"], gpu["skipped"]) == (1, 1, 1) and gpu["cut_short"]
    assert gpu["failures"] == ["tests/test_gpu.py::test_llada_head[cuda-bias]"]
    assert gpu["cut_during"] == "tests/test_gpu.py::test_compile_fullgraph[triton]"
    assert (ops["passed"], ops["failed"], ops["skipped"], ops["failures"]) == (1, 1, 1, ["tests.test_x::b"])
    assert [s["rc"] for s in summary["stages"]] == [0, 124, 0, 1] and summary["benchmark"]["targets"] == []
    # a stage that finished while a later one was cut has no test left without an outcome
    finished = summary_module.counts_from_log(summary_module.stage_log(
        (tmp_path / "gpu_check.log").read_text(), "op_tests"))
    assert finished["passed"] == 1 and finished["cut_during"] is None
