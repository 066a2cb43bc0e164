"""Server-mode rollouts: many conversations run concurrently (asyncio) against one or more rollout servers, token-in
/ token-out, and come back as the shared rollout output schema.

* :class:`AgentLoopBase` - one trajectory: ``async run(sampling_params, **row) -> AgentLoopOutput``. Subclasses are
  registered by name (:func:`register`); a row's non-tensor ``agent_name`` picks one, else
  ``actor_rollout_ref.rollout.agent.default_agent_loop``.
* :class:`AsyncLLMServerManager` - ``generate(request_id, prompt_ids=..., sampling_params=...)`` on the least busy
  server, sticky per ``request_id`` so a conversation's turns reuse a server.
* :class:`AgentLoopManager` - ``generate_sequences(prompts: DataProto) -> DataProto``.

Training sees exactly the sampled tokens: a loop returns the ids the server produced plus the ids it fed back
(tool results), never a re-tokenization of the final text; ``response_mask`` is 1 on sampled tokens and 0 on
tool/observation tokens and padding.
"""
from __future__ import annotations

import asyncio
import importlib
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from verl.protocol import DataProto
from verl.utils.config import cfg_select
from verl.workers.rollout.async_server import (AsyncRolloutClient, ServerProcess, ServerRef, TokenOutput,
                                               make_rollout_client)

__all__ = [
    "AgentLoopOutput", "AgentLoopBase", "register", "get_agent_loop_class", "AsyncLLMServerManager", "AgentLoopManager",
    "assemble_agent_outputs", "sampling_params_from_config"
]

_R = "actor_rollout_ref.rollout"


