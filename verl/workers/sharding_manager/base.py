"""The hybrid engine's context managers: the same processes train and generate, and a sharding manager moves the
weights from the training layout into the rollout engine on entry and frees the engine's memory on exit.

Usage inside a worker::

    with sharding_manager:                      # weights: training layout -> rollout engine
        data = sharding_manager.preprocess_data(prompts)     # DP -> rollout (e.g. TP group) layout
        out = rollout.generate_sequences(data)
        out = sharding_manager.postprocess_data(out)         # rollout layout -> this DP rank's rows
    metrics = sharding_manager.metrics                       # perf/weight_sync_* of the last entry
"""
from __future__ import annotations

from typing import Any

from verl.protocol import DataProto

__all__ = ["BaseShardingManager"]


class BaseShardingManager:
    """Context manager base: ``__enter__`` loads the current weights into the rollout engine, ``__exit__`` releases
    the engine's memory; ``preprocess_data`` / ``postprocess_data`` move data between the training data-parallel
    layout and the engine's (identity here, for engines without tensor parallelism).

    After each entry, ``timing`` holds seconds per section (``{"weight_sync": s}``; a worker reports them as
    ``timing_s/<section>``) and ``metrics`` the weight-sync measurements under ``perf/weight_sync_*`` names.
    """

    def __init__(self) -> None:
        self.timing: dict[str, float] = {}
        self.metrics: dict[str, Any] = {}

    def __enter__(self) -> "BaseShardingManager":
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        return None  # never swallow an exception raised while generating

    def preprocess_data(self, data: DataProto) -> DataProto:
        """Data as this rank's rollout engine needs it (e.g. all-gathered within its tensor-parallel group)."""
        return data

    def postprocess_data(self, data: DataProto) -> DataProto:
        """The engine's output back in this rank's data-parallel layout (e.g. this rank's chunk of the group's)."""
        return data
