"""A calculator tool: evaluates one arithmetic expression (``+ - * / // % **``, parentheses, unary minus) by walking
its syntax tree, never with ``eval``."""
from __future__ import annotations

import ast
import math
import operator
from typing import Any

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

__all__ = ["CalculatorTool", "evaluate_expression"]

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPONENT = 1000
_MAX_LENGTH = 1000

DEFAULT_SCHEMA = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression, e.g. (3 + 4) * 5",
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "the expression"
                }
            },
            "required": ["expression"]
        }
    }
}


def evaluate_expression(expression: str) -> float | int:
    """The value of an arithmetic expression; ``ValueError`` for anything else (names, calls, huge powers)."""
    if len(expression) > _MAX_LENGTH:
        raise ValueError(f"expression longer than {_MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from exc

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and \
                not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
                raise ValueError(f"exponent {right} is too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        raise ValueError(f"unsupported element {type(node).__name__} in {expression!r}")

    try:
        value = walk(tree)
    except ZeroDivisionError as exc:
        raise ValueError("division by zero") from exc
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


class CalculatorTool(BaseTool):
    """``calculator(expression)`` -> the value as text, or ``Error: ...``."""

    def __init__(self, config: dict | None = None, tool_schema: OpenAIFunctionToolSchema | None = None) -> None:
        super().__init__(config or {}, tool_schema or OpenAIFunctionToolSchema.from_dict(DEFAULT_SCHEMA))

    async def execute(self, instance_id: str, parameters: dict[str, Any],
                      **kwargs: Any) -> tuple[ToolResponse, float, dict]:
        expression = parameters.get("expression") if isinstance(parameters, dict) else None
        if not isinstance(expression, str):
            return ToolResponse(text="Error: pass the expression as a string argument 'expression'"), 0.0, {"ok": False}
        try:
            value = evaluate_expression(expression)
        except (ValueError, OverflowError, TypeError) as exc:
            return ToolResponse(text=f"Error: {exc}"), 0.0, {"ok": False}
        return ToolResponse(text=str(value)), 0.0, {"ok": True}
