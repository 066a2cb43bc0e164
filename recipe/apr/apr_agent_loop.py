"""``apr``: the Adaptive Parallel Reasoning agent loop (registered as ``apr``).

The parent thread generates from the row's prompt, token-in/token-out. When its text holds a complete spawn block
(:mod:`recipe.apr.spawn`), the tokens after ``</spawn>`` are dropped, each spawned line becomes a child thread with
a fresh context (the line in ``apr.child_prompt_template``, chat-templated), the children are generated concurrently
through the same server manager (``asyncio.gather``), their results are appended to the parent's context as one
join block of observation tokens (``response_mask`` 0, log-prob 0), and the parent continues. Children may spawn
too while ``depth < apr.max_depth`` (default 1: only the parent spawns).

Limits (``apr.*``):

* ``max_children_per_spawn``: lines beyond it are not run (their result says so);
* ``max_spawn_calls``: spawn blocks per thread that run children; later blocks join "not run" results;
* ``max_child_calls``: child threads per trajectory, the whole tree counted (``hsp_cond10``: 10);
* ``thread_token_budget`` (parent: also capped by ``rollout.response_length``) and ``child_token_budget``: tokens a
  thread's response may hold (sampled tokens plus, for a parent, the joined results);
* ``max_model_len`` (else ``rollout.max_model_len``, else the model's ``max_position_embeddings``): a thread's prompt
  plus response never exceeds it. Each request asks for at most the room left, a join block that does not fit is cut
  and ends the thread, a thread whose prompt leaves no room ends at once with an empty response, and a child's line
  is cut to ``max_child_prompt_tokens`` tokens. The engine's own context check is never reached.

Training data: the parent's trajectory only (one row per prompt, scored by the reward function on the parent's
text). Children's tokens are generated with the policy but not trained; their cost shows in the
``agent_loop/child_tokens`` metric.
"""
from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from typing import Any

from recipe.apr.spawn import AprSettings, child_result, format_join, spawn_cut
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, new_request_id, register
from verl.utils.config import cfg_select

__all__ = ["AprAgentLoop", "ThreadOutput", "resolve_max_model_len"]


@functools.lru_cache(maxsize=16)
def _model_context_length(path: str, trust_remote_code: bool) -> int | None:
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a model without a readable config has no known context length
        return None
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def resolve_max_model_len(config: Any, tokenizer: Any) -> int | None:
    """Tokens a thread's prompt plus response may hold: ``apr.max_model_len``, else ``rollout.max_model_len``, else
    the model's ``max_position_embeddings``, else the tokenizer's ``model_max_length`` (None: unknown)."""
    for key in ("apr.max_model_len", "actor_rollout_ref.rollout.max_model_len"):
        value = cfg_select(config, key, None)
        if value:
            return int(value)
    path = cfg_select(config, "actor_rollout_ref.model.path", None)
    if path:
        length = _model_context_length(str(path),
                                       bool(cfg_select(config, "actor_rollout_ref.model.trust_remote_code", False)))
        if length:
            return length
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if length and int(length) < 10**7 else None


