"""4x4 Sudoku reward: the fraction of the puzzle's empty cells filled with the solution's digit.

The answer grid is the first 16 digits (any of 0-9) of the response, inside ``<answer>`` tags if
present, read row by row; cell i of the answer is compared with cell i of the solution, whatever
digit it holds.  A 0 (or another digit than 1-4) is a wrong cell, never skipped: skipping it would
shift every later digit onto another cell, and a response that copies the puzzle back, zeros
included, would be paid for the given digits that land on empty cells.  Missing cells count as
wrong.  ``example`` holds ``puzzle`` and ``solution`` as 16-character strings (row by row; a puzzle
cell that is not 1-4 is empty).
"""
from __future__ import annotations

from typing import Mapping

from .base import RewardOutput, answer_span

__all__ = ["sudoku_reward"]

_CELLS = 16


def _grid(example: Mapping, key: str, allowed: str) -> str:
    value = example.get(key)
    if not isinstance(value, str) or len(value) != _CELLS or any(c not in allowed for c in value):
        raise ValueError(f"example[{key!r}]: expected a string of {_CELLS} characters from {allowed!r}, got {value!r}")
    return value


def sudoku_reward(completion: str, example: Mapping) -> RewardOutput:
    puzzle = _grid(example, "puzzle", "0123456789.")
    solution = _grid(example, "solution", "1234")
    grid = [c for c in answer_span(completion) if c in "0123456789"][:_CELLS]
    empty = [i for i, c in enumerate(puzzle) if c not in "1234"]
    if not empty:
        return RewardOutput(0.0, "puzzle has no empty cell")
    correct = sum(1 for i in empty if i < len(grid) and grid[i] == solution[i])
    return RewardOutput(correct / len(empty), "" if len(grid) == _CELLS else "incomplete grid")
