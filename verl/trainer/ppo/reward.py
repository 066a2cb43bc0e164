"""Building the reward function of a run and calling it on a rollout batch.

``load_reward_manager`` turns the config (``reward_model.reward_manager``, ``custom_reward_function.*``,
``reward_model.sandbox_fusion.*``, ``data.reward_fn_key``) into a reward manager instance: a callable
``reward_fn(data, return_dict=False)`` that scores a :class:`~verl.protocol.DataProto` of responses.
``compute_reward`` calls it and always returns ``(reward_tensor, reward_extra_info)``; ``compute_reward_async`` is
the same as a Ray task, so scoring can overlap the log-prob passes (``reward_model.launch_reward_fn_async``).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

from verl.protocol import DataProto
from verl.utils.config import cfg_select
from verl.utils.reward_score import default_compute_score
from verl.utils.reward_score.custom import get_custom_reward_fn
from verl.workers.reward_manager import get_reward_manager_cls

__all__ = ["get_custom_reward_fn", "load_reward_manager", "compute_reward", "compute_reward_async"]


def _plain(value: Any) -> Any:
    """DictConfig / ListConfig -> plain containers (reward managers and scorers expect dicts)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _sandbox_compute_score(config: Any) -> Callable[..., Any] | None:
    """``default_compute_score`` bound to the sandbox settings when ``reward_model.sandbox_fusion.url`` is set."""
    url = cfg_select(config, "reward_model.sandbox_fusion.url")
    if not url:
        return None
    import threading

    max_concurrent = int(cfg_select(config, "reward_model.sandbox_fusion.max_concurrent", 64) or 64)
    memory_limit_mb = int(cfg_select(config, "reward_model.sandbox_fusion.memory_limit_mb", 1024) or 1024)
    return functools.partial(default_compute_score,
                             sandbox_fusion_url=url,
                             concurrent_semaphore=threading.Semaphore(max_concurrent),
                             memory_limit_mb=memory_limit_mb)


def load_reward_manager(config: Any, tokenizer: Any, num_examine: int, **reward_kwargs: Any) -> Any:
    """The reward manager named by ``reward_model.reward_manager`` (default ``naive``), scoring with
    ``custom_reward_function.{path,name}`` when set, else :func:`default_compute_score`.

    ``num_examine``: decoded samples printed per data source on each call (upstream uses 0 for training, 1 for
    validation). ``reward_kwargs`` (usually ``reward_model.reward_kwargs``) go to the manager's constructor.
    """
    name = str(cfg_select(config, "reward_model.reward_manager", "naive") or "naive")
    manager_cls = get_reward_manager_cls(name)
    compute_score = get_custom_reward_fn(config)
    if compute_score is None:
        compute_score = _sandbox_compute_score(config) or default_compute_score
    reward_fn_key = cfg_select(config, "data.reward_fn_key", "data_source") or "data_source"
    kwargs = {k: _plain(v) for k, v in reward_kwargs.items()}
    return manager_cls(tokenizer=tokenizer,
                       num_examine=num_examine,
                       compute_score=compute_score,
                       reward_fn_key=reward_fn_key,
                       **kwargs)


def _accepts_return_dict(reward_fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(reward_fn).parameters
    except (TypeError, ValueError):  # builtins, some C callables: assume the manager protocol
        return True
    return "return_dict" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def compute_reward(data: DataProto, reward_fn: Callable[..., Any]) -> tuple[torch.Tensor, dict[str, list]]:
    """Score ``data`` with ``reward_fn``; returns ``(reward_tensor [B, R], reward_extra_info {key: list})``.

    A reward function that does not take ``return_dict`` (a plain callable returning the tensor) works too; it then
    has no extra info.
    """
    if reward_fn is None:
        raise ValueError("compute_reward: reward_fn is None; build one with load_reward_manager(config, tokenizer, "
                         "num_examine=0)")
    if not _accepts_return_dict(reward_fn):
        result: Any = reward_fn(data)
    else:
        result = reward_fn(data, return_dict=True)
    if isinstance(result, dict):
        if "reward_tensor" not in result:
            raise KeyError(f"the reward function returned a dict without 'reward_tensor' (keys: {sorted(result)}); "
                           "return {'reward_tensor': Tensor[B, R], 'reward_extra_info': {...}}")
        extra = result.get("reward_extra_info") or {}
        return result["reward_tensor"], {k: list(v) for k, v in extra.items()}
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"the reward function returned {type(result).__name__}; expected a Tensor [B, R] or a dict "
                        "with 'reward_tensor'")
    return result, {}


def _compute_reward_task(data: DataProto,
                         config: Any = None,
                         tokenizer: Any = None,
                         reward_fn: Callable[..., Any] | None = None) -> tuple[torch.Tensor, dict[str, list]]:
    if reward_fn is None:
        if config is None or tokenizer is None:
            raise ValueError("compute_reward_async needs reward_fn, or config and tokenizer to build one")
        reward_kwargs = _plain(cfg_select(config, "reward_model.reward_kwargs", {}) or {})
        reward_fn = load_reward_manager(config, tokenizer, num_examine=0, **reward_kwargs)
    return compute_reward(data, reward_fn)


def _make_async_task() -> Any:
    import ray

    return ray.remote(num_cpus=1)(_compute_reward_task)


class _LazyRemote:
    """``compute_reward_async.remote(data, config=None, tokenizer=None, reward_fn=None)`` without importing Ray (and
    defining the task) at module import."""

    _task: Any = None

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        if self._task is None:
            type(self)._task = _make_async_task()
        return self._task.remote(*args, **kwargs)

    def options(self, **options: Any) -> Any:
        if self._task is None:
            type(self)._task = _make_async_task()
        return self._task.options(**options)


#: Ray task computing :func:`compute_reward` in another process; ``ray.get`` gives ``(reward_tensor, extra_info)``.
compute_reward_async = _LazyRemote()
