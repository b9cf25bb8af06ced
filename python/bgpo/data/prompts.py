"""Default prompt templates of the built-in tasks (``str.format`` over an example's fields).

They follow the d1 / BGPO evaluation prompts: reasoning, then the final answer in a form the reward
reads (``\\boxed{}`` for math, ``<answer>`` tags for the planning tasks, a fenced block for code).
"""
from __future__ import annotations

__all__ = ["TASK_PROMPTS"]

TASK_PROMPTS = {
    "math": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "countdown": (
        "Using the numbers [{numbers}], create an equation that equals {target}. You can use basic arithmetic "
        "operations (+, -, *, /) and each number exactly once. Show your reasoning, then give the equation "
        "inside <answer></answer> tags, for example <answer>(1 + 2) * 3</answer>."
    ),
    "sudoku": (
        "Solve this 4x4 Sudoku. The grid is given row by row as 16 digits, 0 marks an empty cell: {puzzle}. "
        "Every row, column and 2x2 box must contain 1, 2, 3 and 4 exactly once. Give the 16 digits of the "
        "solved grid inside <answer></answer> tags."
    ),
    "code": (
        "{question}\nWrite a Python solution that passes the tests. Reply with the complete code in one "
        "```python code block."
    ),
}
