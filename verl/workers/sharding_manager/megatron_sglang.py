"""Hybrid engine of the Megatron backend for the SGLang rollout: Megatron TP/PP-sharded actor -> SGLang engine
(offline ``Engine`` or HTTP server) (verl's "3D-HybridEngine" with SGLang).

The actor side is :class:`~verl.workers.sharding_manager.megatron_hf.MegatronWeightGenerator`: parameter by parameter,
the owning pipeline stage all-gathers the tensor-parallel shards and broadcasts them to the other stages, and every
rank converts them to full Hugging Face tensors, grouped in buckets of at most
``rollout.update_weights_bucket_megabytes`` and cast to the engine's dtype. The engine side is
:class:`~verl.workers.sharding_manager.fsdp_sglang.SGLangShardingManager` (the FSDP actor's too): each bucket is sent
inside one weight-update session through ``update_weights_from_tensor`` (CUDA IPC handles on GPU, one per engine TP
rank; shared memory on CPU), ``update_weights_from_distributed`` or ``update_weights_from_disk``
(``rollout.http_server.weight_sync``), and SGLang shards it for its own tensor-parallel layout, so the Megatron layout
(``actor.megatron.*``) and the rollout's (``rollout.tensor_model_parallel_size``) are independent. Memory
release/resume, the cache flush, the TP-group data movement and the ``perf/weight_sync_*`` metrics are the same as for
the FSDP actor.

Every rank of the actor takes part in every sync (the gathers and broadcasts are collectives); the first rank of each
rollout tensor-parallel group owns the engine.

:func:`build_hybrid_engine` is what the Megatron worker calls for ``actor_rollout_ref.rollout.name=sglang``.
"""
from __future__ import annotations

from typing import Any, Optional

from verl.workers.sharding_manager.fsdp_sglang import SGLangShardingManager
from verl.workers.sharding_manager.fsdp_sglang import build_hybrid_engine as _build_sglang_hybrid_engine
from verl.workers.sharding_manager.megatron_hf import MegatronWeightSource, megatron_manager_factory

__all__ = ["MegatronSGLangShardingManager", "build_hybrid_engine"]


class MegatronSGLangShardingManager(MegatronWeightSource, SGLangShardingManager):
    """Send the Megatron actor's weights to an SGLang engine on entry; release its memory on exit.

    Args:
        actor_module: this rank's model chunks (plain or DDP-wrapped ``GPTModel``), in virtual-stage order.
        converter: the :class:`~verl.models.mcore.DenseDecoderWeightConverter` of their layout.
        inference_engine: the engine adapter on the rank that owns it, else None (see
            :class:`~verl.workers.sharding_manager.fsdp_sglang.SGLangShardingManager`, as for the other keyword
            arguments: ``release_memory``, ``weight_sync``, ``dtype``, ...).
        bucket_bytes: bound of one bucket (``rollout.update_weights_bucket_megabytes``).
        offload_param / param_store: the actor's parameters are offloaded between phases
            (``actor.megatron.param_offload``); they are loaded for the sync and offloaded again (``param_store``
            is the worker's offload store).
    """

    def __init__(self,
                 actor_module: list,
                 converter: Any,
                 inference_engine: Any,
                 bucket_bytes: int = 512 << 20,
                 offload_param: bool = False,
                 param_store: Optional[dict] = None,
                 **engine_kwargs: Any) -> None:
        self._init_megatron_source(actor_module, converter, bucket_bytes, engine_kwargs.get("dtype"), offload_param,
                                   param_store)
        super().__init__(inference_engine, bucket_bytes=bucket_bytes, **engine_kwargs)

    def _engine_dtype(self) -> Any:
        return self.dtype


def build_hybrid_engine(worker: Any, rollout_cls: type) -> tuple[Any, MegatronSGLangShardingManager]:
    """The SGLang rollout of a Megatron ``ActorRolloutRefWorker`` and the sharding manager that feeds it the actor's
    weights (the worker's ``actor_module``, ``converter``, ``_offload_param`` and ``_offload_store``). Every rank must
    call it."""
    return _build_sglang_hybrid_engine(worker,
                                       rollout_cls,
                                       make_manager=megatron_manager_factory(MegatronSGLangShardingManager, worker))
