"""Math reward: the response's final answer checked for equivalence with math-verify.

The reference comes from ``example["answer"]``: GSM8K's solution text ending in ``#### 42``, a MATH
solution with ``\\boxed{...}``, or a bare answer.  The response's answer is read from inside its last
``<answer>`` tags if it has them (else from all of it): the last ``\\boxed{}`` — also one left open at
the end (``\\boxed{20`` then ``</answer>``) — else what follows the last ``####``, else the tagged
text itself.  A number followed by a unit (``\\boxed{800 ml}``, ``\\text{800 ml}``) is also tried as
the bare number.  1.0 when math-verify finds an answer equivalent to the reference (``1/2`` = ``0.5``
= ``\\frac12``), else 0.0.

Time and threads: math-verify bounds its own time with ``signal.alarm``, which only works in the main
thread (it raises elsewhere) and cannot interrupt a comparison stuck in C code.  bgpo runs math-verify
with its timeouts off, in worker processes (one per concurrent caller, kept for reuse), and waits at
most ``timeout`` seconds for an answer: a worker that overruns is killed and the answer scores 0
("timeout").  So ``math_reward`` may be called from any thread, and no answer (``9^{9^{9^9}}``...)
holds the trainer for longer than ``timeout``.
"""
from __future__ import annotations

import json
import os
import queue
import re
import select
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from ..ops._checks import check_real
from .base import RewardOutput, answer_span, last_boxed

__all__ = ["math_reward", "final_answer", "answer_candidates", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 5.0
_WORKER_FILE = str(Path(__file__).with_name("_verify_worker.py"))
_STARTUP_TIMEOUT = 120.0  # a fresh worker imports math-verify (sympy) before its first answer
_HASHES = re.compile(r"####\s*([^\n]+)")
_TEXT_WRAPPER = re.compile(r"\s*\\(?:text|mbox|mathrm|textrm)\s*\{([^{}]*)\}\s*")
# A number followed by a unit: words of two letters or more (``ml``, ``dollars``, ``km/h``, ``cm^2``)
# or a ``\text{...}`` holding letters.  Single letters are not units here (``2 x`` is no ``2``).
# Words are separated by at least one of `` /.``: with the separator optional, ``([A-Za-z]+)*`` could
# split a run of letters in exponentially many ways, and a long phrase ending in a comma took seconds
# (minutes, a few letters more) to refuse, in the caller's thread, outside the checker's timeout.
_NUMBER_WITH_UNIT = re.compile(
    r"\s*(?:\\?\$)?\s*(-?(?:\d[\d,]*(?:\.\d+)?|\.\d+))\s*(?:\\[ ,;:!]|~|\s)*"
    r"(?:\\(?:text|mbox|mathrm|textrm)\s*\{\s*[A-Za-z][A-Za-z ./^\d]*\}"
    r"|[A-Za-z]{2,}(?:[ /.]+[A-Za-z]+)*(?:\^\{?\d\}?)?)"
    r"\s*\.?\s*"
)
# Longer answers are not read as a number with a unit: the whitespace runs of the pattern still match in
# quadratic time, and a number with its unit is short.
_UNIT_ANSWER_CHARS = 100


def final_answer(text: str, *, allow_unclosed: bool = False) -> str | None:
    """The final answer of a solution: the last ``\\boxed{}``, else what follows the last ``####``."""
    boxed = last_boxed(text, allow_unclosed=allow_unclosed)
    if boxed is not None:
        return boxed.strip()
    hashes = _HASHES.findall(text)
    return hashes[-1].strip().replace(",", "") if hashes else None


def answer_candidates(completion: str) -> list[str]:
    """The response's final answer (see the module docstring), then its bare number if it carries a unit."""
    span = answer_span(completion)
    answer = final_answer(span, allow_unclosed=True)
    if answer is None and "<answer>" in completion:
        answer = span
    if not answer:
        return []
    candidates = [answer]
    wrapped = _TEXT_WRAPPER.fullmatch(answer)
    inner = wrapped[1] if wrapped else answer.strip().strip("$")
    if len(inner) <= _UNIT_ANSWER_CHARS and (number := _NUMBER_WITH_UNIT.fullmatch(inner)):
        candidates.append(number[1].replace(",", ""))
    elif wrapped:
        candidates.append(inner)
    return candidates


class _Worker:
    """A process running ``_verify_worker.py``: a fresh interpreter (no fork of a threaded trainer, no
    re-import of the caller's ``__main__`` as multiprocessing's spawn would do) that imports math-verify
    but not bgpo (nor torch).  The file is run by ``runpy`` so that its directory, which holds this
    ``math.py``, never shadows the standard library's ``math``."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        launcher = f"import runpy; runpy.run_path({_WORKER_FILE!r}, run_name='__main__')"
        self.process = subprocess.Popen(
            [sys.executable, "-c", launcher], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env, text=True,
        )
        if self._reply(_STARTUP_TIMEOUT) != "ready":
            self.close()
            raise RuntimeError("math reward: the math-verify worker did not start (is math-verify installed?)")

    def _reply(self, timeout: float):
        """The worker's next JSON line, or None if none comes within ``timeout`` s (or the worker died)."""
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if readable else ""
        return json.loads(line) if line else None

    def check(self, gold: str, candidates: list[str], timeout: float) -> tuple[float, str] | None:
        """The worker's verdict, or None (and the worker killed) if none comes within ``timeout`` s."""
        try:
            self.process.stdin.write(json.dumps([gold, candidates]) + "\n")
            self.process.stdin.flush()
        except OSError:
            reply = None
        else:
            reply = self._reply(timeout)
        if reply is None:
            self.close()
            return None
        return float(reply[0]), str(reply[1])

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:  # the write end of a killed worker's stdin may still hold unflushed bytes
                pass


_IDLE: queue.SimpleQueue = queue.SimpleQueue()  # idle workers (thread-safe): a caller takes one or starts one


def math_reward(completion: str, example: Mapping, *, timeout: float = DEFAULT_TIMEOUT) -> RewardOutput:
    check_real("timeout", timeout, positive=True)  # seconds
    if "answer" not in example:
        raise ValueError("example['answer']: missing (the reference solution or answer)")
    reference = str(example["answer"])
    gold = final_answer(reference) or reference.strip()
    candidates = answer_candidates(completion)
    if not candidates:
        return RewardOutput(0.0, "no final answer")
    try:
        worker = _IDLE.get_nowait()
    except queue.Empty:
        worker = _Worker()
    verdict = worker.check(gold, candidates, float(timeout))
    if verdict is None:
        return RewardOutput(0.0, f"timeout: math-verify gave no verdict within {timeout} s")
    _IDLE.put(worker)
    return RewardOutput(*verdict)
