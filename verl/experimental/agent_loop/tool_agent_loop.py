"""``tool_agent``: generate, parse tool calls (``multi_turn.format``), run the tools, feed their answers back as the
next user turn, repeat.

Limits (``actor_rollout_ref.rollout.multi_turn``): ``max_assistant_turns`` (generations), ``max_user_turns`` (tool
answers fed back), the response budget ``rollout.response_length`` (sampled plus fed-back tokens; the last
observation is cut to fit), ``max_parallel_calls`` (tool calls run per turn), ``max_tool_response_length``
characters of each tool answer (cut at ``tool_response_truncate_side``: left, right or middle).

Tool answers are tokenized as the chat template's continuation after an assistant turn (the text the template adds
for ``role: tool`` messages plus the next generation prompt); those tokens get ``response_mask`` 0.
Per-sample tool arguments come from the row's ``tools_kwargs[tool_name]`` (``create_kwargs``, ``execute_kwargs``,
``calc_reward_kwargs``, ``release_kwargs``).
"""
from __future__ import annotations

import asyncio
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, new_request_id, register
from verl.experimental.agent_loop.tool_parser import get_tool_parser
from verl.utils.config import cfg_select

__all__ = ["ToolAgentLoop"]

_M = "actor_rollout_ref.rollout.multi_turn"


def truncate_text(text: str, limit: int, side: str) -> str:
    if limit <= 0 or len(text) <= limit:
        return text
    if side == "left":
        return "..." + text[-limit:]
    if side == "right":
        return text[:limit] + "..."
    if side == "middle":
        half = limit // 2
        return text[:half] + "\n...(truncated)...\n" + text[-(limit - half):]
    raise ValueError(f"{_M}.tool_response_truncate_side must be left, right or middle; got {side!r}")


