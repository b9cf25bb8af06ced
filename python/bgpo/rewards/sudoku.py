"""4x4 Sudoku reward: the fraction of the puzzle's empty cells filled with the solution's digit.

The grid is read from the response (inside ``<answer>`` tags if present) as its first 16 digits 1-4,
row by row; missing digits count as wrong.  ``example`` holds ``puzzle`` and ``solution`` as 16-digit
strings (0 = empty in the puzzle).
"""
from __future__ import annotations

from typing import Mapping

from .base import RewardOutput, answer_span

__all__ = ["sudoku_reward"]


def sudoku_reward(completion: str, example: Mapping) -> RewardOutput:
    puzzle, solution = str(example["puzzle"]), str(example["solution"])
    grid = [c for c in answer_span(completion) if c in "1234"][:16]
    empty = [i for i, c in enumerate(puzzle) if c not in "1234"]
    if not empty:
        return RewardOutput(0.0, "puzzle has no empty cell")
    correct = sum(1 for i in empty if i < len(grid) and grid[i] == solution[i])
    return RewardOutput(correct / len(empty), "" if len(grid) == 16 else "incomplete grid")
