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

from typing import Any, Optional

import torch.distributed as dist

from verl.protocol import DataProto, all_gather_data_proto
from verl.utils.config import ConfigError
from verl.utils.device import get_device_name

_GIB = float(1 << 30)

__all__ = ["BaseShardingManager", "TPGroupShardingManager", "build_infer_tp_mesh"]


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

    def _record_weight_sync(self,
                            elapsed: float,
                            stats: dict[str, Any],
                            peak: float,
                            mem_start: Optional[float] = None) -> None:
        """Leave one sync's measurements in ``timing`` / ``metrics`` under the names every engine reports:
        ``stats`` holds the bytes, buckets and largest bucket sent; ``peak`` (bytes) is the peak device memory on
        GPU, else the peak RSS; ``mem_start`` (same unit, before the sync) adds the peak's growth over it."""
        self.timing["weight_sync"] = elapsed
        self.metrics.update({
            "perf/weight_sync_s": elapsed,
            "perf/weight_sync_gb": stats["bytes"] / _GIB,
            "perf/weight_sync_buckets": stats["buckets"],
            "perf/weight_sync_max_bucket_mb": stats["max_bucket"] / float(1 << 20),
            "perf/weight_sync_peak_memory_gb": peak / _GIB,
        })
        if mem_start is not None:
            self.metrics["perf/weight_sync_peak_memory_delta_gb"] = max(0, peak - mem_start) / _GIB

    def preprocess_data(self, data: DataProto) -> DataProto:
        """Data as this rank's rollout engine needs it (e.g. all-gathered within its tensor-parallel group)."""
        return data

    def postprocess_data(self, data: DataProto) -> DataProto:
        """The engine's output back in this rank's data-parallel layout (e.g. this rank's chunk of the group's)."""
        return data


def build_infer_tp_mesh(tp: int) -> tuple[Any, int]:
    """The inference mesh ``("dp", "infer_tp")`` over the worker group for ``rollout.tensor_model_parallel_size=tp``
    (consecutive ranks form a tensor-parallel group; None when ``tp`` is 1), and this process's global rank (0
    outside torch.distributed). Every rank must call it (creating the mesh is a collective)."""
    distributed = dist.is_available() and dist.is_initialized()
    world_size, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    if tp < 1 or world_size % tp:
        raise ConfigError(f"actor_rollout_ref.rollout.tensor_model_parallel_size={tp} must divide the number of worker "
                          f"processes ({world_size}). Fix: set it to a divisor of trainer.n_gpus_per_node * "
                          "trainer.nnodes")
    if tp == 1:
        return None, rank
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(get_device_name(), (world_size // tp, tp), mesh_dim_names=("dp", "infer_tp")), rank


class TPGroupShardingManager(BaseShardingManager):
    """Base of the hybrid engines whose rollout runs one engine per tensor-parallel group (vLLM, SGLang): every rank
    of the group feeds the engine the group's prompts, and takes back the output rows of the prompts it sent.

    Subclasses call :meth:`_init_tp_group` with the inference mesh (:func:`build_infer_tp_mesh`, or None without
    tensor parallelism); it sets ``tp_size``, ``tp_rank``, ``tp_group`` and ``tp_src`` (global rank of the
    group's first rank).
    """

    def _init_tp_group(self, device_mesh: Any) -> None:
        self.device_mesh = device_mesh
        if device_mesh is not None and "infer_tp" in (device_mesh.mesh_dim_names or ()):
            tp_mesh = device_mesh["infer_tp"]
            self.tp_size = int(tp_mesh.size())
            self.tp_rank = int(tp_mesh.get_local_rank())
            self.tp_group = tp_mesh.get_group()
            self.tp_src = int(tp_mesh.mesh.flatten()[0].item())
        else:
            self.tp_size, self.tp_rank, self.tp_group, self.tp_src = 1, 0, None, 0
        self._group_lengths: list[int] | None = None

    def preprocess_data(self, data: DataProto) -> DataProto:
        """With tensor parallelism: every rank of the group gets the group's prompts (in rank order)."""
        if self.tp_size == 1:
            return data
        lengths: list[Any] = [None] * self.tp_size
        dist.all_gather_object(lengths, len(data), group=self.tp_group)
        self._group_lengths = [int(n) for n in lengths]
        all_gather_data_proto(data, process_group=self.tp_group)
        return data

    def postprocess_data(self, data: DataProto) -> DataProto:
        """With tensor parallelism: this rank's rows of the group's output (``n`` rows per prompt it sent)."""
        if self.tp_size == 1:
            return data
        lengths = self._group_lengths
        if lengths is None:
            raise RuntimeError("postprocess_data without preprocess_data: the group's prompt counts are unknown")
        total = sum(lengths)
        if total == 0 or len(data) % total:
            raise RuntimeError(f"the engine returned {len(data)} rows for {total} gathered prompts")
        per_prompt = len(data) // total
        start = sum(lengths[:self.tp_rank]) * per_prompt
        return data[start:start + lengths[self.tp_rank] * per_prompt]
