"""Tool schemas in OpenAI's function-calling format (what chat templates render into the system prompt) and the
response a tool gives back to the conversation."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "OpenAIFunctionPropertySchema", "OpenAIFunctionParametersSchema", "OpenAIFunctionSchema",
    "OpenAIFunctionToolSchema", "OpenAIFunctionParsedSchema", "OpenAIFunctionCallSchema", "ToolResponse"
]


@dataclass
class OpenAIFunctionPropertySchema:
    type: str
    description: str | None = None
    enum: list[str] | None = None


@dataclass
class OpenAIFunctionParametersSchema:
    type: str = "object"
    properties: dict[str, OpenAIFunctionPropertySchema] = field(default_factory=dict)
    required: list[str] = field(default_factory=list)


@dataclass
class OpenAIFunctionSchema:
    name: str
    description: str = ""
    parameters: OpenAIFunctionParametersSchema = field(default_factory=OpenAIFunctionParametersSchema)
    strict: bool = False


@dataclass
class OpenAIFunctionToolSchema:
    """``{"type": "function", "function": {"name", "description", "parameters": {...}}}``."""

    type: str
    function: OpenAIFunctionSchema

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "tool_schema") -> "OpenAIFunctionToolSchema":
        """Build from a yaml/json dict; missing or malformed keys raise an error naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
        if data.get("type", "function") != "function":
            raise ValueError(f"{where}.type must be 'function', got {data.get('type')!r}")
        fn = data.get("function")
        if not isinstance(fn, dict) or not fn.get("name"):
            raise ValueError(f"{where}.function.name is missing; a tool schema looks like "
                             "{type: function, function: {name, description, parameters: {type: object, "
                             "properties: {...}, required: [...]}}}")
        params = fn.get("parameters") or {}
        props = {}
        for key, prop in (params.get("properties") or {}).items():
            if not isinstance(prop, dict) or "type" not in prop:
                raise ValueError(f"{where}.function.parameters.properties.{key} needs a 'type'")
            props[key] = OpenAIFunctionPropertySchema(type=prop["type"],
                                                      description=prop.get("description"),
                                                      enum=prop.get("enum"))
        required = list(params.get("required") or [])
        unknown = [r for r in required if r not in props]
        if unknown:
            raise ValueError(f"{where}.function.parameters.required names {unknown}, which are not properties")
        return cls(type="function",
                   function=OpenAIFunctionSchema(name=str(fn["name"]),
                                                 description=str(fn.get("description", "")),
                                                 parameters=OpenAIFunctionParametersSchema(type=params.get(
                                                     "type", "object"),
                                                                                           properties=props,
                                                                                           required=required),
                                                 strict=bool(fn.get("strict", False))))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``tokenizer.apply_chat_template(tools=[...])`` (``None`` fields dropped)."""

        def clean(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items() if v is not None}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return clean(asdict(self))

    def model_dump(self, exclude_unset: bool = True, exclude_none: bool = True) -> dict[str, Any]:
        """pydantic-style alias of :meth:`to_dict` (upstream code calls it)."""
        return self.to_dict()


@dataclass
class OpenAIFunctionParsedSchema:
    """A tool call as parsed from model text: arguments still a JSON string."""

    name: str
    arguments: str


@dataclass
class OpenAIFunctionCallSchema:
    """A parsed tool call with decoded arguments."""

    name: str
    arguments: dict[str, Any]


@dataclass
class ToolResponse:
    """What a tool returns to the conversation (text only here)."""

    text: str | None = None
    image: Any = None
    video: Any = None
