"""Hybrid engine of the Megatron backend (verl's "3D-HybridEngine"): Megatron TP/PP-sharded actor -> rollout engine.

:meth:`MegatronHFShardingManager.iter_hf_weights` is an engine-agnostic generator of ``(hf_name, full tensor)``: it
walks the model in a fixed order that every rank agrees on (pipeline stage, virtual chunk, parameter -- the order of
:meth:`DenseDecoderWeightConverter.mcore_param_names`); for each Megatron parameter the owning stage all-gathers its
TP shards (only when the parameter is split over TP), for an MoE expert also all-gathers local expert ``k`` of every
expert-parallel rank (so all experts reach every rank), broadcasts the gathered shards to the other stages of its
pipeline group, and every rank converts them to Hugging Face names and layouts (fused QKV -> q/k/v, gate/up, padded
vocabulary; Mixtral's experts in checkpoint naming, which the HF rollout's loader places into transformers' fused
in-memory expert tensors). :meth:`iter_weight_buckets` groups that stream into lists of at most ``bucket_bytes`` (a larger tensor is
a list of its own), so no more than one bucket of gathered weights is alive besides what the consumer keeps.

The generator is :class:`MegatronWeightGenerator`; its consumers are the hybrid engines of the rollout backends:
:class:`MegatronHFShardingManager` here (the HF rollout's own model, through :class:`HFModuleWeightLoader`, which copies
tensors into parameters of the same names), and the vLLM / SGLang ones of :mod:`.megatron_vllm` /
:mod:`.megatron_sglang` (the engine's own weight loaders, which shard for the engine's tensor-parallel layout). Every
rank of the actor takes part (the gathers and broadcasts are collectives) and ends up with the full weights, so for
generation each rank is its own data-parallel rank ("PP and TP as extra DP"); for the HF rollout
``preprocess_data`` / ``postprocess_data`` are the identity.

Measurements of each sync are left in ``metrics`` (``perf/weight_sync_s``, ``_gb``, ``_buckets``, ``_max_bucket_mb``,
``_peak_memory_gb``) and ``timing["weight_sync"]``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from verl.utils.device import get_device, get_torch_device, is_cuda_available
from verl.workers.sharding_manager.base import BaseShardingManager

__all__ = [
    "MegatronHFShardingManager", "HFModuleWeightLoader", "MegatronWeightGenerator", "MegatronWeightSource",
    "megatron_manager_factory"
]


def _rss_bytes() -> int:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with ray
        return 0
    return int(psutil.Process().memory_info().rss)


class HFModuleWeightLoader:
    """Copies buckets of ``(hf_name, tensor)`` into an HF model's parameters/buffers of the same names;
    :meth:`finish` raises if names were unknown, shapes differed or parameters were never written.

    ``target_fn(hf_name) -> (parameter name, index) | None`` places a tensor whose checkpoint name the module does not
    have into ``parameter[index]``: how a transformers-5 Mixtral, which keeps its experts fused in memory, takes the
    per-expert tensors the generator streams (the converter's ``hf_module_target``)."""

    def __init__(self, module: nn.Module, target_fn: Optional[Callable[[str], Any]] = None) -> None:
        self.module = module
        self.targets = dict(module.named_parameters(remove_duplicate=False))
        self.targets.update(dict(module.named_buffers(remove_duplicate=False)))
        self.target_fn = target_fn
        self.reset()

    def reset(self) -> None:
        self.written: set[int] = set()
        self.unexpected: list[str] = []
        self.mismatched: list[tuple[str, tuple, tuple]] = []

    @torch.no_grad()
    def __call__(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in bucket:
            target = self.targets.get(name)
            if target is None and self.target_fn is not None:
                where = self.target_fn(name)
                if where is not None and where[0] in self.targets:
                    target = self.targets[where[0]]
                    self.written.add(id(target))  # a slice of it (every slice comes from the same stream)
                    target = target.data[where[1]]
            if target is None:
                self.unexpected.append(name)
                continue
            if tuple(target.shape) != tuple(tensor.shape):
                self.mismatched.append((name, tuple(tensor.shape), tuple(target.shape)))
                continue
            target.data.copy_(tensor, non_blocking=True)
            self.written.add(id(target))

    def finish(self) -> None:
        missing = [n for n, p in self.module.named_parameters() if id(p) not in self.written]
        if self.unexpected or self.mismatched or missing:
            raise ValueError("cannot load the Megatron actor's weights into the rollout model: names it lacks "
                             f"{self.unexpected[:10]}, shape mismatches (name, actor, rollout) {self.mismatched[:10]}, "
                             f"rollout parameters never written {missing[:10]}. The rollout model must be built from "
                             "the same config as the actor (actor_rollout_ref.model.path)")


def _scoped_steps(iterator: Iterator[Any], scope: Callable[[], Any]) -> Iterator[Any]:
    """Each step of ``iterator`` inside a fresh ``scope()`` context, none of the consumer's code: the Megatron CPU
    redirection (:func:`~verl.utils.megatron_cpu.device_scope`) then never reaches a rollout engine's loaders."""
    while True:
        with scope():
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


class MegatronWeightGenerator:
    """The Megatron actor's weights as full Hugging Face tensors, streamed (see the module docstring).

    Args:
        actor_module: this rank's model chunks (plain or DDP-wrapped ``GPTModel``), in virtual-stage order.
        converter: the :class:`~verl.models.mcore.DenseDecoderWeightConverter` of their layout.
        bucket_bytes: bound of one bucket (``rollout.update_weights_bucket_megabytes``).
        dtype: cast floating tensors to it (None: the actor's dtype).
        tied_output: with tied embeddings, also yield the embedding as ``lm_head.weight``. An HF rollout model shares
            the two parameters, so it needs the embedding only; vLLM's output layer did not follow the embedding
            without it (tests/workers/rollout/vllm/test_megatron_vllm.py), so the engines get both.
    """

    def __init__(self,
                 actor_module: list,
                 converter: Any,
                 bucket_bytes: int = 512 << 20,
                 dtype: Optional[torch.dtype] = None,
                 tied_output: bool = False) -> None:
        if int(bucket_bytes) <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}; set "
                             "actor_rollout_ref.rollout.update_weights_bucket_megabytes to a positive number")
        self.actor_module = list(actor_module)
        self.converter = converter
        self.bucket_bytes = int(bucket_bytes)
        self.dtype = dtype
        self.tied_output = bool(tied_output)
        self._meta: Optional[dict] = None

    def _local_params(self) -> list[dict[str, torch.Tensor]]:
        from verl.utils.megatron_utils import unwrap_model

        out = []
        for chunk in self.actor_module:
            inner = unwrap_model(chunk)
            named = dict(inner.named_parameters())
            named.update({k: v for k, v in inner.named_buffers() if k not in named})
            out.append(named)
        return out

    def _metadata(self) -> dict:
        """``{(pp_rank, vp_stage, local_name): (shape of a TP shard, dtype)}`` of the whole model, gathered once."""
        if self._meta is not None:
            return self._meta
        from megatron.core import parallel_state as mpu

        pp_rank = mpu.get_pipeline_model_parallel_rank()
        mine = {}
        for vp_stage, params in enumerate(self._local_params()):
            for name in self.converter.mcore_param_names(pp_rank, vp_stage, local=True):
                if name in params:
                    mine[(pp_rank, vp_stage, name)] = (tuple(params[name].shape), params[name].dtype)
        if mpu.get_pipeline_model_parallel_world_size() > 1:
            gathered: list = [None] * mpu.get_pipeline_model_parallel_world_size()
            dist.all_gather_object(gathered, mine, group=mpu.get_pipeline_model_parallel_group())
            meta = {}
            for part in gathered:
                meta.update(part)
            mine = meta
        self._meta = mine
        return mine

    @torch.no_grad()
    def iter_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(hf_name, full tensor)`` for every HF weight, on every rank (collective: all ranks must iterate to the
        end)."""
        from megatron.core import parallel_state as mpu

        conv = self.converter
        meta = self._metadata()
        params = self._local_params()
        my_pp = mpu.get_pipeline_model_parallel_rank()
        pp_size = mpu.get_pipeline_model_parallel_world_size()
        tp_size = mpu.get_tensor_model_parallel_world_size()
        tp_group = mpu.get_tensor_model_parallel_group()
        pp_group = mpu.get_pipeline_model_parallel_group()
        pp_ranks = dist.get_process_group_ranks(pp_group) if pp_size > 1 else [dist.get_rank()]
        comm_device = get_device() if is_cuda_available() else torch.device("cpu")
        tied = conv.dims.tie_word_embeddings
        ep_size = conv.layout.ep_size
        ep_group = mpu.get_expert_model_parallel_group() if ep_size > 1 else None
        etp_group = mpu.get_expert_tensor_parallel_group() if conv.num_experts and tp_size > 1 else None
        for pp_rank in range(conv.layout.pp_size):
            for vp_stage in range(conv.layout.num_chunks):
                local = conv.mcore_param_names(pp_rank, vp_stage, local=True)
                global_ = conv.mcore_param_names(pp_rank, vp_stage, local=False)
                for ln, gn in zip(local, global_):
                    if gn == "output_layer.weight" and tied:
                        continue  # the tied copy of the embedding
                    shape, dtype = meta[(pp_rank, vp_stage, ln)]
                    expert = conv.is_expert_param(gn)
                    split = conv.tp_split_dim(gn) is not None and tp_size > 1
                    count = tp_size if split else 1
                    ep_count = ep_size if expert else 1
                    shards = None  # [ep rank][tp rank]: one expert of every EP rank, or one replicated parameter
                    if pp_rank == my_pp:
                        tensor = params[vp_stage][ln].detach().to(comm_device).contiguous()
                        if split:
                            tp_shards = [torch.empty_like(tensor) for _ in range(tp_size)]
                            dist.all_gather(tp_shards, tensor, group=etp_group if expert else tp_group)
                        else:
                            tp_shards = [tensor]
                        if ep_count > 1:  # expert k of each EP rank: all-gather over the expert-parallel group
                            mine = torch.stack(tp_shards).contiguous()
                            gathered = [torch.empty_like(mine) for _ in range(ep_count)]
                            dist.all_gather(gathered, mine, group=ep_group)
                            shards = [list(g.unbind(0)) for g in gathered]
                        else:
                            shards = [tp_shards]
                    if pp_size > 1:
                        if pp_rank == my_pp:
                            stacked = torch.stack([torch.stack(s) for s in shards]).contiguous()
                        else:
                            stacked = torch.empty((ep_count, count, *shape), dtype=dtype, device=comm_device)
                        dist.broadcast(stacked, src=pp_ranks[pp_rank], group=pp_group)
                        shards = [list(s.unbind(0)) for s in stacked.unbind(0)]
                    for ep_rank in range(ep_count):
                        name_g = conv.to_global_name(ln, pp_rank, vp_stage, ep_rank) if expert else gn
                        for name, full in conv.mcore_to_hf_param(name_g, shards[ep_rank]):
                            if self.dtype is not None and full.is_floating_point():
                                full = full.to(self.dtype)
                            yield name, full.contiguous()
                            if tied and self.tied_output and gn == "embedding.word_embeddings.weight":
                                yield "lm_head.weight", full.contiguous()

    def iter_weight_buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """:meth:`iter_hf_weights` in lists of at most ``bucket_bytes``. Each step runs in megatron's CPU device
        scope, the consumer's code between steps does not."""
        from verl.models.mcore import bucket_named_tensors
        from verl.utils.megatron_cpu import device_scope

        return _scoped_steps(bucket_named_tensors(self.iter_hf_weights(), self.bucket_bytes), device_scope)

    def load_actor(self, param_store: dict) -> None:
        """Bring offloaded actor parameters back (``*.megatron.param_offload``) for a sync."""
        from verl.utils.megatron_utils import load_megatron_model

        load_megatron_model(self.actor_module, param_store)

    def offload_actor(self, param_store: dict) -> None:
        """Offload the actor parameters again after a sync."""
        from verl.utils.megatron_utils import offload_megatron_model

        offload_megatron_model(self.actor_module, param_store)


