"""Parsing tool calls out of generated text, per chat-template format (``actor_rollout_ref.rollout.multi_turn.format``).

``hermes`` (Qwen2.5, the tiny test model): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number
per turn. A call whose JSON does not parse, or that lacks a name, is skipped (the model gets no tool answer for it).
"""
from __future__ import annotations

import json
import re
from typing import Callable

from verl.tools.schemas import OpenAIFunctionCallSchema

__all__ = ["ToolParser", "HermesToolParser", "get_tool_parser", "register_tool_parser"]

_PARSERS: dict[str, type] = {}


def register_tool_parser(name: str) -> Callable[[type], type]:

    def decorator(cls: type) -> type:
        _PARSERS[name] = cls
        return cls

    return decorator


def get_tool_parser(name: str) -> "ToolParser":
    if name not in _PARSERS:
        raise ValueError(f"unknown actor_rollout_ref.rollout.multi_turn.format={name!r}; known: {sorted(_PARSERS)}")
    return _PARSERS[name]()


class ToolParser:
    """Text of one assistant turn -> ``(content without the calls, calls)``."""

    def extract_tool_calls(self, text: str) -> tuple[str, list[OpenAIFunctionCallSchema]]:
        raise NotImplementedError


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    pattern = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

    def extract_tool_calls(self, text: str) -> tuple[str, list[OpenAIFunctionCallSchema]]:
        calls = []
        for match in self.pattern.findall(text):
            try:
                data = json.loads(match.strip())
            except ValueError:
                continue
            if not isinstance(data, dict) or not isinstance(data.get("name"), str):
                continue
            arguments = data.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    continue
            if not isinstance(arguments, dict):
                continue
            calls.append(OpenAIFunctionCallSchema(name=data["name"], arguments=arguments))
        content = self.pattern.sub("", text)
        return content, calls
