"""Countdown scoring: an equation that reaches ``target`` using each of ``numbers`` exactly once.

The equation is taken from the last ``<answer>...</answer>`` of the response (or, with ``require_answer_tag=False``,
from the last line that looks like an equation). It is evaluated by walking its Python AST with exact fractions and
only ``+ - * /``, unary minus and parentheses allowed: model output is never passed to ``eval``, so
``__import__('os')``, attribute access, calls, names and ``**`` are rejected instead of run.
"""
from __future__ import annotations

import ast
import json
import re
from fractions import Fraction
from typing import Any, Mapping

MAX_EXPRESSION_CHARS = 256  # an equation over a handful of numbers is short; longer text is not an answer
MAX_ABS_VALUE = 10**12  # intermediate results beyond this cannot come from a sane countdown answer

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_EQUATION_LINE = re.compile(r"^[\d\s+\-*/().=]+$")

_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


class UnsafeExpressionError(ValueError):
    """The expression uses something other than integers, + - * /, unary minus and parentheses."""


def parse_ground_truth(ground_truth: Any) -> tuple[Fraction, list[int]]:
    """``(target, numbers)`` from ``{"target": int, "numbers": [int, ...]}`` (a dict, or its JSON string).

    Parquet round trips turn the list into a numpy array and ints into numpy ints; both are accepted.
    """
    if isinstance(ground_truth, str):
        try:
            ground_truth = json.loads(ground_truth)
        except json.JSONDecodeError as exc:
            raise ValueError(f"countdown ground_truth must be a dict or JSON object with 'target' and 'numbers', "
                             f"got the string {ground_truth[:80]!r}") from exc
    if not isinstance(ground_truth, Mapping) or "target" not in ground_truth or "numbers" not in ground_truth:
        raise ValueError(f"countdown ground_truth must have keys 'target' and 'numbers' (reward_model.ground_truth "
                         f"of the data row), got {ground_truth!r}")
    try:
        target = Fraction(int(ground_truth["target"]))
        numbers = [int(n) for n in ground_truth["numbers"]]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"countdown ground_truth 'target' must be an int and 'numbers' a list of ints, got "
                         f"{ground_truth!r}") from exc
    return target, numbers


def extract_equation(solution_str: str, require_answer_tag: bool = True) -> str | None:
    """The equation a response proposes, or None.

    The content of the last ``<answer>`` tag; without tags (and ``require_answer_tag=False``) the last line made
    only of digits, operators, parentheses and ``=``. A trailing ``= value`` is dropped (the left side is scored).
    """
    if not isinstance(solution_str, str):
        return None
    tagged = _ANSWER_TAG.findall(solution_str)
    if tagged:
        equation = tagged[-1]
    elif require_answer_tag:
        return None
    else:
        lines = [ln.strip() for ln in solution_str.strip().splitlines()]
        candidates = [ln for ln in lines if _EQUATION_LINE.match(ln) and re.search(r"\d", ln)]
        if not candidates:
            return None
        equation = candidates[-1]
    equation = equation.strip()
    if "=" in equation:
        equation = equation.split("=")[0].strip()
    return equation or None


def _eval_node(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body, used)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int):
            raise UnsafeExpressionError(f"only integer literals are allowed, got {node.value!r}")
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp):
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise UnsafeExpressionError(f"operator {type(node.op).__name__} is not allowed (only + - * /)")
        left, right = _eval_node(node.left, used), _eval_node(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ZeroDivisionError("division by zero in the equation")
        value = op(left, right)
        if abs(value) > MAX_ABS_VALUE:
            raise UnsafeExpressionError(f"intermediate value exceeds {MAX_ABS_VALUE}")
        return value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval_node(node.operand, used)
        return -value if isinstance(node.op, ast.USub) else value
    raise UnsafeExpressionError(f"{type(node).__name__} is not allowed in an equation")


def evaluate_equation(equation: str) -> tuple[Fraction, list[int]]:
    """Exact value of ``equation`` and the integer literals it uses; raises on anything unsafe or invalid."""
    if len(equation) > MAX_EXPRESSION_CHARS:
        raise UnsafeExpressionError(f"equation longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(equation, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise UnsafeExpressionError(f"not a valid expression: {exc}") from exc
    used: list[int] = []
    try:
        value = _eval_node(tree, used)
    except RecursionError as exc:
        raise UnsafeExpressionError("expression nested too deeply") from exc
    return value, used


def compute_score(solution_str: str,
                  ground_truth: Any,
                  method: str = "strict",
                  format_score: float = 0.1,
                  score: float = 1.0,
                  require_answer_tag: bool | None = None,
                  **kwargs: Any) -> float:
    """``score`` when the equation uses every number exactly once and equals the target; ``format_score`` when an
    equation was given but is wrong, uses other numbers, or is invalid/unsafe; 0 when there is no equation.

    ``method="strict"`` needs ``<answer>`` tags; ``"flexible"`` also accepts a bare last equation line
    (``require_answer_tag`` overrides the method when given).
    """
    if method not in ("strict", "flexible"):
        raise ValueError(f"countdown method must be 'strict' or 'flexible', got {method!r}")
    target, numbers = parse_ground_truth(ground_truth)
    if require_answer_tag is None:
        require_answer_tag = method == "strict"
    equation = extract_equation(solution_str, require_answer_tag=require_answer_tag)
    if equation is None:
        return 0.0
    try:
        value, used = evaluate_equation(equation)
    except (UnsafeExpressionError, ZeroDivisionError):
        return float(format_score)
    if sorted(used) != sorted(numbers):
        return float(format_score)
    return float(score) if value == target else float(format_score)
