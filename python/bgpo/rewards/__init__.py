"""Rewards for the trainer: math (math-verify), Countdown, 4x4 Sudoku, code (sandboxed), or your own.

``get_reward(name)`` returns ``fn(completion, example) -> RewardOutput`` for a built-in task name
(``math``, ``countdown``, ``sudoku``, ``code``) or a ``"module:function"`` of yours, whose function
takes ``(completion: str, example: dict)`` and returns a float or a ``RewardOutput(score, reason)``.
"""
from __future__ import annotations

import importlib
from typing import Callable, Mapping

from .base import RewardOutput, answer_span, as_output, last_boxed
from .code import code_reward, run_sandboxed
from .countdown import countdown_reward, evaluate_arithmetic, extract_equation
from .math import answer_candidates, final_answer, math_reward
from .sudoku import sudoku_reward

__all__ = [
    "RewardOutput", "REWARDS", "get_reward", "answer_span", "last_boxed", "math_reward", "final_answer",
    "answer_candidates", "countdown_reward", "evaluate_arithmetic", "extract_equation", "sudoku_reward",
    "code_reward", "run_sandboxed",
]

REWARDS: dict[str, Callable] = {
    "math": math_reward,
    "countdown": countdown_reward,
    "sudoku": sudoku_reward,
    "code": code_reward,
}


def get_reward(name: str) -> Callable[[str, Mapping], RewardOutput]:
    """The reward called ``name`` (a task in ``REWARDS`` or ``"module:function"``), returning ``RewardOutput``s."""
    if name in REWARDS:
        function = REWARDS[name]
    elif ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"reward.function: cannot import {name!r} ({error})") from error
        if not callable(function):
            raise ValueError(f"reward.function: {name!r} is not callable")
    else:
        raise ValueError(f"reward.function: expected one of {sorted(REWARDS)} or 'module:function', got {name!r}")

    def reward(completion: str, example: Mapping) -> RewardOutput:
        return as_output(function(completion, example))

    reward.__name__ = getattr(function, "__name__", name)
    return reward
