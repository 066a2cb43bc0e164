"""Hybrid engine for the HF rollout: FSDP2 actor -> a separate, unsharded Hugging Face model that generates.

On entry the actor's full weights are gathered parameter by parameter (``DTensor.full_tensor``) in buckets of at
most ``bucket_bytes`` (:func:`verl.utils.fsdp_utils.iter_full_params_in_buckets`) and copied into the rollout model's
parameters of the same names, so that no more than one bucket of gathered weights exists at a time. Every rank of the
actor's mesh takes part (the gathers are collectives) and ends up with the full weights in its own rollout copy.
A plain ``nn.Module`` actor (one process, no FSDP) works the same way, without communication.

Measurements of each sync are left in ``metrics`` (``perf/weight_sync_s``, ``perf/weight_sync_gb``,
``perf/weight_sync_buckets``, ``perf/weight_sync_max_bucket_mb``, ``perf/weight_sync_peak_memory_gb`` and
``perf/weight_sync_peak_memory_delta_gb``: accelerator allocations on GPU, process RSS on CPU) and
``timing["weight_sync"]``.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import torch
from torch import nn

from verl.utils.device import get_device, get_torch_device, is_cuda_available
from verl.workers.sharding_manager.base import BaseShardingManager

__all__ = ["FSDPHFShardingManager"]

# wrapper prefixes that may appear inside a training module's parameter names but not in a plain HF model's
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean_name(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency of ray
        return None
    return int(psutil.Process().memory_info().rss)


class FSDPHFShardingManager(BaseShardingManager):
    """Copy an FSDP2 (or plain) actor's weights into the HF rollout model on entry; free memory on exit.

    Args:
        module: the training model (FSDP2 ``fully_shard``-ed, or a plain ``nn.Module`` with world size 1).
        inference_module: the rollout's own unsharded Hugging Face model, with the same parameter names.
        bucket_bytes: upper bound of gathered-but-not-yet-copied weights (a single tensor larger than it is a
            bucket of its own). ``rollout.update_weights_bucket_megabytes`` in the config.
        offload_param: the actor's parameters live in host memory between steps (``fsdp_config.param_offload``):
            they are loaded to the accelerator for the gather and offloaded again afterwards.
        offload_rollout: move the rollout model's weights to host memory on exit and back on entry (frees its
            accelerator memory for training; a no-op on CPU).
        device_mesh: unused (each DTensor carries its mesh); accepted for call compatibility.
    """

    def __init__(self,
                 module: nn.Module,
                 inference_module: nn.Module,
                 bucket_bytes: int = 512 << 20,
                 offload_param: bool = False,
                 offload_rollout: bool = False,
                 device_mesh: Any = None) -> None:
        super().__init__()
        if int(bucket_bytes) <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}; set "
                             "actor_rollout_ref.rollout.update_weights_bucket_megabytes to a positive number")
        self.module = module
        self.inference_module = inference_module
        self.bucket_bytes = int(bucket_bytes)
        self.offload_param = bool(offload_param)
        self.offload_rollout = bool(offload_rollout)
        self.device_mesh = device_mesh
        self.last_buckets: list[tuple[int, int]] = []  # (tensors, bytes) of each bucket of the last sync
        self._actor_was_training = True
        self._rollout_offloaded = False

    # ------------------------------------------------------------------------------------------ context -------
    def __enter__(self) -> "FSDPHFShardingManager":
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

        if self._rollout_offloaded:
            self.inference_module.to(get_device())
            self._rollout_offloaded = False
        if self.offload_param:
            load_fsdp_model_to_gpu(self.module)
        stats = self.sync_weights()
        if self.offload_param:
            offload_fsdp_model_to_cpu(self.module, empty_cache=False)
        device.synchronize()
        device.empty_cache()
        self.inference_module.eval()

        elapsed = time.perf_counter() - start
        if on_gpu:
            peak = device.max_memory_allocated()
        else:
            peak = max(stats["peak_rss"], _rss_bytes() or 0)
        self._record_weight_sync(elapsed, stats, peak, mem_start)
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if self.offload_rollout and is_cuda_available() and not self._rollout_offloaded:
            self.inference_module.to("cpu")
            self._rollout_offloaded = True
        self.module.train(self._actor_was_training)
        get_torch_device().empty_cache()
        return None

    # ------------------------------------------------------------------------------------------- weights ------
    def _rollout_dtype(self) -> torch.dtype | None:
        dtypes = {p.dtype for p in self.inference_module.parameters() if p.is_floating_point()}
        return dtypes.pop() if len(dtypes) == 1 else None

    @torch.no_grad()
    def sync_weights(self) -> dict[str, int]:
        """Gather the actor's full weights bucket by bucket and copy them into the rollout model.

        Every rank iterates to the end (the gathers are collectives) before any mismatch is raised. Returns the
        bytes moved, the number of buckets, the largest bucket and the peak RSS seen (CPU).
        """
        from verl.utils.fsdp_utils import iter_full_params_in_buckets

        stats = {"bytes": 0, "buckets": 0, "max_bucket": 0, "peak_rss": 0}
        self.last_buckets = []
        if self.module is self.inference_module:
            return stats
        targets: dict[str, torch.Tensor] = dict(self.inference_module.named_parameters(remove_duplicate=False))
        targets.update(dict(self.inference_module.named_buffers(remove_duplicate=False)))
        written: set[int] = set()
        unexpected: list[str] = []
        mismatched: list[tuple[str, tuple, tuple]] = []
        for bucket in iter_full_params_in_buckets(self.module,
                                                  bucket_bytes=self.bucket_bytes,
                                                  dtype=self._rollout_dtype(),
                                                  skip_tied=True):
            size = 0
            for name, tensor in bucket:
                size += tensor.numel() * tensor.element_size()
                key = _clean_name(name)
                target = targets.get(key)
                if target is None:
                    unexpected.append(key)
                    continue
                if tuple(target.shape) != tuple(tensor.shape):
                    mismatched.append((key, tuple(tensor.shape), tuple(target.shape)))
                    continue
                target.data.copy_(tensor, non_blocking=True)
                written.add(id(target))
            stats["buckets"] += 1
            stats["bytes"] += size
            stats["max_bucket"] = max(stats["max_bucket"], size)
            self.last_buckets.append((len(bucket), size))
            rss = _rss_bytes()
            if rss is not None:
                stats["peak_rss"] = max(stats["peak_rss"], rss)
            del bucket
        missing = [name for name, p in self.inference_module.named_parameters() if id(p) not in written]
        if unexpected or mismatched or missing:
            raise ValueError(
                "cannot load the actor's weights into the rollout model: "
                f"names the rollout model lacks {unexpected[:10]}, shape mismatches (name, actor, rollout) "
                f"{mismatched[:10]}, rollout parameters the actor does not provide {missing[:10]}. The rollout model "
                "must be built from the same config as the actor (actor_rollout_ref.model.path)")
        return stats


class FSDPWeightSource:
    """The actor side of an engine sharding manager fed by an FSDP actor (vLLM, SGLang): full parameters gathered
    in buckets with clean Hugging Face checkpoint names, and the FSDP parameter offload around the sync. Subclasses set
    ``module``, ``offload_param`` and ``bucket_bytes``, and say which dtype the engine wants (``_engine_dtype``)."""

    module: Any
    offload_param: bool
    bucket_bytes: int

    def _engine_dtype(self) -> Any:
        return None

    def _weight_buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The actor's full weights in the engines' (checkpoint) naming: the HF module's in-memory state is converted
        by :func:`verl.models.moe_names.checkpoint_name_converter` (transformers 5 fuses some MoE models' experts in
        memory, while vLLM's and SGLang's loaders take one tensor per expert; the identity for dense models). A fused
        tensor becomes per-expert views of itself, so a bucket holds no more bytes than it was gathered with."""
        from verl.models.moe_names import checkpoint_name_converter
        from verl.utils.fsdp_utils import iter_full_params_in_buckets

        convert = checkpoint_name_converter(self.module)
        for bucket in iter_full_params_in_buckets(self.module,
                                                  bucket_bytes=self.bucket_bytes,
                                                  dtype=self._engine_dtype()):
            yield [named for name, tensor in bucket for named in convert(_clean_name(name), tensor)]
            del bucket

    def _load_actor(self) -> None:
        if self.offload_param:
            from verl.utils.fsdp_utils import load_fsdp_model_to_gpu

            load_fsdp_model_to_gpu(self.module)

    def _offload_actor(self) -> None:
        if self.offload_param:
            from verl.utils.fsdp_utils import offload_fsdp_model_to_cpu

            offload_fsdp_model_to_cpu(self.module, empty_cache=False)