@dataclass
class AgentLoopOutput:
    """One trajectory. ``response_ids`` holds every token after the prompt (sampled and fed back);
    ``response_mask[i]`` is 1 where ``response_ids[i]`` was sampled, 0 where a tool/observation put it there."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    response_logprobs: list[float] | None = None
    reward_score: float | None = None
    num_turns: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    extra_fields: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.response_mask) != len(self.response_ids):
            raise ValueError(f"response_mask has {len(self.response_mask)} entries, response_ids "
                             f"{len(self.response_ids)}")
        if self.response_logprobs is not None and len(self.response_logprobs) != len(self.response_ids):
            raise ValueError(f"response_logprobs has {len(self.response_logprobs)} entries, response_ids "
                             f"{len(self.response_ids)}")


_AGENT_LOOP_REGISTRY: dict[str, dict[str, Any]] = {}


def register(agent_name: str) -> Callable[[type], type]:
    """Class decorator: make an :class:`AgentLoopBase` subclass selectable as ``agent_name``."""

    def decorator(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, AgentLoopBase)):
            raise TypeError(f"register({agent_name!r}): {cls!r} must subclass AgentLoopBase")
        _AGENT_LOOP_REGISTRY[agent_name] = {"_target_": f"{cls.__module__}.{cls.__qualname__}"}
        return cls

    return decorator


def _import_target(target: str) -> type:
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def get_agent_loop_class(agent_name: str) -> type:
    """The registered class (the built-in loops are imported on first use)."""
    if agent_name not in _AGENT_LOOP_REGISTRY:
        import verl.experimental.agent_loop.single_turn_agent_loop  # noqa: F401
        import verl.experimental.agent_loop.tool_agent_loop  # noqa: F401
    if agent_name not in _AGENT_LOOP_REGISTRY:
        raise ValueError(f"unknown agent loop {agent_name!r} (row agent_name or {_R}.agent.default_agent_loop); "
                         f"registered: {sorted(_AGENT_LOOP_REGISTRY)}. Register one with "
                         "@verl.experimental.agent_loop.register(name) or list it in "
                         f"{_R}.agent.agent_loop_config_path")
    return _import_target(_AGENT_LOOP_REGISTRY[agent_name]["_target_"])


def _load_agent_loop_config(path: str | None) -> None:
    """Register the loops of an ``agent_loop_config_path`` yaml: a list of ``{name, _target_}``."""
    if not path:
        return
    from omegaconf import OmegaConf

    entries = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(entries, list):
        raise ValueError(f"{_R}.agent.agent_loop_config_path={path}: expected a list of {{name, _target_}}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "_target_" not in entry:
            raise ValueError(f"{path}[{i}] needs name and _target_ (a class path)")
        _AGENT_LOOP_REGISTRY[str(entry["name"])] = {"_target_": str(entry["_target_"])}


class AsyncLLMServerManager:
    """Routes generation requests over several servers: a new ``request_id`` goes to the server with the fewest
    requests in flight, later requests with the same id to the same server (an LRU map of ``max_sticky`` ids)."""

    def __init__(self, clients: Sequence[AsyncRolloutClient], max_sticky: int = 10000) -> None:
        if not clients:
            raise ValueError("AsyncLLMServerManager needs at least one rollout server")
        self.clients = list(clients)
        self._inflight = [0] * len(self.clients)
        self._sticky: OrderedDict[str, int] = OrderedDict()
        self.max_sticky = int(max_sticky)

    def _choose(self, request_id: str) -> int:
        if request_id in self._sticky:
            self._sticky.move_to_end(request_id)
            return self._sticky[request_id]
        index = min(range(len(self.clients)), key=lambda i: self._inflight[i])
        self._sticky[request_id] = index
        if len(self._sticky) > self.max_sticky:
            self._sticky.popitem(last=False)
        return index

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any]) -> TokenOutput:
        index = self._choose(request_id)
        self._inflight[index] += 1
        try:
            out = await self.clients[index].generate(prompt_ids, dict(sampling_params, n=1), return_logprob=True)
        finally:
            self._inflight[index] -= 1
        return out[0] if isinstance(out, list) else out


class AgentLoopBase(ABC):
    """One trajectory's logic. Instances are made per sample; shared, expensive state (tools) goes in
    :meth:`init_class`, called once per manager.

    Args:
        trainer_config: the full trainer config (``actor_rollout_ref.rollout.*`` is read).
        server_manager: where to generate.
        tokenizer: the policy's tokenizer (chat template, tool-call text).
    """

    def __init__(self, trainer_config: Any, server_manager: AsyncLLMServerManager, tokenizer: Any,
                 **kwargs: Any) -> None:
        self.config = trainer_config
        self.server_manager = server_manager
        self.tokenizer = tokenizer
        self.prompt_length = int(cfg_select(trainer_config, f"{_R}.prompt_length", 512))
        self.response_length = int(cfg_select(trainer_config, f"{_R}.response_length", 512))

    @classmethod
    def init_class(cls, config: Any, tokenizer: Any, **kwargs: Any) -> None:
        """Class-level setup, once per manager (e.g. build tools)."""

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
        kwargs = dict(cfg_select(self.config, "data.apply_chat_template_kwargs", None) or {})
        return self.tokenizer.apply_chat_template(messages,
                                                  tools=tools or None,
                                                  add_generation_prompt=add_generation_prompt,
                                                  tokenize=False,
                                                  **kwargs)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt token ids of ``messages`` (with tool schemas), ending with the assistant's generation prompt."""
        return list(self.tokenizer.encode(self.render(messages, tools), add_special_tokens=False))

    @abstractmethod
    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        """Run one trajectory; ``kwargs`` are the row's non-tensor fields (``raw_prompt``, ``raw_prompt_ids``,
        ``tools_kwargs``, ``index``, ``data_source``, ...)."""
        raise NotImplementedError


