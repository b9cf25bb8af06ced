"""The math reward's worker process (started by ``bgpo.rewards.math``; it imports math-verify, not bgpo).

Reads one JSON request ``[gold, [candidate, ...]]`` per line on stdin and answers each with one JSON
line on stdout: ``[score, reason]``, or ``{"error": why}`` when ``gold`` itself cannot be parsed (the
parent raises: every answer would score 0 against it).  math-verify runs with its own (``signal.alarm``)
timeouts off: the parent bounds the time, the reference's parse included, by killing this process.
"""
from __future__ import annotations

import json
import sys


class UnparsableGold(ValueError):
    """The reference answer is empty or math-verify finds no answer in it."""


def verify_answer(gold: str, candidates: list[str]) -> tuple[float, str]:
    """1.0 if math-verify finds one of ``candidates`` equivalent to ``gold``, else 0.0 (and why)."""
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    if not gold_parsed:
        raise UnparsableGold("empty" if not gold.strip() else "math-verify finds no answer in it")
    parsed = [p for p in (parse(f"${c}$", parsing_timeout=None) for c in candidates) if p]
    if not parsed:
        return 0.0, "unparsable answer"
    return (1.0, "") if any(verify(gold_parsed, p, timeout_seconds=None) for p in parsed) else (0.0, "")


def serve(requests, replies) -> None:
    """Answer requests until stdin closes; "ready" first, once math-verify (sympy) is imported."""
    import math_verify  # noqa: F401  (so that the first answer's time does not include the import)

    replies.write('"ready"\n')
    replies.flush()
    for line in requests:
        try:
            gold, candidates = json.loads(line)
            result = verify_answer(str(gold), [str(c) for c in candidates])
        except UnparsableGold as error:
            result = {"error": str(error)}
        except Exception as error:  # noqa: BLE001 (an answer math-verify cannot handle scores 0)
            result = (0.0, f"math-verify failed: {type(error).__name__}")
        replies.write(json.dumps(result) + "\n")
        replies.flush()


if __name__ == "__main__":
    import logging
    import os

    logging.disable(logging.WARNING)  # math-verify warns once that its timeouts are off: they are, on purpose
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the replies
    sys.stdout = sys.stderr
    serve(sys.stdin, replies)
