"""The JSON summary of scripts/gpu_check.sh (README, "GPU check"): what ran, what passed, what it measured.

    python scripts/gpu_check_summary.py OUTDIR STATUS REASON START ENVIRONMENT_JSON

reads what the check left in OUTDIR -- ``stages.tsv`` (name, exit code, seconds per stage), each pytest
stage's JUnit XML (``<stage>.xml``), ``gpu_check.log`` and the benchmark's JSON -- and writes
``OUTDIR/gpu_check.json``.  A pytest stage that its timeout killed writes no XML: its counts then come from
its ``pytest -v`` lines in the log, with the test that was running when it was cut (the one whose outcome
never came), so a cut-short run still says what it saw.
"""
from __future__ import annotations

import json
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

PYTEST_STAGES = ("gpu_tests", "op_tests")
BENCHMARK_JSON = "fused_elbo_loss_cuda_peaked.json"
OUTCOMES = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped",
            "XFAIL": "skipped"}
# `pytest -v`: "tests/test_x.py::test_y[p] PASSED   [ 12%]"; a test cut by the timeout has its id and no outcome.
VERBOSE_LINE = re.compile(r"^(tests/[\w/.-]+\.py::\S+) ?(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)?", re.MULTILINE)


def counts_from_junit(path: Path) -> dict:
    tests = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        key = {"failure": "failed", "error": "failed"}.get(outcome, outcome)
        tests[key] += 1
        if key == "failed":
            tests["failures"].append(f"{case.get('classname')}::{case.get('name')}")
    return tests


def stage_log(log: str, stage: str) -> str:
    """The part of the log that one stage wrote: from its start line to its exit line (or the end)."""
    start = log.find(f"gpu_check: {stage} (timeout")
    if start < 0:
        return ""
    end = log.find(f"gpu_check: {stage}: exit", start)
    return log[start:end if end >= 0 else len(log)]


def counts_from_log(text: str) -> dict:
    """Counts from `pytest -v` lines; ``cut_during``: the test that started and never reported an outcome."""
    tests = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "cut_short": True, "cut_during": None}
    for match in VERBOSE_LINE.finditer(text):
        test, outcome = match.groups()
        tests["cut_during"] = test if outcome is None else None  # only the last test can lack its outcome
        if outcome is not None:
            key = OUTCOMES[outcome]
            tests[key] += 1
            if key == "failed":
                tests["failures"].append(test)
    return tests


def summarize(out: Path, status: str, reason: str, start: int, environment: dict) -> dict:
    summary = {"status": status, "reason": reason, "environment": environment, "stages": [], "tests": None,
               "benchmark": None, "seconds": round(time.time() - start)}
    stages = out / "stages.tsv"
    for line in stages.read_text().splitlines() if stages.exists() else ():
        name, rc, seconds = line.split("\t")
        summary["stages"].append({"name": name, "rc": rc if rc == "not_run" else int(rc), "seconds": int(seconds)})
    ran = {s["name"] for s in summary["stages"] if s["rc"] != "not_run"}
    log_path = out / "gpu_check.log"
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    for stage in PYTEST_STAGES:
        junit = out / f"{stage}.xml"
        if junit.exists():
            tests = counts_from_junit(junit)
        elif stage in ran:
            tests = counts_from_log(stage_log(log, stage))
        else:
            continue
        summary["tests"] = {**(summary["tests"] or {}), stage: tests}
    bench = out / BENCHMARK_JSON
    if bench.exists():
        summary["benchmark"] = json.loads(bench.read_text())
    return summary


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    out, status, reason, start, environment = argv
    summary = summarize(Path(out), status, reason, int(start), json.loads(environment))
    (Path(out) / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    print(f"gpu_check: {summary['status']}: {summary['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
