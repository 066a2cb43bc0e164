"""Hybrid engine for the vLLM rollout: FSDP2 actor -> the in-process vLLM engine of the same worker.

Each generation step (``with sharding_manager:``):

1. enter: load offloaded actor parameters, wake the engine's weights (``wake_up(tags=["weights"])``), gather the
   actor's full weights parameter by parameter in buckets of at most ``bucket_bytes``
   (:func:`verl.utils.fsdp_utils.iter_full_params_in_buckets`) and stream them into the engine's own weight loaders
   (:meth:`vLLMRollout.update_weights`: vLLM fuses and shards them for its tensor-parallel layout), offload the actor
   again, wake the KV cache, reset the prefix cache (it was computed with the old weights);
2. ``preprocess_data``: with tensor parallelism, all-gather the prompts of the tensor-parallel group, so that every
   rank of the group feeds its engine the same batch (vLLM's SPMD execution needs that; sampling is identical too,
   because the rollout's random stream is seeded by the data-parallel rank, shared within the group);
3. the rollout generates; ``postprocess_data`` keeps this rank's rows of the group's output;
4. exit: ``sleep(level=1)`` returns the engine's memory to training (weights to host memory, KV cache dropped).

``sleep``/``wake_up`` are always called; vLLM's CPU build logs that it does not support them and keeps its memory.
Every rank of the actor's mesh takes part in the gathers (they are collectives). Measurements of each sync are left in
``metrics`` under the same names as the HF hybrid engine (``perf/weight_sync_s``, ``perf/weight_sync_gb``,
``perf/weight_sync_buckets``, ``perf/weight_sync_max_bucket_mb``, ``perf/weight_sync_peak_memory_gb``,
``perf/weight_sync_peak_memory_delta_gb``: accelerator allocations on GPU, process RSS on CPU) and
``timing["weight_sync"]``.

:func:`build_hybrid_engine` is what the FSDP worker calls for ``actor_rollout_ref.rollout.name=vllm``.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from verl.protocol import DataProto, all_gather_data_proto
from verl.utils.device import get_device_name, get_torch_device, is_cuda_available
from verl.workers.sharding_manager.base import BaseShardingManager
from verl.workers.sharding_manager.fsdp_hf import _clean_name, _rss_bytes

__all__ = ["FSDPVLLMShardingManager", "build_hybrid_engine"]

_GIB = float(1 << 30)
_KEY = "actor_rollout_ref.rollout"


class FSDPVLLMShardingManager(BaseShardingManager):
    """Load the FSDP2 (or plain) actor's weights into a :class:`vLLMRollout` engine on entry; put it to sleep on
    exit (see the module docstring).

    Args:
        module: the training model (FSDP2 ``fully_shard``-ed, or a plain ``nn.Module`` in one process).
        rollout: the :class:`~verl.workers.rollout.vllm_rollout.vLLMRollout` (anything with ``update_weights``,
            ``wake_up``, ``sleep``, ``reset_prefix_cache`` and ``model_dtype``).
        bucket_bytes: upper bound of gathered-but-not-yet-loaded weights (a single larger tensor is a bucket of its
            own); ``rollout.update_weights_bucket_megabytes``.
        offload_param: the actor's parameters live in host memory between steps (``fsdp_config.param_offload``).
        free_cache_engine: sleep the engine between generations (``rollout.free_cache_engine``); it is put to sleep
            here already, so its memory is free until the first generation.
        device_mesh: the inference mesh with dimensions ``("dp", "infer_tp")``; None without tensor parallelism.
        sleep_level: vLLM sleep level (1 keeps a host copy of the weights; 2 drops them, they are reloaded anyway).
    """

    def __init__(self,
                 module: nn.Module,
                 rollout: Any,
                 bucket_bytes: int = 512 << 20,
                 offload_param: bool = False,
                 free_cache_engine: bool = True,
                 device_mesh: Any = None,
                 sleep_level: int = 1) -> None:
        super().__init__()
        if int(bucket_bytes) <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}; set "
                             f"{_KEY}.update_weights_bucket_megabytes to a positive number")
        self.module = module
        self.rollout = rollout
        self.bucket_bytes = int(bucket_bytes)
        self.offload_param = bool(offload_param)
        self.free_cache_engine = bool(free_cache_engine)
        self.sleep_level = int(sleep_level)
        self.device_mesh = device_mesh
        if device_mesh is not None and "infer_tp" in (device_mesh.mesh_dim_names or ()):
            self.tp_size = int(device_mesh["infer_tp"].size())
            self.tp_rank = int(device_mesh["infer_tp"].get_local_rank())
            self.tp_group = device_mesh["infer_tp"].get_group()
        else:
            self.tp_size, self.tp_rank, self.tp_group = 1, 0, None
        self.last_buckets: list[tuple[int, int]] = []  # (tensors, bytes) of each bucket of the last sync
        self._group_lengths: list[int] | None = None
        self._actor_was_training = True
        if self.free_cache_engine:
            self.rollout.sleep(level=self.sleep_level)

    # ------------------------------------------------------------------------------------------ context -------
    def __enter__(self) -> "FSDPVLLMShardingManager":
        from verl.utils.fsdp_utils import load_fsdp_model_to_gpu, offload_fsdp_model_to_cpu

        device = get_torch_device()
        on_gpu = is_cuda_available()
        self.timing, self.metrics = {}, {}
        self._actor_was_training = self.module.training
        if on_gpu:
            device.synchronize()
            device.reset_peak_memory_stats()
        mem_start = device.memory_allocated() if on_gpu else (_rss_bytes() or 0)
        start = time.perf_counter()

        if self.offload_param:
            load_fsdp_model_to_gpu(self.module)
        self.rollout.wake_up(tags=["weights"])
        stats = self.sync_weights()
        if self.offload_param:
            offload_fsdp_model_to_cpu(self.module, empty_cache=False)
        device.synchronize()
        device.empty_cache()
        self.rollout.wake_up(tags=["kv_cache"])
        self.rollout.reset_prefix_cache()

        elapsed = time.perf_counter() - start
        if on_gpu:
            peak = device.max_memory_allocated()
        else:
            peak = max(stats["peak_rss"], _rss_bytes() or 0)
        self.timing["weight_sync"] = elapsed
        self.metrics.update({
            "perf/weight_sync_s": elapsed,
            "perf/weight_sync_gb": stats["bytes"] / _GIB,
            "perf/weight_sync_buckets": stats["buckets"],
            "perf/weight_sync_max_bucket_mb": stats["max_bucket"] / float(1 << 20),
            "perf/weight_sync_peak_memory_gb": peak / _GIB,
            "perf/weight_sync_peak_memory_delta_gb": max(0, peak - mem_start) / _GIB,
        })
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if self.free_cache_engine:
            self.rollout.sleep(level=self.sleep_level)
        self.module.train(self._actor_was_training)
        get_torch_device().empty_cache()
        return None

    # ------------------------------------------------------------------------------------------- weights ------
    @torch.no_grad()
    def sync_weights(self) -> dict[str, int]:
        """Gather the actor's full weights bucket by bucket and stream them into the engine.

        The gathers are collectives: this rank iterates to the end even when the engine stops early or fails, so
        that the other ranks are not left waiting. Returns the bytes moved, the number of buckets, the largest
        bucket and the peak RSS seen (CPU).
        """
        from verl.utils.fsdp_utils import iter_full_params_in_buckets

        stats = {"bytes": 0, "buckets": 0, "max_bucket": 0, "peak_rss": 0}
        self.last_buckets = []

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for bucket in iter_full_params_in_buckets(self.module,
                                                      bucket_bytes=self.bucket_bytes,
                                                      dtype=self.rollout.model_dtype):
                size = sum(t.numel() * t.element_size() for _, t in bucket)
                stats["buckets"] += 1
                stats["bytes"] += size
                stats["max_bucket"] = max(stats["max_bucket"], size)
                self.last_buckets.append((len(bucket), size))
                rss = _rss_bytes()
                if rss is not None:
                    stats["peak_rss"] = max(stats["peak_rss"], rss)
                for name, tensor in bucket:
                    yield _clean_name(name), tensor
                del bucket  # before the next gather: at most one bucket is alive

        weights = stream()
        try:
            loaded = self.rollout.update_weights(weights)
        finally:
            for _ in weights:  # finish the collectives
                pass
        if isinstance(loaded, dict) and loaded.get("tensors", 0) == 0:
            raise ValueError("the actor has no weights to load into the vLLM engine; the rollout needs the actor "
                             "model (actor_rollout_ref.model.path)")
        return stats

    # ---------------------------------------------------------------------------------------------- data ------
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


def build_hybrid_engine(worker: Any, rollout_cls: type) -> tuple[Any, FSDPVLLMShardingManager]:
    """The vLLM rollout of an FSDP ``ActorRolloutRefWorker`` and the sharding manager that feeds it the actor's
    weights; called by the worker's ``_build_rollout`` for ``actor_rollout_ref.rollout.name=vllm``.

    Builds the inference mesh ``(dp, infer_tp)`` over the worker group (consecutive ranks form a tensor-parallel
    group) when ``rollout.tensor_model_parallel_size > 1``. Every rank must call it (engine start and mesh creation
    are collectives).
    """
    from verl.utils.config import cfg_select

    config = worker.config
    rollout_cfg = cfg_select(config, "rollout")
    model_cfg = cfg_select(config, "model")

    def get(node: Any, key: str, default: Any = None) -> Any:
        value = cfg_select(node, key, default)
        return default if value is None else value

    tp = int(get(rollout_cfg, "tensor_model_parallel_size", 1) or 1)
    distributed = dist.is_available() and dist.is_initialized()
    world_size, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    if tp < 1 or world_size % tp:
        raise ValueError(f"{_KEY}.tensor_model_parallel_size={tp} must divide the number of worker processes "
                         f"({world_size}). Fix: set it to a divisor of trainer.n_gpus_per_node * trainer.nnodes")
    mesh = None
    if tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(get_device_name(), (world_size // tp, tp), mesh_dim_names=("dp", "infer_tp"))
    rollout = rollout_cls(model_path=get(model_cfg, "path"),
                          config=rollout_cfg,
                          tokenizer=worker.tokenizer,
                          model_hf_config=getattr(worker, "hf_config", None),
                          device_mesh=mesh,
                          dp_rank=rank // tp,
                          tokenizer_path=get(model_cfg, "tokenizer_path", None),
                          trust_remote_code=bool(get(model_cfg, "trust_remote_code", False)))
    bucket_mb = float(get(rollout_cfg, "update_weights_bucket_megabytes", 512) or 512)
    manager = FSDPVLLMShardingManager(module=worker.actor_module_fsdp,
                                      rollout=rollout,
                                      bucket_bytes=int(bucket_mb * (1 << 20)),
                                      offload_param=bool(getattr(worker, "_is_offload_param", False)),
                                      free_cache_engine=bool(get(rollout_cfg, "free_cache_engine", True)),
                                      device_mesh=mesh)
    return rollout, manager