def sampling_params_from_config(config: Any, validate: bool) -> dict[str, Any]:
    """SGLang-style sampling parameters from ``actor_rollout_ref.rollout`` (``val_kwargs`` when validating)."""
    section = f"{_R}.val_kwargs" if validate else _R
    do_sample = bool(cfg_select(config, f"{section}.do_sample", True))
    temperature = float(cfg_select(config, f"{section}.temperature", 1.0))
    top_k = cfg_select(config, f"{section}.top_k", -1)
    params = {
        "temperature": temperature if do_sample else 0.0,
        "top_p": float(cfg_select(config, f"{section}.top_p", 1.0)),
        "top_k": int(top_k) if top_k not in (None, 0) else -1,
    }
    if bool(cfg_select(config, f"{_R}.ignore_eos", False)):
        params["ignore_eos"] = True
    return params


def _left_pad(rows: list[list[int]], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def assemble_agent_outputs(outputs: Sequence[AgentLoopOutput],
                           prompt_length: int,
                           response_length: int,
                           pad_token_id: int,
                           non_tensor_batch: dict[str, np.ndarray] | None = None,
                           with_log_probs: bool = False,
                           meta_info: dict | None = None) -> DataProto:
    """Agent-loop trajectories -> the rollout output schema (prompts left-padded to ``prompt_length``, responses
    right-padded to ``response_length``; ``attention_mask`` covers every real token, ``response_mask`` only the
    sampled ones; positions count real tokens)."""
    long_prompts = [i for i, o in enumerate(outputs) if len(o.prompt_ids) > prompt_length]
    if long_prompts:
        worst = max(len(outputs[i].prompt_ids) for i in long_prompts)
        raise ValueError(f"{len(long_prompts)} prompts (rows {long_prompts[:8]}) have up to {worst} tokens after the "
                         f"chat template (with tool schemas), more than {_R}.prompt_length={prompt_length}. Fix: raise "
                         "data.max_prompt_length")
    long_responses = [i for i, o in enumerate(outputs) if len(o.response_ids) > response_length]
    if long_responses:
        raise ValueError(f"agent loop returned responses longer than {_R}.response_length={response_length} (rows "
                         f"{long_responses[:8]}); an agent loop must keep to the response budget")
    prompts, prompt_mask = _left_pad([list(o.prompt_ids) for o in outputs], prompt_length, pad_token_id)
    n = len(outputs)
    responses = torch.full((n, response_length), pad_token_id, dtype=torch.long)
    response_attn = torch.zeros((n, response_length), dtype=torch.long)
    response_mask = torch.zeros((n, response_length), dtype=torch.long)
    log_probs = torch.zeros((n, response_length), dtype=torch.float32)
    for i, o in enumerate(outputs):
        k = len(o.response_ids)
        if k:
            responses[i, :k] = torch.tensor(o.response_ids, dtype=torch.long)
            response_attn[i, :k] = 1
            response_mask[i, :k] = torch.tensor(o.response_mask, dtype=torch.long)
            if o.response_logprobs is not None:
                log_probs[i, :k] = torch.tensor(o.response_logprobs, dtype=torch.float32)
    attention_mask = torch.cat([prompt_mask, response_attn], dim=-1)
    position_ids = torch.clamp(attention_mask.cumsum(-1) - 1, min=0)
    tensors = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=-1),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_mask": response_mask,
    }
    if with_log_probs:
        tensors["rollout_log_probs"] = log_probs * response_mask
    if any(o.reward_score is not None for o in outputs):
        scores = torch.zeros((n, response_length), dtype=torch.float32)
        for i, o in enumerate(outputs):
            if o.reward_score is not None:
                last = max(int(response_attn[i].sum()) - 1, 0)
                scores[i, last] = float(o.reward_score)
        tensors["rm_scores"] = scores
    non_tensors = {k: v for k, v in (non_tensor_batch or {}).items()}
    non_tensors["__num_turns__"] = np.array([o.num_turns for o in outputs], dtype=np.int32)
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info=dict(meta_info or {}))


