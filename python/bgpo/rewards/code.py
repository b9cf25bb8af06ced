"""Code reward: the program and its unit tests run in a sandboxed subprocess; 1.0 if they pass.

The program is the last fenced code block of the response (else the whole response).  Tests come from
the example: HumanEval-style ``test`` (defines ``check``) with ``entry_point``, or MBPP-style
``test_list`` (assert statements) with optional ``test_setup_code``.  When the program does not
define ``entry_point`` the example's ``prompt`` (the function signature) is put before it.

The subprocess (``python -I``: no user site, no ``PYTHON*`` variables) runs in a fresh temporary
directory that is deleted afterwards, with an environment of ``PATH``/``LANG``/``HOME`` only (no
inherited secrets), no standard input, a wall-clock time limit, and ``setrlimit`` caps on CPU time,
address space and written file size; it runs in its own session so a timeout kills its children
too.  Any failure — syntax error, failing assert, crash, timeout, limit hit — gives 0.0 with the
reason.  This is process isolation, not a security boundary against a hostile kernel exploit: run
untrusted models' code in a container as well.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from typing import Mapping

from .base import RewardOutput

__all__ = ["code_reward", "extract_program", "run_sandboxed"]

_FENCE = re.compile(r"```(?:[a-zA-Z0-9_+-]*)\n(.*?)(?:```|$)", re.DOTALL)
TIME_LIMIT = 10.0  # seconds of wall clock
MEMORY_LIMIT = 1 << 30  # bytes of address space
FILE_SIZE_LIMIT = 1 << 20  # bytes per written file


def extract_program(completion: str) -> str:
    """The last fenced code block of ``completion``, or all of it."""
    blocks = _FENCE.findall(completion)
    return (blocks[-1] if blocks else completion).strip("\n")


def _test_code(example: Mapping) -> str:
    if example.get("test"):
        entry = example.get("entry_point")
        return f"{example['test']}\n" + (f"check({entry})\n" if entry else "")
    tests = example.get("test_list") or []
    if not tests:
        raise ValueError("example: a code example needs 'test' (+ 'entry_point') or 'test_list'")
    return "\n".join([example.get("test_setup_code") or "", *tests]) + "\n"


def _limits(cpu_seconds: int, memory: int, file_size: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_sandboxed(source: str, *, time_limit: float = TIME_LIMIT, memory_limit: int = MEMORY_LIMIT,
                  file_size_limit: int = FILE_SIZE_LIMIT) -> RewardOutput:
    """Run ``source`` as a script in the sandbox; 1.0 if it exits with status 0, else 0.0 and why."""
    with tempfile.TemporaryDirectory(prefix="bgpo-sandbox-") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", path], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=_limits(int(time_limit) + 1, memory_limit, file_size_limit),
        )
        try:
            _, stderr = process.communicate(timeout=time_limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return RewardOutput(0.0, f"timeout after {time_limit:g}s")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    if process.returncode == 0:
        return RewardOutput(1.0)
    if process.returncode < 0:
        return RewardOutput(0.0, f"killed by {signal.Signals(-process.returncode).name}")
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return RewardOutput(0.0, lines[-1][:200] if lines else f"exit status {process.returncode}")


def code_reward(completion: str, example: Mapping, *, time_limit: float = TIME_LIMIT) -> RewardOutput:
    program = extract_program(completion)
    entry = example.get("entry_point")
    if entry and not re.search(rf"^def\s+{re.escape(entry)}\s*\(", program, re.MULTILINE):
        program = f"{example.get('prompt', '')}{program}"
    return run_sandboxed(f"{program}\n\n{_test_code(example)}", time_limit=time_limit)