class MegatronWeightSource:
    """The actor side of an engine sharding manager fed by a Megatron actor (vLLM, SGLang): the engine base class
    asks for ``_weight_buckets`` / ``_load_actor`` / ``_offload_actor``; this mixin answers them with a
    :class:`MegatronWeightGenerator` and the worker's parameter offload. Subclasses say which dtype the engine
    wants (``_engine_dtype``)."""

    generator: MegatronWeightGenerator

    def _init_megatron_source(self, actor_module: list, converter: Any, bucket_bytes: int, dtype: Any,
                              offload_param: bool, param_store: Optional[dict]) -> None:
        self.generator = MegatronWeightGenerator(actor_module,
                                                 converter,
                                                 bucket_bytes=bucket_bytes,
                                                 dtype=dtype,
                                                 tied_output=True)
        self.offload_param = bool(offload_param)
        self.param_store = param_store if param_store is not None else {}

    def _engine_dtype(self) -> Any:
        return None

    def _weight_buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        self.generator.dtype = self._engine_dtype()
        return self.generator.iter_weight_buckets()

    def _load_actor(self) -> None:
        if self.offload_param:
            self.generator.load_actor(self.param_store)

    def _offload_actor(self) -> None:
        if self.offload_param:
            self.generator.offload_actor(self.param_store)


