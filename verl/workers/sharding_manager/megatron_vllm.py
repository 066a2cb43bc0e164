"""Hybrid engine of the Megatron backend for the vLLM rollout: Megatron TP/PP-sharded actor -> the in-process vLLM
engine of the same worker (verl's "3D-HybridEngine" with vLLM).

The actor side is :class:`~verl.workers.sharding_manager.megatron_hf.MegatronWeightGenerator`: parameter by parameter,
the owning pipeline stage all-gathers the tensor-parallel shards and broadcasts them to the other stages, and every
rank converts them to full Hugging Face tensors, grouped in buckets of at most
``rollout.update_weights_bucket_megabytes`` and cast to the engine's dtype. The engine side is
:class:`~verl.workers.sharding_manager.fsdp_vllm.VLLMShardingManager` (the FSDP actor's too): each bucket goes through
vLLM's own weight loaders, which fuse q/k/v and gate/up and keep the slice of the engine's tensor-parallel rank, so
the Megatron layout (``actor.megatron.*``) and the rollout's (``rollout.tensor_model_parallel_size``) are
independent. Sleep/wake-up, the prefix-cache reset, the TP-group data movement and the ``perf/weight_sync_*`` metrics
are the same as for the FSDP actor.

Every rank of the actor takes part in every sync (the gathers and broadcasts are collectives) and every rank runs an
engine (one per rollout tensor-parallel group of consecutive ranks), so for generation each rank is its own
data-parallel rank, as with the HF rollout.

:func:`build_hybrid_engine` is what the Megatron worker calls for ``actor_rollout_ref.rollout.name=vllm``.
"""
from __future__ import annotations

from typing import Any, Optional

from verl.workers.sharding_manager.fsdp_vllm import VLLMShardingManager
from verl.workers.sharding_manager.fsdp_vllm import build_hybrid_engine as _build_vllm_hybrid_engine
from verl.workers.sharding_manager.megatron_hf import MegatronWeightSource, megatron_manager_factory

__all__ = ["MegatronVLLMShardingManager", "build_hybrid_engine"]


class MegatronVLLMShardingManager(MegatronWeightSource, VLLMShardingManager):
    """Stream the Megatron actor's weights into a :class:`vLLMRollout` engine on entry; put it to sleep on exit.

    Args:
        actor_module: this rank's model chunks (plain or DDP-wrapped ``GPTModel``), in virtual-stage order.
        converter: the :class:`~verl.models.mcore.DenseDecoderWeightConverter` of their layout.
        rollout, bucket_bytes, free_cache_engine, device_mesh, sleep_level: see
            :class:`~verl.workers.sharding_manager.fsdp_vllm.VLLMShardingManager`.
        offload_param / param_store: the actor's parameters are offloaded between phases
            (``actor.megatron.param_offload``); they are loaded for the sync and offloaded again (``param_store``
            is the worker's offload store).
    """

    def __init__(self,
                 actor_module: list,
                 converter: Any,
                 rollout: Any,
                 bucket_bytes: int = 512 << 20,
                 offload_param: bool = False,
                 param_store: Optional[dict] = None,
                 free_cache_engine: bool = True,
                 device_mesh: Any = None,
                 sleep_level: int = 1) -> None:
        self._init_megatron_source(actor_module, converter, bucket_bytes, getattr(rollout, "model_dtype", None),
                                   offload_param, param_store)
        super().__init__(rollout,
                         bucket_bytes=bucket_bytes,
                         free_cache_engine=free_cache_engine,
                         device_mesh=device_mesh,
                         sleep_level=sleep_level)

    def _engine_dtype(self) -> Any:
        return getattr(self.rollout, "model_dtype", None)


def build_hybrid_engine(worker: Any, rollout_cls: type) -> tuple[Any, MegatronVLLMShardingManager]:
    """The vLLM rollout of a Megatron ``ActorRolloutRefWorker`` and the sharding manager that feeds it the actor's
    weights (the worker's ``actor_module``, ``converter``, ``_offload_param`` and ``_offload_store``). Every rank must
    call it (engine start and mesh creation are collectives)."""
    return _build_vllm_hybrid_engine(worker,
                                     rollout_cls,
                                     make_manager=megatron_manager_factory(MegatronVLLMShardingManager, worker))
