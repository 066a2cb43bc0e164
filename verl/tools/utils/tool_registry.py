"""The tool config file (``actor_rollout_ref.rollout.multi_turn.tool_config_path``)::

    tools:
      - class_name: verl.tools.calculator_tool.CalculatorTool
        config: {type: native}
        tool_schema:            # optional when the class has a default schema
          type: function
          function: {name: calculator, description: ..., parameters: {type: object, properties: {...}, required: [...]}}
"""
from __future__ import annotations

import importlib
import os
from typing import Any

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema

__all__ = ["get_tool_class", "initialize_tools_from_config", "tools_from_list"]


def get_tool_class(class_name: str) -> type:
    module_name, _, attr = str(class_name).rpartition(".")
    if not module_name:
        raise ValueError(f"tool class_name {class_name!r} must be a full path like verl.tools.calculator_tool."
                         "CalculatorTool")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot import tool class {class_name!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseTool)):
        raise TypeError(f"tool class {class_name!r} must subclass verl.tools.base_tool.BaseTool")
    return cls


def tools_from_list(entries: list[dict[str, Any]], where: str = "tools") -> list[BaseTool]:
    """Instantiate tools from the ``tools:`` list; duplicate names raise."""
    tools: list[BaseTool] = []
    for i, entry in enumerate(entries or []):
        if not isinstance(entry, dict) or "class_name" not in entry:
            raise ValueError(f"{where}[{i}] needs a class_name (e.g. verl.tools.calculator_tool.CalculatorTool)")
        cls = get_tool_class(entry["class_name"])
        schema = entry.get("tool_schema")
        schema = OpenAIFunctionToolSchema.from_dict(dict(schema), f"{where}[{i}].tool_schema") if schema else None
        tools.append(cls(config=dict(entry.get("config") or {}), tool_schema=schema))
    names = [t.name for t in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{where}: tool names {duplicates} are used more than once")
    return tools


def initialize_tools_from_config(tool_config_path: str) -> list[BaseTool]:
    """The tools of a tool config yaml (see the module docstring)."""
    from omegaconf import OmegaConf

    if not os.path.isfile(tool_config_path):
        raise FileNotFoundError(f"actor_rollout_ref.rollout.multi_turn.tool_config_path={tool_config_path!r} does "
                                "not exist")
    config = OmegaConf.to_container(OmegaConf.load(tool_config_path), resolve=True)
    if not isinstance(config, dict) or not isinstance(config.get("tools"), list):
        raise ValueError(f"{tool_config_path}: expected a top-level 'tools:' list")
    return tools_from_list(config["tools"], where=f"{tool_config_path}: tools")