@dataclass
class ThreadOutput:
    """One thread's response (sampled tokens, mask 1; joined results, mask 0) and why it stopped."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    stop_reason: str = "stop"  # stop (EOS), length (token budget), context (model context), or the server's reason
    generations: int = 0
    joins: int = 0

    def extend(self, ids: list[int], mask: int, log_probs: list[float] | None = None) -> None:
        self.response_ids += ids
        self.response_mask += [mask] * len(ids)
        self.log_probs += list(log_probs) if log_probs is not None else [0.0] * len(ids)


@dataclass
class _Tree:
    """Counters shared by all threads of one trajectory."""

    child_calls: int = 0
    spawn_calls: int = 0
    children_not_run: int = 0
    child_tokens: int = 0
    context_stops: int = 0
    max_depth_reached: int = 0


@register("apr")
class AprAgentLoop(AgentLoopBase):
    """Parent thread with spawn/join of parallel child threads (see the module docstring)."""

    def __init__(self, trainer_config: Any, server_manager: Any, tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(trainer_config, server_manager, tokenizer, **kwargs)
        self.settings = AprSettings.from_config(trainer_config)
        self.max_model_len = resolve_max_model_len(trainer_config, tokenizer)
        s = self.settings
        self.parent_budget = min(self.response_length, s.thread_token_budget or self.response_length)
        self.child_budget = s.child_token_budget or s.thread_token_budget or self.response_length

    # -------------------------------------------------------------------------------------------------- text ---
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def child_prompt_ids(self, line: str) -> list[int]:
        """A child's prompt: its spawned line (cut to ``max_child_prompt_tokens``) in the child template,
        chat-templated."""
        ids = self._encode(line)
        if len(ids) > self.settings.max_child_prompt_tokens:
            line = self._decode(ids[:self.settings.max_child_prompt_tokens])
        content = self.settings.child_prompt_template.replace("{prompt}", line)
        return self.apply_chat_template([{"role": "user", "content": content}])

    def _room(self, thread: ThreadOutput, budget: int) -> tuple[int, str]:
        """Tokens the thread may still add, and the limit that binds (``length`` or ``context``)."""
        room, reason = budget - len(thread.response_ids), "length"
        if self.max_model_len is not None:
            ctx = self.max_model_len - len(thread.prompt_ids) - len(thread.response_ids)
            if ctx < room:
                room, reason = ctx, "context"
        return room, reason

    # ----------------------------------------------------------------------------------------------- threads ---
    async def run_thread(self,
                         prompt_ids: list[int],
                         budget: int,
                         depth: int,
                         sampling_params: dict[str, Any],
                         tree: _Tree,
                         request_id: str | None = None) -> ThreadOutput:
        """Generate one thread to its end, running children for its spawn blocks (while ``depth < max_depth``)."""
        s = self.settings
        thread = ThreadOutput(prompt_ids=list(prompt_ids))
        request_id = request_id or new_request_id()
        can_spawn = s.enable_spawn and depth < s.max_depth
        tree.max_depth_reached = max(tree.max_depth_reached, depth)
        spawns = 0
        while True:
            room, reason = self._room(thread, budget)
            if room <= 0:
                thread.stop_reason = reason
                break
            out = await self.server_manager.generate(request_id,
                                                     prompt_ids=thread.prompt_ids + thread.response_ids,
                                                     sampling_params=dict(sampling_params, max_new_tokens=room))
            thread.generations += 1
            tokens = list(out.token_ids[:room])
            log_probs = list(out.log_probs[:room]) if out.log_probs is not None else None
            cut = spawn_cut(tokens, self._decode) if can_spawn else None
            if cut is None:
                thread.extend(tokens, 1, log_probs)
                thread.stop_reason = reason if len(tokens) >= room else (out.stop_reason or "stop")
                break
            k, call = cut
            thread.extend(tokens[:k], 1, log_probs[:k] if log_probs is not None else None)
            spawns += 1
            results = await self._run_children(call.prompts, spawns, depth, sampling_params, tree)
            thread.joins += 1
            obs = self._encode(format_join(results))
            room, reason = self._room(thread, budget)
            if len(obs) >= room:  # no room to continue after the join: keep what fits and end the thread
                thread.extend(obs[:max(room, 0)], 0)
                thread.stop_reason = reason
                break
            thread.extend(obs, 0)
        if thread.stop_reason == "context":
            tree.context_stops += 1
        return thread

    async def _run_children(self, prompts: list[str], spawn_index: int, depth: int, sampling_params: dict[str, Any],
                            tree: _Tree) -> list[str]:
        """Results of one spawn block's lines (children run concurrently; lines over a limit are not run)."""
        s = self.settings
        tree.spawn_calls += 1
        results: list[str | None] = [None] * len(prompts)
        to_run: list[int] = []
        for i in range(len(prompts)):
            if spawn_index > s.max_spawn_calls:
                results[i] = f"not run: at most {s.max_spawn_calls} spawn calls per thread"
            elif i >= s.max_children_per_spawn:
                results[i] = f"not run: at most {s.max_children_per_spawn} children per spawn"
            elif s.max_child_calls is not None and tree.child_calls >= s.max_child_calls:
                results[i] = f"not run: the budget of {s.max_child_calls} child threads is spent"
            else:
                tree.child_calls += 1
                to_run.append(i)
        tree.children_not_run += len(prompts) - len(to_run)
        outputs = await asyncio.gather(*[self._run_child(prompts[i], depth + 1, sampling_params, tree) for i in to_run])
        for i, text in zip(to_run, outputs):
            results[i] = child_result(text, s.max_result_chars)
        return [str(r) for r in results]

    async def _run_child(self, line: str, depth: int, sampling_params: dict[str, Any], tree: _Tree) -> str:
        child = await self.run_thread(self.child_prompt_ids(line), self.child_budget, depth, sampling_params, tree)
        tree.child_tokens += sum(child.response_mask)
        return self._decode(child.response_ids)

    # ---------------------------------------------------------------------------------------------- the loop ---
    def _prompt_ids(self, kwargs: dict[str, Any]) -> list[int]:
        prompt_ids = kwargs.get("raw_prompt_ids")
        if prompt_ids is None:
            if kwargs.get("raw_prompt") is None:
                raise ValueError("the apr agent loop needs the row's raw_prompt_ids (RLHFDataset gives them) or "
                                 "raw_prompt messages (data.return_raw_chat=True)")
            return self.apply_chat_template([dict(m) for m in kwargs["raw_prompt"]])
        return [int(t) for t in prompt_ids]

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        prompt_ids = self._prompt_ids(kwargs)
        tree = _Tree()
        parent = await self.run_thread(prompt_ids, self.parent_budget, 0, sampling_params, tree, new_request_id())
        sampled = sum(parent.response_mask)
        return AgentLoopOutput(prompt_ids=prompt_ids,
                               response_ids=parent.response_ids,
                               response_mask=parent.response_mask,
                               response_logprobs=parent.log_probs,
                               num_turns=1 + parent.generations + parent.joins,
                               metrics={
                                   "spawn_calls": float(tree.spawn_calls),
                                   "child_calls": float(tree.child_calls),
                                   "children_not_run": float(tree.children_not_run),
                                   "child_tokens": float(tree.child_tokens),
                                   "parent_sampled_tokens": float(sampled),
                                   "joined_tokens": float(len(parent.response_ids) - sampled),
                                   "context_stops": float(tree.context_stops),
                                   "max_depth": float(tree.max_depth_reached),
                               },
                               extra_fields={"stop_reason": parent.stop_reason})
