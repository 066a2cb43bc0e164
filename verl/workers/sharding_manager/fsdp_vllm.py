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

The engine side (steps 1-4 without the actor) is :class:`VLLMShardingManager`; a subclass supplies the actor's weights
(``_weight_buckets``) and its offload (``_load_actor`` / ``_offload_actor``): :class:`FSDPVLLMShardingManager` here,
:class:`~verl.workers.sharding_manager.megatron_vllm.MegatronVLLMShardingManager` for the Megatron actor.

:func:`build_hybrid_engine` is what the FSDP worker calls for ``actor_rollout_ref.rollout.name=vllm``; its
``make_manager`` argument lets another backend put its own weight source behind the same engine.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

from verl.utils.device import get_torch_device, is_cuda_available
from verl.workers.sharding_manager.base import TPGroupShardingManager, build_infer_tp_mesh
from verl.workers.sharding_manager.fsdp_hf import FSDPWeightSource, _rss_bytes

__all__ = ["VLLMShardingManager", "FSDPVLLMShardingManager", "build_hybrid_engine"]

_KEY = "actor_rollout_ref.rollout"


class VLLMShardingManager(TPGroupShardingManager):
    """The engine side of the vLLM hybrid engine: wake the engine, stream the actor's weights into it, put it to sleep
    on exit (see the module docstring). Subclasses supply the weights.

    Args:
        rollout: the :class:`~verl.workers.rollout.vllm_rollout.vLLMRollout` (anything with ``update_weights``,
            ``wake_up``, ``sleep``, ``reset_prefix_cache`` and ``model_dtype``).
        bucket_bytes: upper bound of gathered-but-not-yet-loaded weights (a single larger tensor is a bucket of its
            own); ``rollout.update_weights_bucket_megabytes``.
        free_cache_engine: sleep the engine between generations (``rollout.free_cache_engine``); it is put to sleep
            here already, so its memory is free until the first generation.
        device_mesh: the inference mesh with dimensions ``("dp", "infer_tp")``; None without tensor parallelism.
        sleep_level: vLLM sleep level (1 keeps a host copy of the weights; 2 drops them, they are reloaded anyway).
    """

    def __init__(self,
                 rollout: Any,
                 bucket_bytes: int = 512 << 20,
                 free_cache_engine: bool = True,
                 device_mesh: Any = None,
                 sleep_level: int = 1) -> None:
        super().__init__()
        if int(bucket_bytes) <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}; set "
                             f"{_KEY}.update_weights_bucket_megabytes to a positive number")
        self.rollout = rollout
        self.bucket_bytes = int(bucket_bytes)
        self.free_cache_engine = bool(free_cache_engine)
        self.sleep_level = int(sleep_level)
        self._init_tp_group(device_mesh)
        self.last_buckets: list[tuple[int, int]] = []  # (tensors, bytes) of each bucket of the last sync
        if self.free_cache_engine:
            self.rollout.sleep(level=self.sleep_level)

    # ------------------------------------------------------------------------------------- weight source ------
    def _weight_buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The actor's full weights under their Hugging Face names, in buckets of at most ``bucket_bytes`` (cast to
        ``rollout.model_dtype``). A collective: every rank iterates to the end."""
        raise NotImplementedError

    def _load_actor(self) -> None:
        """Bring offloaded actor parameters to the device for the sync."""

    def _offload_actor(self) -> None:
        """Offload them again after the sync."""

    # ------------------------------------------------------------------------------------------ context -------
    def __enter__(self) -> "VLLMShardingManager":
        device = get_torch_device()
        on_gpu = is_cuda_available()
        self.timing, self.metrics = {}, {}
        if on_gpu:
            device.synchronize()
            device.reset_peak_memory_stats()
        mem_start = device.memory_allocated() if on_gpu else (_rss_bytes() or 0)
        start = time.perf_counter()

        self._load_actor()
        self.rollout.wake_up(tags=["weights"])
        stats = self.sync_weights()
        self._offload_actor()
        device.synchronize()
        device.empty_cache()
        self.rollout.wake_up(tags=["kv_cache"])
        self.rollout.reset_prefix_cache()

        elapsed = time.perf_counter() - start
        if on_gpu:
            peak = device.max_memory_allocated()
        else:
            peak = max(stats["peak_rss"], _rss_bytes() or 0)
        self._record_weight_sync(elapsed, stats, peak, mem_start)
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if self.free_cache_engine:
            self.rollout.sleep(level=self.sleep_level)
        get_torch_device().empty_cache()
        return None

    # ------------------------------------------------------------------------------------------- weights ------
    @torch.no_grad()
    def sync_weights(self) -> dict[str, int]:
        """Stream the actor's weights (:meth:`_weight_buckets`) bucket by bucket into the engine.

        The gathers are collectives: this rank iterates to the end even when the engine stops early or fails, so
        that the other ranks are not left waiting. Returns the bytes moved, the number of buckets, the largest
        bucket and the peak RSS seen (CPU).
        """
        stats = {"bytes": 0, "buckets": 0, "max_bucket": 0, "peak_rss": 0}
        self.last_buckets = []

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for bucket in self._weight_buckets():
                size = sum(t.numel() * t.element_size() for _, t in bucket)
                stats["buckets"] += 1
                stats["bytes"] += size
                stats["max_bucket"] = max(stats["max_bucket"], size)
                self.last_buckets.append((len(bucket), size))
                rss = _rss_bytes()
                if rss is not None:
                    stats["peak_rss"] = max(stats["peak_rss"], rss)
                yield from bucket
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


class FSDPVLLMShardingManager(FSDPWeightSource, VLLMShardingManager):
    """Load the FSDP2 (or plain) actor's weights into a :class:`vLLMRollout` engine on entry; put it to sleep on
    exit (see the module docstring).

    Args:
        module: the training model (FSDP2 ``fully_shard``-ed, or a plain ``nn.Module`` in one process).
        rollout, bucket_bytes, free_cache_engine, device_mesh, sleep_level: see :class:`VLLMShardingManager`.
        offload_param: the actor's parameters live in host memory between steps (``fsdp_config.param_offload``).
    """

    def __init__(self,
                 module: nn.Module,
                 rollout: Any,
                 bucket_bytes: int = 512 << 20,
                 offload_param: bool = False,
                 free_cache_engine: bool = True,
                 device_mesh: Any = None,
                 sleep_level: int = 1) -> None:
        self.module = module
        self.offload_param = bool(offload_param)
        self._actor_was_training = True
        super().__init__(rollout,
                         bucket_bytes=bucket_bytes,
                         free_cache_engine=free_cache_engine,
                         device_mesh=device_mesh,
                         sleep_level=sleep_level)

    def __enter__(self) -> "FSDPVLLMShardingManager":
        self._actor_was_training = self.module.training
        super().__enter__()
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        super().__exit__(exc_type, exc_value, traceback)
        self.module.train(self._actor_was_training)
        return None

    def _engine_dtype(self) -> Any:
        return self.rollout.model_dtype


def build_hybrid_engine(
        worker: Any,
        rollout_cls: type,
        make_manager: Callable[..., VLLMShardingManager] | None = None) -> tuple[Any, VLLMShardingManager]:
    """The vLLM rollout of an ``ActorRolloutRefWorker`` and the sharding manager that feeds it the actor's weights;
    called by the worker's ``_build_rollout`` for ``actor_rollout_ref.rollout.name=vllm``.

    Builds the inference mesh ``(dp, infer_tp)`` over the worker group (consecutive ranks form a tensor-parallel
    group) when ``rollout.tensor_model_parallel_size > 1``. Every rank must call it (engine start and mesh creation
    are collectives). ``make_manager(rollout=, bucket_bytes=, free_cache_engine=, device_mesh=)`` builds the manager
    around the worker's actor; default: the FSDP actor (``worker.actor_module_fsdp``).
    """
    from verl.utils.config import cfg_select

    config = worker.config
    rollout_cfg = cfg_select(config, "rollout")
    model_cfg = cfg_select(config, "model")

    def get(node: Any, key: str, default: Any = None) -> Any:
        value = cfg_select(node, key, default)
        return default if value is None else value

    tp = int(get(rollout_cfg, "tensor_model_parallel_size", 1) or 1)
    mesh, rank = build_infer_tp_mesh(tp)
    rollout = rollout_cls(model_path=get(model_cfg, "path"),
                          config=rollout_cfg,
                          tokenizer=worker.tokenizer,
                          model_hf_config=getattr(worker, "hf_config", None),
                          device_mesh=mesh,
                          dp_rank=rank // tp,
                          tokenizer_path=get(model_cfg, "tokenizer_path", None),
                          trust_remote_code=bool(get(model_cfg, "trust_remote_code", False)))
    bucket_mb = float(get(rollout_cfg, "update_weights_bucket_megabytes", 512) or 512)
    if make_manager is None:

        def make_manager(**kwargs: Any) -> VLLMShardingManager:
            return FSDPVLLMShardingManager(module=worker.actor_module_fsdp,
                                           offload_param=bool(getattr(worker, "_is_offload_param", False)),
                                           **kwargs)

    manager = make_manager(rollout=rollout,
                           bucket_bytes=int(bucket_mb * (1 << 20)),
                           free_cache_engine=bool(get(rollout_cfg, "free_cache_engine", True)),
                           device_mesh=mesh)
    return rollout, manager
