"""Synthetic planning tasks, so Countdown and Sudoku need no download.

* ``countdown_examples``: a few small numbers and a target reachable from all of them with ``+ - *``
  (each number used exactly once); the answer is one such equation.
* ``sudoku_examples``: 4x4 Sudoku puzzles with a unique solution.  A solved grid is a random
  relabelling / row and column shuffle of a valid grid; cells are emptied one at a time, in random
  order, as long as the puzzle keeps a unique solution, down to ``max_empty`` empty cells.

Every example is a dict with the fields the task's prompt and reward read (``numbers``/``target``,
``puzzle``/``solution``) and the supervised ``answer`` text (the warm-up of the CPU demo trains on it).
Generation is a pure function of the seed.  Options no example can satisfy are refused up front, and a
rejection loop gives up with a ValueError after ``_PATIENCE`` rejections in a row instead of hanging.
"""
from __future__ import annotations

import itertools
import random
from typing import Callable

__all__ = ["countdown_examples", "sudoku_examples", "solve_sudoku", "sudoku_solutions"]

# A 4x4 Sudoku with one solution keeps at least 4 givens, so at most 16 - 4 = 12 cells are empty.  Checked
# exhaustively over all 288 solved 4x4 grids (tests/test_data.py): no 3 cells of a grid determine it (every
# 3-cell pattern is shared by another grid), some 4 cells do.
SUDOKU_MAX_EMPTY = 12
# Rejected candidates in a row before a generator gives up (~0.4 s of 3-number Countdown, ~0.7 s of Sudoku
# attempts on the dev CPU); feasible options accept far more often (Countdown max_target=1: 2.4%, Sudoku with
# 12 empty cells: 29% of candidates), so the chance of giving up on them is nil ((1 - 0.024)^100000).
_PATIENCE = {"countdown": 100_000, "sudoku": 1_000}


def _draw(count: int, attempt: Callable[[], dict | None], *, patience: int, hint: str) -> list[dict]:
    """``count`` examples from ``attempt`` (``None``: a rejected candidate); ``patience`` rejections in a row
    stop with a ValueError that says which options to relax (``hint``)."""
    examples, rejected = [], 0
    while len(examples) < count:
        example = attempt()
        if example is not None:
            examples.append(example)
            rejected = 0
        elif (rejected := rejected + 1) == patience:
            raise ValueError(f"{hint}: {patience} candidates in a row were rejected "
                             f"({len(examples)} of {count} examples made)")
    return examples


def _countdown_expression(rng: random.Random, numbers: list[int]) -> tuple[str, int]:
    """A random left-to-right expression using each number once, fully parenthesised where needed."""
    order = numbers[:]
    rng.shuffle(order)
    text, value = str(order[0]), order[0]
    for n in order[1:]:
        op = rng.choice("+-*")
        if op == "*" and any(o in text for o in "+-"):
            text = f"({text})"
        text = f"{text}{op}{n}"
        value = value + n if op == "+" else value - n if op == "-" else value * n
    return text, value


def countdown_examples(
    count: int, *, seed: int, num_numbers: int = 3, max_number: int = 9, max_target: int = 99
) -> list[dict]:
    """``count`` Countdown problems: ``numbers`` (list of ints), a positive ``target``, an ``answer`` equation."""
    if num_numbers < 2:
        raise ValueError(f"num_numbers: expected at least 2, got {num_numbers}")
    if max_number < 1:
        raise ValueError(f"max_number: expected at least 1 (numbers are drawn from 1..max_number), got {max_number}")
    if max_target < 1:
        raise ValueError(f"max_target: expected at least 1 (targets are in 1..max_target), got {max_target}")
    rng = random.Random(seed)

    def attempt() -> dict | None:
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        expression, target = _countdown_expression(rng, numbers)
        return {"numbers": numbers, "target": target, "answer": expression} if 0 < target <= max_target else None

    return _draw(count, attempt, patience=_PATIENCE["countdown"],
                 hint=f"max_target: no target in 1..{max_target} from {num_numbers} numbers in 1..{max_number}; "
                      "raise max_target or change num_numbers/max_number")


def sudoku_solutions(grid: list[int], limit: int = 2) -> list[list[int]]:
    """Up to ``limit`` solutions of a 4x4 grid (16 ints, 0 = empty), by backtracking."""
    solutions: list[list[int]] = []
    grid = grid[:]

    def allowed(cell: int) -> set[int]:
        r, c = divmod(cell, 4)
        box = [4 * (2 * (r // 2) + dr) + 2 * (c // 2) + dc for dr in (0, 1) for dc in (0, 1)]
        used = {grid[4 * r + i] for i in range(4)} | {grid[4 * i + c] for i in range(4)} | {grid[b] for b in box}
        return {1, 2, 3, 4} - used

    def search() -> None:
        if len(solutions) >= limit:
            return
        empty = next((i for i, v in enumerate(grid) if v == 0), None)
        if empty is None:
            solutions.append(grid[:])
            return
        for digit in sorted(allowed(empty)):
            grid[empty] = digit
            search()
            grid[empty] = 0

    search()
    return solutions


def solve_sudoku(grid: list[int]) -> list[int] | None:
    """The unique solution of a 4x4 puzzle, or ``None`` if it has none or several."""
    solutions = sudoku_solutions(grid, limit=2)
    return solutions[0] if len(solutions) == 1 else None


def _random_solved_grid(rng: random.Random) -> list[int]:
    base = [1, 2, 3, 4, 3, 4, 1, 2, 2, 1, 4, 3, 4, 3, 2, 1]
    digits = [1, 2, 3, 4]
    rng.shuffle(digits)
    bands = [[0, 1], [2, 3]]
    rng.shuffle(bands)
    rows = list(itertools.chain(*(rng.sample(b, 2) for b in bands)))
    stacks = [[0, 1], [2, 3]]
    rng.shuffle(stacks)
    cols = list(itertools.chain(*(rng.sample(s, 2) for s in stacks)))
    return [digits[base[4 * r + c] - 1] for r in rows for c in cols]


def sudoku_examples(count: int, *, seed: int, min_empty: int = 4, max_empty: int = 10) -> list[dict]:
    """``count`` unique-solution 4x4 puzzles: ``puzzle`` and ``solution`` as 16-digit strings (0 = empty)."""
    if not 1 <= min_empty <= max_empty:
        raise ValueError(f"min_empty: expected 1 <= min_empty <= max_empty, got {min_empty}, {max_empty}")
    if max_empty > SUDOKU_MAX_EMPTY:
        raise ValueError(f"max_empty: expected min_empty <= max_empty <= {SUDOKU_MAX_EMPTY} (a 4x4 Sudoku with one "
                         f"solution keeps at least 4 givens), got {max_empty}")
    rng = random.Random(seed)

    def attempt() -> dict | None:
        solution = _random_solved_grid(rng)
        puzzle = solution[:]
        target = rng.randint(min_empty, max_empty)
        cells = list(range(16))
        rng.shuffle(cells)
        empty = 0
        for cell in cells:
            if empty == target:
                break
            kept, puzzle[cell] = puzzle[cell], 0
            if solve_sudoku(puzzle) is None:
                puzzle[cell] = kept
            else:
                empty += 1
        if empty < min_empty:
            return None
        text = "".join(map(str, solution))
        return {"puzzle": "".join(map(str, puzzle)), "solution": text, "answer": text}

    return _draw(count, attempt, patience=_PATIENCE["sudoku"],
                 hint=f"min_empty: no puzzle with {min_empty}..{max_empty} empty cells found; lower min_empty")
