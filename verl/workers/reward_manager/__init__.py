"""Reward managers: turn a rollout batch into token-level scores (``reward_model.reward_manager=<name>``).

Registered: ``naive`` (sequential), ``batch`` (one call with lists), ``dapo`` (overlong penalty), ``prime``
(process pool with a per-sample timeout). Add your own with ``@register("name")``.
"""
from verl.workers.reward_manager.registry import REWARD_MANAGER_REGISTRY, get_reward_manager_cls, register  # isort: skip
from verl.workers.reward_manager.abstract import AbstractRewardManager
from verl.workers.reward_manager.batch import BatchRewardManager
from verl.workers.reward_manager.dapo import DAPORewardManager
from verl.workers.reward_manager.naive import NaiveRewardManager
from verl.workers.reward_manager.prime import PrimeRewardManager

__all__ = [
    "AbstractRewardManager",
    "BatchRewardManager",
    "DAPORewardManager",
    "NaiveRewardManager",
    "PrimeRewardManager",
    "REWARD_MANAGER_REGISTRY",
    "get_reward_manager_cls",
    "register",
]