def megatron_manager_factory(manager_cls: type, worker: Any) -> Callable[..., Any]:
    """``make_manager`` for an engine's ``build_hybrid_engine``: ``manager_cls`` built on the Megatron worker's
    ``actor_module``, ``converter`` and parameter offload (``_offload_param``, ``_offload_store``)."""

    def make_manager(**kwargs: Any) -> Any:
        return manager_cls(worker.actor_module,
                           worker.converter,
                           offload_param=bool(getattr(worker, "_offload_param", False)),
                           param_store=getattr(worker, "_offload_store", None),
                           **kwargs)

    return make_manager


class MegatronHFShardingManager(BaseShardingManager):
    """Stream the Megatron actor's weights into a rollout engine on entry.

    Args:
        actor_module: this rank's model chunks (plain or DDP-wrapped ``GPTModel``), in virtual-stage order.
        converter: the :class:`~verl.models.mcore.DenseDecoderWeightConverter` of their layout.
        inference_module: the HF rollout's model (its weights are overwritten on entry); or
        load_weights_fn: any callable taking one bucket (list of ``(hf_name, tensor)``), e.g. an engine's loader.
        bucket_bytes: bound of one bucket (``rollout.update_weights_bucket_megabytes``).
        dtype: cast floating tensors to it (default: the rollout model's dtype, if it has one).
        offload_param / param_store: the actor's parameters are offloaded between phases; they are loaded for the
            sync and offloaded again (``param_store`` is the worker's offload store).
        offload_rollout: move the HF rollout model to host memory on exit (accelerators only).
    """

    def __init__(self,
                 actor_module: list,
                 converter: Any,
                 inference_module: Optional[nn.Module] = None,
                 load_weights_fn: Optional[Callable[[list], Any]] = None,
                 bucket_bytes: int = 512 << 20,
                 dtype: Optional[torch.dtype] = None,
                 offload_param: bool = False,
                 param_store: Optional[dict] = None,
                 offload_rollout: bool = False) -> None:
        super().__init__()
        if (inference_module is None) == (load_weights_fn is None):
            raise ValueError("give exactly one of inference_module (HF rollout) and load_weights_fn (engine loader)")
        if dtype is None and inference_module is not None:
            dtypes = {p.dtype for p in inference_module.parameters() if p.is_floating_point()}
            dtype = dtypes.pop() if len(dtypes) == 1 else None
        self.generator = MegatronWeightGenerator(actor_module, converter, bucket_bytes=bucket_bytes, dtype=dtype)
        self.actor_module = self.generator.actor_module
        self.converter = converter
        self.inference_module = inference_module
        target_fn = getattr(converter, "hf_module_target", None)
        self.loader = HFModuleWeightLoader(inference_module, target_fn) if inference_module is not None else None
        self.load_weights_fn = load_weights_fn or self.loader
        self.bucket_bytes = self.generator.bucket_bytes
        self.dtype = dtype
        self.offload_param = bool(offload_param)
        self.param_store = param_store if param_store is not None else {}
        self.offload_rollout = bool(offload_rollout)
        self._rollout_offloaded = False
        self.timing: dict[str, float] = {}
        self.metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- generator ----
    def iter_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """:meth:`MegatronWeightGenerator.iter_hf_weights` (collective)."""
        return self.generator.iter_hf_weights()

    def iter_weight_buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """:meth:`MegatronWeightGenerator.iter_weight_buckets` (collective)."""
        return self.generator.iter_weight_buckets()

    # ---------------------------------------------------------------------------------------------- context ----
    def sync_weights(self) -> dict[str, int]:
        """Stream all buckets into the consumer; returns bytes, bucket count, largest bucket, peak RSS."""
        stats = {"bytes": 0, "buckets": 0, "max_bucket": 0, "peak_rss": 0}
        if self.loader is not None:
            self.loader.reset()
        for bucket in self.iter_weight_buckets():
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            self.load_weights_fn(bucket)
            stats["bytes"] += size
            stats["buckets"] += 1
            stats["max_bucket"] = max(stats["max_bucket"], size)
            stats["peak_rss"] = max(stats["peak_rss"], _rss_bytes())
            del bucket
        if self.loader is not None:
            self.loader.finish()
        return stats

    def __enter__(self) -> "MegatronHFShardingManager":
        device = get_torch_device()
        on_gpu = is_cuda_available()
        self.timing, self.metrics = {}, {}
        if on_gpu:
            device.synchronize()
            device.reset_peak_memory_stats()
        start = time.perf_counter()
        if self._rollout_offloaded and self.inference_module is not None:
            self.inference_module.to(get_device())
            self._rollout_offloaded = False
        if self.offload_param:
            self.generator.load_actor(self.param_store)
        stats = self.sync_weights()
        if self.offload_param:
            self.generator.offload_actor(self.param_store)
        device.synchronize()
        device.empty_cache()
        if self.inference_module is not None:
            self.inference_module.eval()
        elapsed = time.perf_counter() - start
        peak = device.max_memory_allocated() if on_gpu else max(stats["peak_rss"], _rss_bytes())
        self._record_weight_sync(elapsed, stats, peak)
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if self.offload_rollout and is_cuda_available() and self.inference_module is not None:
            self.inference_module.to("cpu")
            self._rollout_offloaded = True
        get_torch_device().empty_cache()
        return None
