"""Tools for tool-calling agent loops: :class:`BaseTool`, OpenAI function schemas, a tool config file format
(:func:`verl.tools.utils.tool_registry.initialize_tools_from_config`), a calculator and a sandboxed Python tool."""
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

__all__ = ["BaseTool", "OpenAIFunctionToolSchema", "ToolResponse"]
