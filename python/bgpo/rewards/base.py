"""The reward contract: ``fn(completion: str, example: Mapping) -> float | RewardOutput``.

``completion`` is the decoded response (special tokens dropped), ``example`` the dataset row it
answers.  A reward returns a float, or a ``RewardOutput`` with the reason for its score (the code
sandbox says why a program failed); ``as_output`` turns either into a ``RewardOutput``.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

__all__ = ["RewardOutput", "as_output", "answer_span", "last_boxed"]

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
_BOXED = re.compile(r"\\boxed(?![A-Za-z])\s*")  # ``\boxedfoo`` is another control word
_TOKEN = re.compile(r"[^\s{}$]*")


class RewardOutput(NamedTuple):
    score: float
    reason: str = ""


def as_output(value) -> RewardOutput:
    """A ``RewardOutput`` from a reward's return value; a non-finite or non-numeric score is an error."""
    if isinstance(value, RewardOutput):
        output = value
    elif isinstance(value, tuple) and len(value) == 2:
        output = RewardOutput(float(value[0]), str(value[1]))
    else:
        output = RewardOutput(float(value))
    if not math.isfinite(output.score):
        raise ValueError(f"reward: the reward function returned a non-finite score {output.score!r}")
    return output


def answer_span(completion: str) -> str:
    """The text inside the last ``<answer>...</answer>`` (an unclosed tag runs to the end), else all of it."""
    spans = _ANSWER_TAG.findall(completion)
    return (spans[-1] if spans else completion).strip()


def last_boxed(text: str, *, allow_unclosed: bool = False) -> str | None:
    """The argument of the last ``\\boxed``, or None.

    A ``{`` right after ``\\boxed`` (whitespace allowed) opens its argument, which runs to the matching
    ``}``.  Without one, TeX takes a single token as the argument: read here as the run of characters
    up to the next whitespace, brace or ``$``, less a trailing ``.,;:`` (``\\boxed 7.`` is ``7``), and
    None if that is empty.  A later ``{`` is never the box's (``\\boxed 7. Check: x^{3}`` is ``7``).

    ``allow_unclosed``: a box still open at the end of ``text`` (a generation that stopped, or an
    ``</answer>`` before the ``}``) yields everything after its ``{``.
    """
    boxes = list(_BOXED.finditer(text))
    if not boxes:
        return None
    brace = boxes[-1].end()
    if not text.startswith("{", brace):
        return _TOKEN.match(text, brace)[0].rstrip(".,;:") or None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1 : i]
    return text[brace + 1 :] if allow_unclosed else None