@register("tool_agent")
class ToolAgentLoop(AgentLoopBase):
    tools: dict = {}
    tool_schemas: list = []
    _dummy_prefix: str | None = None

    @classmethod
    def init_class(cls, config: Any, tokenizer: Any, tools: list | None = None, **kwargs: Any) -> None:
        """Build the tools once: from ``tools`` when given, else from ``multi_turn.tool_config_path``."""
        if tools is None:
            path = cfg_select(config, f"{_M}.tool_config_path", None)
            if path:
                from verl.tools.utils.tool_registry import initialize_tools_from_config

                tools = initialize_tools_from_config(str(path))
            else:
                tools = []
        cls.tools = {tool.name: tool for tool in tools}
        cls.tool_schemas = [tool.tool_schema.to_dict() for tool in tools]

    def __init__(self, trainer_config: Any, server_manager: Any, tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(trainer_config, server_manager, tokenizer, **kwargs)
        cfg = lambda key, default: cfg_select(trainer_config, f"{_M}.{key}", default)  # noqa: E731
        self.max_assistant_turns = cfg("max_assistant_turns", None)
        self.max_user_turns = cfg("max_user_turns", None)
        self.max_parallel_calls = int(cfg("max_parallel_calls", 1) or 1)
        self.max_tool_response_length = int(cfg("max_tool_response_length", 256) or 0)
        self.truncate_side = str(cfg("tool_response_truncate_side", "middle"))
        self.parser = get_tool_parser(str(cfg("format", "hermes")))

    def observation_ids(self, tool_messages: list[dict]) -> list[int]:
        """Token ids the chat template puts after an assistant turn for ``tool_messages`` + the next generation
        prompt (rendered after a dummy conversation and cut off at its end, so no system prompt is repeated)."""
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        before = self.render(base, add_generation_prompt=False)
        after = self.render(base + tool_messages, add_generation_prompt=True)
        if not after.startswith(before):
            raise ValueError("the chat template renders earlier messages differently once tool messages follow; "
                             "cannot tokenize tool answers as a continuation")
        return list(self.tokenizer.encode(after[len(before):], add_special_tokens=False))

    async def _call_tool(self, call: Any, tools_kwargs: dict, instances: dict) -> tuple[str, dict]:
        tool = self.tools.get(call.name)
        if tool is None:
            return f"Error: no tool named {call.name!r}; available: {sorted(self.tools)}", {"tool_error": 1.0}
        kwargs = tools_kwargs.get(call.name) or {}
        try:
            if call.name not in instances:
                instance_id, _ = await tool.create(**(kwargs.get("create_kwargs") or {}))
                instances[call.name] = instance_id
            response, reward, metrics = await tool.execute(instances[call.name], call.arguments,
                                                           **(kwargs.get("execute_kwargs") or {}))
        except Exception as exc:  # noqa: BLE001 - a failing tool is an observation, not a crashed rollout
            return f"Error: {type(exc).__name__}: {exc}", {"tool_error": 1.0}
        text = response.text if response is not None and response.text is not None else ""
        return text, {"tool_reward": float(reward or 0.0)}

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        messages = kwargs.get("raw_prompt")
        if messages is None:
            raise ValueError("tool_agent needs the row's chat messages: set data.return_raw_chat=True")
        messages = [dict(m) for m in messages]
        tools_kwargs = dict(kwargs.get("tools_kwargs") or {})
        prompt_ids = self.apply_chat_template(messages, tools=self.tool_schemas)
        response_ids: list[int] = []
        response_mask: list[int] = []
        log_probs: list[float] = []
        request_id = new_request_id()
        assistant_turns = user_turns = tool_calls = 0
        tool_reward = 0.0
        instances: dict[str, str] = {}
        stop = "length"
        try:
            while True:
                budget = self.response_length - len(response_ids)
                if budget <= 0:
                    stop = "length"
                    break
                out = await self.server_manager.generate(request_id,
                                                         prompt_ids=prompt_ids + response_ids,
                                                         sampling_params=dict(sampling_params, max_new_tokens=budget))
                tokens = out.token_ids[:budget]
                response_ids += tokens
                response_mask += [1] * len(tokens)
                lps = out.log_probs[:budget] if out.log_probs is not None else [0.0] * len(tokens)
                log_probs += lps
                assistant_turns += 1
                if len(response_ids) >= self.response_length:
                    stop = "length"
                    break
                if self.max_assistant_turns and assistant_turns >= int(self.max_assistant_turns):
                    stop = "max_assistant_turns"
                    break
                _, calls = self.parser.extract_tool_calls(self.tokenizer.decode(tokens, skip_special_tokens=False))
                if not calls:
                    stop = "no_tool_call"
                    break
                if self.max_user_turns and user_turns >= int(self.max_user_turns):
                    stop = "max_user_turns"
                    break
                calls = calls[:self.max_parallel_calls]
                tool_calls += len(calls)
                results = await asyncio.gather(*[self._call_tool(c, tools_kwargs, instances) for c in calls])
                tool_messages = []
                for text, info in results:
                    tool_reward += info.get("tool_reward", 0.0)
                    tool_messages.append({
                        "role": "tool",
                        "content": truncate_text(text, self.max_tool_response_length, self.truncate_side)
                    })
                obs = self.observation_ids(tool_messages)
                user_turns += 1
                room = self.response_length - len(response_ids)
                if len(obs) >= room:  # no room left to answer after the observation: cut it and stop
                    obs = obs[:room]
                    response_ids += obs
                    response_mask += [0] * len(obs)
                    log_probs += [0.0] * len(obs)
                    stop = "length"
                    break
                response_ids += obs
                response_mask += [0] * len(obs)
                log_probs += [0.0] * len(obs)
        finally:
            for name, instance_id in instances.items():
                extra = (tools_kwargs.get(name) or {}).get("release_kwargs") or {}
                try:
                    await self.tools[name].release(instance_id, **extra)
                except Exception:  # noqa: BLE001 - cleanup must not mask the rollout's own error
                    pass
        return AgentLoopOutput(prompt_ids=prompt_ids,
                               response_ids=response_ids,
                               response_mask=response_mask,
                               response_logprobs=log_probs,
                               num_turns=1 + assistant_turns + user_turns,
                               metrics={
                                   "tool_calls": float(tool_calls),
                                   "assistant_turns": float(assistant_turns),
                                   "user_turns": float(user_turns),
                               },
                               extra_fields={
                                   "stop_reason": stop,
                                   "tool_reward": tool_reward
                               })
