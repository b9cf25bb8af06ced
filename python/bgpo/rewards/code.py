"""Code reward: the program and its unit tests run in the code sandbox; 1.0 if the tests pass.

The program is the last fenced code block of the response (else the whole response).  Tests come from
the example: HumanEval-style ``test`` (defines ``check``) with ``entry_point``, or MBPP-style
``test_list`` (assert statements) with optional ``test_setup_code``.  When the program does not
define ``entry_point`` the example's ``prompt`` (the function signature) is put before it.

The program runs in ``sandbox.py`` (bubblewrap namespaces, rlimits); the tests run in the harness's
judge (``_harness.py``), which calls the program's functions across a pipe with plain values only and
compares them strictly (types included; ``==``, ``!=``, ``in``, ``not in``, chained or not): ``True`` does not
pass for ``1``, nor ``3.0`` for ``3``.  What
crosses is None/bool/int/float/complex/str/bytes and lists, tuples, dicts, sets of them; a test that
passes objects of other types to the program, or a program returning them, fails, and a function's
changes to its arguments are not seen by the test.  The tests see the program's top-level functions,
classes, plain constants and plainly imported modules (``import math``), never under a builtin's name;
the example's own code (a HumanEval prompt that parses, MBPP's ``test_setup_code``) runs before the tests
and its definitions win over the program's, but the function under test.  Any failure — syntax error,
failing assert, crash, timeout, limit hit — gives 0.0 with the reason.  Without a working sandbox the
reward refuses to run code (``SandboxUnavailable``, a RuntimeError saying what to install) unless
``allow_unsandboxed=True`` (the trainer's ``allow_unsandboxed_code``).
"""
from __future__ import annotations

import ast
import re
from typing import Mapping

from .base import RewardOutput
from .sandbox import Limits, require_sandbox, run_program

__all__ = ["code_reward", "extract_program", "run_sandboxed"]

_FENCE = re.compile(r"```(?:[a-zA-Z0-9_+-]*)\n(.*?)(?:```|$)", re.DOTALL)
TIME_LIMIT = Limits.time


def extract_program(completion: str) -> str:
    """The last fenced code block of ``completion``, or all of it."""
    blocks = _FENCE.findall(completion)
    return (blocks[-1] if blocks else completion).strip("\n")


def _tests(example: Mapping) -> tuple[str, str]:
    """(setup, test): the example's trusted code run before its tests, and the tests."""
    if example.get("test"):
        entry = example.get("entry_point")
        prompt = example.get("prompt") or ""
        try:  # HumanEval's prompt is code (imports, helpers such as ``poly``); a prose prompt is not
            ast.parse(prompt)
        except (SyntaxError, ValueError):
            prompt = ""
        return prompt, f"{example['test']}\n" + (f"check({entry})\n" if entry else "")
    tests = example.get("test_list") or []
    if not tests:
        raise ValueError("example: a code example needs 'test' (+ 'entry_point') or 'test_list'")
    return example.get("test_setup_code") or "", "\n".join(tests) + "\n"


def run_sandboxed(program: str, test: str = "", *, setup: str = "", entry: str | None = None,
                  time_limit: float = TIME_LIMIT, memory_limit: int = Limits.memory,
                  file_size_limit: int = Limits.file_size, allow_unsandboxed: bool = False) -> RewardOutput:
    """Run ``test`` (Python, e.g. asserts) against ``program`` in the sandbox; 1.0 if it passes, else 0.0
    and why.  With an empty ``test`` the program passes if it loads (runs its top level) without error.
    ``setup``: the example's trusted code, run before ``test``; its names win over the program's, but
    ``entry`` (the function under test) is always the program's."""
    for name, value in (("program", program), ("test", test), ("setup", setup)):
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a str, got {type(value).__name__}")
    if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
        raise ValueError(f"entry: expected a Python identifier or None, got {entry!r}")
    limits = Limits(time=time_limit, memory=memory_limit, file_size=file_size_limit)
    sandboxed = require_sandbox(allow_unsandboxed)
    return run_program(program, test, setup=setup, entry=entry, limits=limits, sandboxed=sandboxed)


def code_reward(completion: str, example: Mapping, *, time_limit: float = TIME_LIMIT,
                allow_unsandboxed: bool = False) -> RewardOutput:
    program = extract_program(completion)
    entry = example.get("entry_point")
    if entry and not re.search(rf"^def\s+{re.escape(entry)}\s*\(", program, re.MULTILINE):
        program = f"{example.get('prompt', '')}{program}"
    setup, test = _tests(example)
    return run_sandboxed(program, test, setup=setup, entry=entry or None, time_limit=time_limit,
                         allow_unsandboxed=allow_unsandboxed)
