"""Rollout backends (``actor_rollout_ref.rollout.name``: ``hf``, ``vllm``, ``sglang``) behind one interface,
:class:`BaseRollout`, and one output schema (:mod:`verl.workers.rollout.schemas`).

``get_rollout_class(name, mode)`` imports a backend only when it is asked for, so engines that are not installed
cost nothing until chosen (and are then reported with their install command).
"""
from __future__ import annotations

from typing import Any

from verl.workers.rollout.base import (BaseRollout, RolloutSpec, get_rollout_class, get_rollout_spec, list_rollouts,
                                       register_rollout)
from verl.workers.rollout.schemas import (ROLLOUT_OUTPUT_KEYS, build_rollout_output, build_rollout_output_from_prompts)

__all__ = [
    "BaseRollout",
    "HFRollout",
    "RolloutSpec",
    "ROLLOUT_OUTPUT_KEYS",
    "build_rollout_output",
    "build_rollout_output_from_prompts",
    "get_rollout_class",
    "get_rollout_spec",
    "list_rollouts",
    "register_rollout",
]


def __getattr__(name: str) -> Any:
    if name == "HFRollout":  # lazily: it imports transformers
        from verl.workers.rollout.hf.hf_rollout import HFRollout

        return HFRollout
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
