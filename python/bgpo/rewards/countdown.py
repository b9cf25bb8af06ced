"""Countdown reward: an arithmetic equation that uses exactly the given numbers and reaches the target.

The response's equation (inside ``<answer>`` tags if present; the left side if it contains ``=``) is
parsed with ``ast`` and evaluated by walking the tree: only integer literals, ``+ - * /``, unary
minus and parentheses are accepted, values are exact ``Fraction``s — nothing is ever ``eval``'d.
Scores (d1's): 1.0 correct; 0.1 well-formed but wrong (other numbers, or another value); 0 otherwise.
"""
from __future__ import annotations

import ast
from collections import Counter
from fractions import Fraction
from typing import Mapping

from .base import RewardOutput, answer_span

__all__ = ["countdown_reward", "evaluate_arithmetic"]

_OPERATORS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__}
_MAX_LENGTH = 200


def evaluate_arithmetic(text: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integer literals it uses; ValueError if not one."""
    if len(text) > _MAX_LENGTH:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError("not an expression") from error
    literals: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp):
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div):
                if right == 0:
                    raise ValueError("division by zero")
                return left / right
            if type(node.op) in _OPERATORS:
                return _OPERATORS[type(node.op)](left, right)
        raise ValueError(f"{type(node).__name__} is not allowed")

    return walk(tree.body), literals


def countdown_reward(completion: str, example: Mapping) -> RewardOutput:
    numbers = example.get("numbers", example.get("nums"))
    target = int(example["target"])
    equation = answer_span(completion).split("=")[0]
    try:
        value, used = evaluate_arithmetic(equation)
    except ValueError as error:
        return RewardOutput(0.0, str(error))
    if Counter(used) != Counter(int(n) for n in numbers):
        return RewardOutput(0.1, "numbers differ")
    if value != target:
        return RewardOutput(0.1, "wrong value")
    return RewardOutput(1.0)
