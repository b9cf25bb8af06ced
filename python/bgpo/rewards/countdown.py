"""Countdown reward: an arithmetic equation that uses exactly the given numbers and reaches the target.

The response's equation is the text inside its last ``<answer>`` tags (all of it without tags),
unwrapped from a ``\\boxed{}`` if it has one (also one left open at the end), with LaTeX's
``\\times``/``\\cdot`` read as ``*``, ``\\div`` as ``/``, ``\\frac{a}{b}`` as ``(a)/(b)``, ``\\left``/``\\right``
and ``$`` dropped, and only its left side kept if it contains ``=``.  It is parsed with ``ast`` and
evaluated by walking the tree: only integer literals, ``+ - * /``, unary minus and parentheses are
accepted, values are exact ``Fraction``s — nothing is ever ``eval``'d.

Scores: 1.0 correct; 0.1 a well-formed arithmetic expression that uses other numbers or reaches
another value; 0 otherwise.  The values 1.0 and 0.1 are TinyZero's (``compute_score``, which d1's
Countdown reward follows), but the 0.1 is narrower: TinyZero pays it for any text inside
``<answer>`` tags that is not a correct equation, bgpo only for a parsable arithmetic expression.
"""
from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from fractions import Fraction
from typing import Mapping

from .base import RewardOutput, answer_span, last_boxed

__all__ = ["countdown_reward", "evaluate_arithmetic", "extract_equation"]

_OPERATORS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__}
_MAX_LENGTH = 200
# LaTeX and Unicode spellings of the operators, and wrappers that carry no arithmetic.
_SPELLINGS = {"\\times": "*", "\\cdot": "*", "\\div": "/", "\\left": "", "\\right": "", "$": "",
              "\u00d7": "*", "\u22c5": "*", "\u00b7": "*", "\u00f7": "/", "\u2212": "-"}
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


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


def extract_equation(completion: str) -> str:
    """The expression a response answers with, in Python's arithmetic syntax (see the module docstring)."""
    text = answer_span(completion)
    boxed = last_boxed(text, allow_unclosed=True)
    if boxed is not None:
        text = boxed
    for spelling, symbol in _SPELLINGS.items():
        text = text.replace(spelling, symbol)
    while (unfracked := _FRAC.sub(r"((\1)/(\2))", text)) != text:  # innermost first: the groups hold no braces
        text = unfracked
    return text.replace("{", "(").replace("}", ")").split("=")[0]


def _integer_target(target) -> int:
    """``example['target']`` as an int: an int (numpy's too, not a bool), a float with no fractional part
    or a string of an integer; anything else (22.9 must not become 22) is an error."""
    try:
        if isinstance(target, float):
            if target.is_integer():
                return int(target)
        elif isinstance(target, str):
            return int(target)
        elif not isinstance(target, bool):
            return operator.index(target)
    except (TypeError, ValueError):
        pass
    raise ValueError(f"example['target']: expected an int, a whole float or a string of an int, got {target!r}")


def countdown_reward(completion: str, example: Mapping) -> RewardOutput:
    numbers = example.get("numbers", example.get("nums"))
    try:
        numbers = [operator.index(n) for n in numbers]
    except TypeError:
        raise ValueError(f"example['numbers']: expected a list of ints (or 'nums'), got {numbers!r}") from None
    target = _integer_target(example.get("target"))
    equation = extract_equation(completion)
    try:
        value, used = evaluate_arithmetic(equation)
    except ValueError as error:
        return RewardOutput(0.0, str(error))
    if Counter(used) != Counter(numbers):
        return RewardOutput(0.1, "numbers differ")
    if value != target:
        return RewardOutput(0.1, "wrong value")
    return RewardOutput(1.0)