class AgentLoopManager:
    """Runs a batch of conversations against rollout servers and returns the rollout output schema.

    Args:
        config: the full trainer config.
        server_addresses: ``http://host:port`` of each server (SGLang, vLLM or the HF fallback server).
        tokenizer: the policy's tokenizer (loaded from ``actor_rollout_ref.model.path`` when ``None``).
        server_processes: the servers' processes when we launched them (named in errors).
        worker_group: alternatively, a worker group whose ``get_rollout_server_info()`` (or
            ``get_rollout_server_addresses()``) lists them.
        request_timeout_s: seconds one generation request may take before the rollout fails.
        server_apis: the protocol of each server (or one for all): ``"sglang"`` (``/generate``: SGLang, HF) or
            ``"openai"`` (vLLM's ``/v1/completions``); default from ``actor_rollout_ref.rollout.name``.
    """

    def __init__(self,
                 config: Any,
                 server_addresses: Sequence[str] | None = None,
                 tokenizer: Any = None,
                 server_processes: Sequence[ServerProcess | None] | None = None,
                 worker_group: Any = None,
                 request_timeout_s: float | None = None,
                 server_apis: Sequence[str] | str | None = None) -> None:
        self.config = config
        if server_addresses is None and worker_group is not None:
            server_addresses, apis, refs = self._servers_of(worker_group)
            server_apis = server_apis if server_apis is not None else apis
            server_processes = server_processes if server_processes is not None else refs
        if not server_addresses:
            raise ValueError("AgentLoopManager needs rollout server addresses (or a worker group that launched them)")
        self.server_addresses = list(server_addresses)
        self.server_processes = list(server_processes or [None] * len(self.server_addresses))
        if server_apis is None:
            from verl.workers.rollout.server_adapters import SERVER_APIS

            server_apis = SERVER_APIS.get(str(cfg_select(config, f"{_R}.name", "hf")), "sglang")
        if isinstance(server_apis, str):
            server_apis = [server_apis] * len(self.server_addresses)
        self.server_apis = list(server_apis)
        if len(self.server_apis) != len(self.server_addresses):
            raise ValueError(f"{len(self.server_apis)} server_apis for {len(self.server_addresses)} servers")
        if tokenizer is None:
            from verl.workers.config_helpers import load_tokenizer

            tokenizer = load_tokenizer(str(cfg_select(config, "actor_rollout_ref.model.path")))
        self.tokenizer = tokenizer
        self.request_timeout_s = float(request_timeout_s or
                                       cfg_select(config, f"{_R}.agent.request_timeout_s", 600.0) or 600.0)
        self.prompt_length = int(cfg_select(config, f"{_R}.prompt_length", 512))
        self.response_length = int(cfg_select(config, f"{_R}.response_length", 512))
        self.default_agent = str(cfg_select(config, f"{_R}.agent.default_agent_loop", "single_turn_agent"))
        if bool(cfg_select(config, f"{_R}.multi_turn.enable", False)) and self.default_agent == "single_turn_agent":
            self.default_agent = "tool_agent"
        _load_agent_loop_config(cfg_select(config, f"{_R}.agent.agent_loop_config_path", None))
        self._initialized: set[type] = set()
        self._class_lock = threading.Lock()

    @staticmethod
    def _servers_of(worker_group: Any) -> tuple[list[str], list[str] | None, list[Any] | None]:
        """Addresses (and, from workers that tell, protocols and pid/log of servers on this node) of the servers a
        worker group launched."""
        import socket

        getter = getattr(worker_group, "get_rollout_server_info", None)
        infos = [i for i in getter() if i] if callable(getter) else []
        if not infos or not all(isinstance(i, dict) and "address" in i for i in infos):
            return [a for a in worker_group.get_rollout_server_addresses() if a], None, None
        here = socket.gethostname()
        refs = [
            ServerRef(i["address"], i.get("pid"), i.get("log_path")) if i.get("hostname") == here else None
            for i in infos
        ]
        return [i["address"] for i in infos], [str(i.get("api", "sglang")) for i in infos], refs

    def _agent_class(self, name: str) -> type:
        cls = get_agent_loop_class(name)
        with self._class_lock:
            if cls not in self._initialized:
                cls.init_class(self.config, self.tokenizer)
                self._initialized.add(cls)
        return cls

    def _pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def generate_sequences(self, prompts: DataProto) -> DataProto:
        """One trajectory per row (the trainer has already repeated each prompt ``rollout.n`` times)."""
        start = time.perf_counter()
        try:
            asyncio.get_running_loop()
            running = True
        except RuntimeError:
            running = False
        if running:  # called from inside an event loop (an async Ray actor): run ours in a thread
            result: dict = {}

            def target() -> None:
                try:
                    result["value"] = asyncio.run(self._generate(prompts))
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    result["error"] = exc

            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            thread.join()
            if "error" in result:
                raise result["error"]
            outputs = result["value"]
        else:
            outputs = asyncio.run(self._generate(prompts))
        elapsed = time.perf_counter() - start
        with_log_probs = bool(cfg_select(self.config, f"{_R}.calculate_log_probs", False))
        metrics = self._metrics(outputs)
        out = assemble_agent_outputs(outputs,
                                     self.prompt_length,
                                     self.response_length,
                                     self._pad_token_id(),
                                     non_tensor_batch=prompts.non_tensor_batch,
                                     with_log_probs=with_log_probs,
                                     meta_info={
                                         "timing": {
                                             "agent_loop/generate_sequences": elapsed
                                         },
                                         "metrics": metrics
                                     })
        return out

    @staticmethod
    def _metrics(outputs: Sequence[AgentLoopOutput]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        keys = sorted({k for o in outputs for k in o.metrics} | {"num_turns"})
        for key in keys:
            values = [float(o.num_turns if key == "num_turns" else o.metrics.get(key, 0.0)) for o in outputs]
            if values:
                metrics[f"agent_loop/{key}/mean"] = float(np.mean(values))
                metrics[f"agent_loop/{key}/max"] = float(np.max(values))
                metrics[f"agent_loop/{key}/min"] = float(np.min(values))
        return metrics

    def _row_prompt_ids(self, prompts: DataProto, i: int) -> list[int] | None:
        if prompts.batch is None or "input_ids" not in prompts.batch.keys():
            return None
        ids, mask = prompts.batch["input_ids"][i], prompts.batch["attention_mask"][i]
        return [int(t) for t in ids[mask.bool()].tolist()]

    async def _generate(self, prompts: DataProto) -> list[AgentLoopOutput]:
        validate = bool(prompts.meta_info.get("validate", False))
        sampling = sampling_params_from_config(self.config, validate)
        for key in ("temperature", "top_p", "top_k"):
            if key in prompts.meta_info and not validate:
                sampling[key] = prompts.meta_info[key]
        if prompts.meta_info.get("do_sample") is False:
            sampling["temperature"] = 0.0
        clients = [
            make_rollout_client(address, api, timeout_s=self.request_timeout_s, process=process)
            for address, api, process in zip(self.server_addresses, self.server_apis, self.server_processes)
        ]
        manager = AsyncLLMServerManager(clients)
        agent_names = prompts.non_tensor_batch.get("agent_name")
        tasks = []
        try:
            for i in range(len(prompts)):
                row = {k: v[i] for k, v in prompts.non_tensor_batch.items()}
                if "raw_prompt_ids" not in row or row["raw_prompt_ids"] is None:
                    ids = self._row_prompt_ids(prompts, i)
                    if ids is not None:
                        row["raw_prompt_ids"] = ids
                name = str(agent_names[i]) if agent_names is not None and agent_names[i] else self.default_agent
                cls = self._agent_class(name)
                agent = cls(trainer_config=self.config, server_manager=manager, tokenizer=self.tokenizer)
                tasks.append(asyncio.create_task(agent.run(dict(sampling), **row)))
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            for client in clients:
                await client.close()


def new_request_id() -> str:
    return uuid.uuid4().hex
