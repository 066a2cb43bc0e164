"""``BaseTool``: the interface every tool of a tool-calling agent loop implements.

A tool lives for one trajectory: ``create`` (per-sample state, e.g. a ground truth from ``tools_kwargs``), any number
of ``execute`` calls, ``calc_reward``, ``release``. All methods are ``async`` so that many conversations share an
event loop; blocking work belongs in a thread or subprocess.
"""
from __future__ import annotations

import uuid
from typing import Any

from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

__all__ = ["BaseTool"]


class BaseTool:
    """Args:
        config: the tool's ``config`` mapping from the tool config yaml.
        tool_schema: its OpenAI function schema (rendered into the prompt by the chat template).
    """

    def __init__(self, config: dict, tool_schema: OpenAIFunctionToolSchema) -> None:
        self.config = dict(config or {})
        self.tool_schema = tool_schema or self.get_openai_tool_schema()
        if self.tool_schema is None:
            raise ValueError(f"{type(self).__name__}: no tool_schema given and get_openai_tool_schema() has none")
        self.name = self.tool_schema.function.name
        self._instances: dict[str, dict] = {}

    def get_openai_tool_schema(self) -> OpenAIFunctionToolSchema:
        return getattr(self, "tool_schema", None)

    async def create(self, instance_id: str | None = None, **kwargs: Any) -> tuple[str, ToolResponse]:
        """Start a per-trajectory instance; ``kwargs`` are ``tools_kwargs[name]["create_kwargs"]``."""
        instance_id = instance_id or str(uuid.uuid4())
        self._instances[instance_id] = dict(kwargs)
        return instance_id, ToolResponse()

    async def execute(self, instance_id: str, parameters: dict[str, Any],
                      **kwargs: Any) -> tuple[ToolResponse, float, dict]:
        """Run the tool; returns ``(response, step_reward, metrics)``."""
        return ToolResponse(text="updated the tool state"), 0.0, {}

    async def calc_reward(self, instance_id: str, **kwargs: Any) -> float:
        return 0.0

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        self._instances.pop(instance_id, None)
