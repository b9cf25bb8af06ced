"""Math reward: the final answer (``\\boxed{}`` or ``#### x``) checked for equivalence with math-verify.

The reference comes from ``example["answer"]``: GSM8K's solution text ending in ``#### 42``, a MATH
solution with ``\\boxed{...}``, or a bare answer.  1.0 when math-verify finds the response's final
answer equivalent to the reference (``1/2`` = ``0.5`` = ``\\frac12``), else 0.0.
"""
from __future__ import annotations

import re
from typing import Mapping

from .base import RewardOutput

__all__ = ["math_reward", "final_answer"]

_HASHES = re.compile(r"####\s*([^\n]+)")


def _last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1 : i]
    return None


def final_answer(text: str) -> str | None:
    """The final answer of a solution: the last ``\\boxed{}``, else what follows the last ``####``."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    hashes = _HASHES.findall(text)
    return hashes[-1].strip().replace(",", "") if hashes else None


def math_reward(completion: str, example: Mapping) -> RewardOutput:
    from math_verify import parse, verify

    reference = str(example["answer"])
    gold = final_answer(reference) or reference.strip()
    predicted = final_answer(completion)
    if predicted is None:
        return RewardOutput(0.0, "no final answer")
    gold_parsed, predicted_parsed = parse(f"${gold}$"), parse(f"${predicted}$")
    if not predicted_parsed:
        return RewardOutput(0.0, "unparsable answer")
    return RewardOutput(1.0 if verify(gold_parsed, predicted_parsed) else 0.0)
