"""Math reward: the response's final answer checked for equivalence with math-verify.

The reference comes from ``example["answer"]``: GSM8K's solution text ending in ``#### 42``, a MATH
solution with ``\\boxed{...}``, or a bare answer.  The response's answer is read from inside its last
``<answer>`` tags if it has them (else from all of it): the last ``\\boxed{}`` — also one left open at
the end (``\\boxed{20`` then ``</answer>``) — else what follows the last ``####``, else the tagged
text itself.  A number followed by a unit (``\\boxed{800 ml}``, ``\\text{800 ml}``, at most two words:
``km/h``, ``dollars per hour``) is also tried as the bare number; a number followed by words only, one
of them a hedge, negation or comparison (``12 or more``, ``12 is not the answer``), scores 0.  1.0
when math-verify finds an answer equivalent to the reference (``1/2`` = ``0.5`` = ``\\frac12``), else 0.0.

Time and threads: math-verify bounds its own time with ``signal.alarm``, which only works in the main
thread (it raises elsewhere) and cannot interrupt a comparison stuck in C code.  bgpo runs math-verify
with its timeouts off, in worker processes (one per concurrent caller, kept for reuse), and waits at
most ``timeout`` seconds for an answer: a worker that overruns is killed and the answer scores 0
("timeout").  So ``math_reward`` may be called from any thread, and no answer (``9^{9^{9^9}}``...)
holds the trainer for longer than ``timeout``.  A worker that died while idle (killed, out of memory)
is replaced and the answer checked again, once.  A reference answer that is empty or that math-verify
cannot parse (``""``, ``"#### "``, ``\\boxed{}``) raises ValueError: every answer would score 0.
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
_DIED = object()  # ``_Worker.check``'s reply when the worker process exited before it answered
_HASHES = re.compile(r"####\s*([^\n]+)")
_TEXT_WRAPPER = re.compile(r"\s*\\(?:text|mbox|mathrm|textrm)\s*\{([^{}]*)\}\s*")
# A number followed by a unit (``ml``, ``dollars``, ``km/h``, ``cm^2``, ``square feet``, ``dollars per
# hour``), bare or in a ``\text{...}``: at most two words of letters, joined by a space, a ``/`` or
# ``per``.  A bare unit's first word has two letters or more (``2 x`` is no ``2``).  Words are never
# optional nor repeated here, so the pattern cannot split a run of letters in many ways (an earlier
# ``([A-Za-z]+)*`` took seconds, minutes a few letters more, to refuse a long phrase, in the caller's
# thread, outside the checker's timeout).
_UNIT_WORD = r"[A-Za-z]+(?:\^\{?\d\}?)?"
_UNIT = rf"(?:{_UNIT_WORD}(?:(?:\s*/\s*|\s+per\s+|\s+){_UNIT_WORD})?)"
_NUMBER = r"\s*(?:\\?\$)?\s*(-?(?:\d[\d,]*(?:\.\d+)?|\.\d+))"
_LEADING_NUMBER = re.compile(_NUMBER)
_NUMBER_WITH_UNIT = re.compile(
    _NUMBER + r"\s*(?:\\[ ,;:!]|~|\s)*"
    rf"(?:\\(?:text|mbox|mathrm|textrm)\s*\{{\s*({_UNIT})\s*\}}|(?=[A-Za-z]{{2}})({_UNIT}))"
    r"\s*\.?\s*"
)
# Words that make "12 or more", "12 is not the answer", "12 or fewer apples" a hedge, a negation or a
# comparison, not 12 with a unit: such an answer scores 0 (math-verify alone reads "12 or more" as 12).
_NOT_UNIT_WORDS = frozenset("""
    or and nor not no is are was were be isn aren but if maybe perhaps possibly probably more less fewer
    than at least most about approximately approx around roughly nearly almost over under above below
    between to up greater smaller larger higher lower plus minus ish
""".split())
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


def _has_hedge_word(text: str) -> bool:
    return any(word.lower() in _NOT_UNIT_WORDS for word in re.findall(r"[A-Za-z]+", text))


def _unwrapped(answer: str) -> tuple[str, bool]:
    """The answer less a ``\\text{}`` around all of it (or ``$`` signs), and whether it had the wrapper."""
    wrapped = _TEXT_WRAPPER.fullmatch(answer)
    return (wrapped[1].strip(), True) if wrapped else (answer.strip().strip("$").strip(), False)


def _hedged(answer: str) -> bool:
    """Whether ``answer`` is a number followed by words only, one of them a hedge, a negation or a
    comparison (``12 or more``, ``12 is not the answer``, ``12 \\text{or fewer} apples``): not a number."""
    inner, _ = _unwrapped(answer)
    number = _LEADING_NUMBER.match(inner)
    if number is None:
        return False
    rest = inner[number.end() :]
    return not any(c.isdigit() for c in rest) and _has_hedge_word(rest)


def answer_candidates(completion: str) -> list[str]:
    """The response's final answer (see the module docstring), then its bare number if it carries a unit."""
    span = answer_span(completion)
    answer = final_answer(span, allow_unclosed=True)
    if answer is None and "<answer>" in completion:
        answer = span
    if not answer:
        return []
    candidates = [answer]
    inner, wrapped = _unwrapped(answer)
    number = _NUMBER_WITH_UNIT.fullmatch(inner) if len(inner) <= _UNIT_ANSWER_CHARS else None
    if number and not _has_hedge_word(number[2] or number[3]):
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
        """The worker's next JSON line; None if none comes within ``timeout`` s, ``_DIED`` if its stdout
        closed first (the worker exited)."""
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not readable:
            return None
        line = self.process.stdout.readline()
        return json.loads(line) if line else _DIED

    def check(self, gold: str, candidates: list[str], timeout: float):
        """The worker's reply (``[score, reason]``, or ``{"error": ...}`` for a reference it cannot parse);
        None if none comes within ``timeout`` s, ``_DIED`` if the worker died (a broken pipe, or EOF
        before the deadline).  The worker is killed and closed unless it replied."""
        try:
            self.process.stdin.write(json.dumps([gold, candidates]) + "\n")
            self.process.stdin.flush()
        except OSError:  # BrokenPipeError: nothing reads the pipe, the worker is gone
            reply = _DIED
        else:
            reply = self._reply(timeout)
        if reply is None or reply is _DIED:
            self.close()
        return reply

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
    gold = final_answer(reference)
    if gold is None:  # no box, no hashes: the whole field is the answer ("#### " and "\\boxed{}" are empty ones)
        gold = reference.strip()
    candidates = answer_candidates(completion)
    if not candidates:
        return RewardOutput(0.0, "no final answer")
    if _hedged(candidates[0]):
        return RewardOutput(0.0, f"hedged answer {candidates[0][:100]!r}: a number qualified by 'or', 'not'...")
    try:
        worker = _IDLE.get_nowait()
    except queue.Empty:
        worker = _Worker()
    reply = worker.check(gold, candidates, float(timeout))
    if reply is _DIED:  # it died while idle (killed, out of memory...): a fresh worker checks the answer again
        worker = _Worker()
        reply = worker.check(gold, candidates, float(timeout))
    if reply is _DIED:
        return RewardOutput(0.0, "the math-verify checker worker died twice before answering")
    if reply is None:
        return RewardOutput(0.0, f"timeout: math-verify gave no verdict within {timeout} s")
    _IDLE.put(worker)
    if isinstance(reply, dict):
        raise ValueError(f"example['answer']: could not parse the reference answer {gold!r} "
                         f"(from {reference[-200:]!r}): {reply['error']}")
    return RewardOutput(float(reply[0]), str(reply[1]))
