"""FSDP2 (``torch.distributed.fsdp.fully_shard``) helpers for the actor, critic and reference models.

What a worker needs from this module, in order of use:

1. :func:`create_device_mesh` -> a 1-D ``("fsdp",)`` mesh (full shard) or a 2-D ``("ddp", "fsdp")`` mesh (HSDP:
   shard inside groups of ``fsdp_size`` ranks, replicate across groups).
2. :func:`get_init_weight_context_manager` -> rank 0 builds real weights, the others build on the meta device.
3. :func:`apply_fsdp2` -> ``fully_shard`` each decoder layer, then the root, with a :class:`MixedPrecisionPolicy`
   (:func:`get_mixed_precision_policy`: bf16 compute / fp32 gradient reduction on CUDA, fp32 on CPU) and optional
   CPU offload (:func:`get_offload_policy`).
4. :func:`fsdp2_load_full_state_dict` -> broadcast rank 0's full weights into the shards (and its buffers).
5. training: :func:`clip_grad_norm_` (DTensor aware, returns the global norm, inf/nan when the gradients are).
6. hybrid engine / checkpoints: :func:`iter_full_params_in_buckets` / :func:`get_full_state_dict` gather full
   tensors parameter by parameter in bounded-size buckets; :func:`offload_fsdp_model_to_cpu`,
   :func:`load_fsdp_model_to_gpu`, :func:`offload_fsdp_optimizer`, :func:`load_fsdp_optimizer` move state between
   host and accelerator (no-ops on CPU).

Device and backend choices come from :mod:`verl.utils.device` only.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from verl.utils.device import get_device_name, get_torch_device, is_cuda_available

try:  # public since torch 2.6
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
except ImportError:  # torch 2.4 / 2.5
    from torch.distributed._composable.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy,
                                                    fully_shard)
try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor

__all__ = [
    "to_torch_dtype",
    "create_device_mesh",
    "get_init_weight_context_manager",
    "get_mixed_precision_policy",
    "get_offload_policy",
    "get_fsdp_wrap_module_names",
    "apply_fsdp2",
    "fsdp_version",
    "uses_cpu_offload_policy",
    "fsdp2_load_full_state_dict",
    "iter_full_params_in_buckets",
    "get_full_state_dict",
    "offload_fsdp_model_to_cpu",
    "load_fsdp_model_to_gpu",
    "offload_fsdp_optimizer",
    "load_fsdp_optimizer",
    "clip_grad_norm_",
    "fsdp2_clip_grad_norm_",
    "enable_gradient_checkpointing",
    "apply_liger_kernel",
]

_DTYPE_ALIASES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "32": torch.float32,
}


def to_torch_dtype(dtype: str | torch.dtype | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``"fp32"``/... or a ``torch.dtype`` -> ``torch.dtype`` (``default`` for None)."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_ALIASES)} (e.g. "
                         "fsdp_config.mixed_precision.param_dtype=bf16)")
    return _DTYPE_ALIASES[key]


# ------------------------------------------------------------------------------------------------------ mesh -----
def create_device_mesh(world_size: int, fsdp_size: int = -1):
    """Device mesh for FSDP2: ``fsdp_size`` -1 (or >= world size) shards over all ranks (1-D mesh ``("fsdp",)``);
    otherwise a 2-D HSDP mesh ``("ddp", "fsdp")`` of shape ``(world_size // fsdp_size, fsdp_size)``."""
    from torch.distributed.device_mesh import init_device_mesh

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    device = get_device_name()
    if fsdp_size is None or fsdp_size < 0 or fsdp_size >= world_size:
        return init_device_mesh(device, mesh_shape=(world_size,), mesh_dim_names=("fsdp",))
    if fsdp_size == 0 or world_size % fsdp_size != 0:
        raise ValueError(f"fsdp_config.fsdp_size={fsdp_size} must divide the world size {world_size} (or be -1 for "
                         "full sharding)")
    return init_device_mesh(device, mesh_shape=(world_size // fsdp_size, fsdp_size), mesh_dim_names=("ddp", "fsdp"))


def get_init_weight_context_manager(use_meta_tensor: bool = True, rank: int | None = None):
    """Context for building the HF model: real weights on rank 0, meta tensors (no memory) on other ranks, which
    later receive rank 0's weights through :func:`fsdp2_load_full_state_dict`."""
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if use_meta_tensor and rank != 0:
        return torch.device("meta")
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------- policies -----
def get_mixed_precision_policy(param_dtype: str | torch.dtype | None = None,
                               reduce_dtype: str | torch.dtype | None = None,
                               output_dtype: str | torch.dtype | None = None,
                               cast_forward_inputs: bool = True) -> MixedPrecisionPolicy:
    """Mixed precision for FSDP2: compute in ``param_dtype`` (default bf16 on CUDA, fp32 on CPU, where bf16 matmuls
    are slow and inexact), reduce gradients in ``reduce_dtype`` (default fp32). Sharded master weights stay fp32."""
    default_param = torch.bfloat16 if is_cuda_available() else torch.float32
    return MixedPrecisionPolicy(param_dtype=to_torch_dtype(param_dtype, default_param),
                                reduce_dtype=to_torch_dtype(reduce_dtype, torch.float32),
                                output_dtype=to_torch_dtype(output_dtype, None),
                                cast_forward_inputs=cast_forward_inputs)


def get_offload_policy(offload: bool) -> OffloadPolicy:
    """FSDP2 CPU offload (sharded params, grads and optimizer step on the host) when ``offload`` and on an
    accelerator; on CPU there is nothing to offload to."""
    if offload and is_cuda_available():
        return CPUOffloadPolicy(pin_memory=True)
    return OffloadPolicy()


def get_fsdp_wrap_module_names(model: nn.Module, extra: Iterable[str] | None = None) -> set[str]:
    """Class names to shard as their own FSDP unit: the model's ``_no_split_modules`` (HF decoder layers) plus
    ``extra`` (``fsdp_config.wrap_policy.transformer_layer_cls_to_wrap``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if extra:
        names.update([extra] if isinstance(extra, str) else extra)
    return names


def apply_fsdp2(model: nn.Module,
                mesh: Any = None,
                mp_policy: MixedPrecisionPolicy | None = None,
                offload_policy: OffloadPolicy | None = None,
                reshard_after_forward: bool = True,
                wrap_module_names: Iterable[str] | None = None) -> nn.Module:
    """Shard ``model`` in place with FSDP2: every module whose class is in ``wrap_module_names`` (default: the
    decoder layers, :func:`get_fsdp_wrap_module_names`), then the root (embeddings, final norm, heads).

    With a 2-D ``("ddp", "fsdp")`` mesh this is HSDP. Returns the same module, now an ``FSDPModule``.
    """
    names = set(wrap_module_names) if wrap_module_names is not None else get_fsdp_wrap_module_names(model)
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    kwargs["mp_policy"] = mp_policy if mp_policy is not None else get_mixed_precision_policy()
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    units = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if names and not units:
        raise ValueError(f"none of the FSDP wrap classes {sorted(names)} occur in {type(model).__name__}; set "
                         "fsdp_config.wrap_policy.transformer_layer_cls_to_wrap to the model's decoder-layer class")
    for module in units:
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def uses_cpu_offload_policy(model: nn.Module) -> bool:
    """True when some FSDP2 unit of ``model`` keeps its shards in host memory (``CPUOffloadPolicy``)."""
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch < 2.11: one group per unit
            groups = [getattr(state, "_fsdp_param_group", None)]
        for group in groups:
            if group is not None and isinstance(getattr(group, "offload_policy", None), CPUOffloadPolicy):
                return True
    return False


def fsdp_version(model: nn.Module) -> int:
    """2 for an FSDP2 module, 1 for FSDP1, 0 for an unsharded module."""
    if isinstance(model, FSDPModule):
        return 2
    from torch.distributed.fsdp import FullyShardedDataParallel

    return 1 if isinstance(model, FullyShardedDataParallel) else 0


# ------------------------------------------------------------------------------------------- state dicts ---------
def _accelerator_device() -> torch.device:
    if is_cuda_available():
        return torch.device(get_device_name(), get_torch_device().current_device())
    return torch.device("cpu")


def _distribute_like(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's shard of ``full`` (present on every rank) in the layout of ``like``, without communication."""
    from torch.distributed.tensor import distribute_tensor

    try:
        dtensor = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    except TypeError:  # torch < 2.6 has no src_data_rank; its scatter from the first rank sends identical data
        dtensor = distribute_tensor(full, like.device_mesh, like.placements)
    return dtensor.to_local()


@torch.no_grad()
def fsdp2_load_full_state_dict(model: nn.Module,
                               full_state: dict[str, torch.Tensor] | None,
                               device_mesh: Any = None,
                               cpu_offload: bool = False) -> None:
    """Fill an FSDP2 model's shards from a full state dict held by rank 0 (other ranks pass ``None`` or ``{}``).

    The model may have been built on the meta device on ranks > 0: it is materialised first. Each tensor is
    broadcast from rank 0 on the accelerator (one full tensor in flight at a time) and every rank copies its own
    shard into place, wherever FSDP keeps it (also host memory under ``CPUOffloadPolicy``). Buffers, including
    non-persistent ones such as rotary ``inv_freq`` that no state dict carries, are broadcast too; tied weights
    missing from ``full_state`` are filled through the tensor they share. ``cpu_offload`` moves the parameters to
    host memory afterwards (:func:`offload_fsdp_model_to_cpu`, for ``param_offload``); it changes nothing for a
    ``CPUOffloadPolicy`` module, whose shards are already there and whose buffers must stay on the accelerator.
    ``device_mesh`` is unused (each parameter knows its mesh) and kept for call compatibility.
    """
    del device_mesh
    device = _accelerator_device()
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        # shards of a CPUOffloadPolicy module must be created in host memory; buffers always live on the device
        model.to_empty(device="cpu" if uses_cpu_offload_policy(model) else device)
        for module in model.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf.device != device and not isinstance(buf, DTensor):
                    module._buffers[name] = buf.to(device)
    if not dist.is_initialized():
        if not full_state:
            raise ValueError("fsdp2_load_full_state_dict: pass the full state dict")
        model.load_state_dict(full_state)
        return
    rank = dist.get_rank()
    local_state = model.state_dict()
    problems = None
    if rank == 0 and full_state:
        problems = {
            "missing": [k for k in local_state if k not in full_state],
            "unexpected": [k for k in full_state if k not in local_state],
            "shape": [(k, tuple(full_state[k].shape), tuple(v.shape))
                      for k, v in local_state.items()
                      if k in full_state and tuple(full_state[k].shape) != tuple(v.shape)],
        }
    box = [problems]
    dist.broadcast_object_list(box, src=0)  # every rank takes the same decisions below
    problems = box[0]
    if problems is None:  # raised on every rank, so that none waits in a collective
        raise ValueError("fsdp2_load_full_state_dict: rank 0 must pass the full state dict")
    # tied weights (one Parameter under several names) need to arrive under one of their names only
    owner = {name: id(t) for name, t in model.named_parameters(remove_duplicate=False)}
    owner.update({name: id(t) for name, t in model.named_buffers(remove_duplicate=False)})
    loaded = {owner.get(k, k) for k in local_state if k not in problems["missing"]}
    untied_missing = [k for k in problems["missing"] if owner.get(k, k) not in loaded]
    if untied_missing or problems["unexpected"] or problems["shape"]:
        raise ValueError(f"the full state dict does not fit the model: missing {untied_missing}, unexpected "
                         f"{problems['unexpected']}, shape mismatches (key, given, expected) {problems['shape']}; "
                         "load the checkpoint that matches the model config")
    for key, value in local_state.items():
        if key in problems["missing"]:
            continue  # tied to a tensor loaded under another name
        if rank == 0:
            buf = full_state[key].detach().to(device=device, dtype=value.dtype).contiguous()
        else:
            buf = torch.empty(value.shape, dtype=value.dtype, device=device)
        dist.broadcast(buf, src=0)
        if isinstance(value, DTensor):
            value.to_local().copy_(_distribute_like(buf, value))
        else:
            value.copy_(buf)
        del buf
    for buf in model.buffers():
        if isinstance(buf, DTensor):
            continue
        tmp = buf.detach().to(device)
        dist.broadcast(tmp, src=0)
        buf.copy_(tmp)
    if cpu_offload and not uses_cpu_offload_policy(model):  # under the policy the shards already live on the host
        offload_fsdp_model_to_cpu(model)


def _local_on(dtensor: DTensor, device: torch.device) -> DTensor:
    """The same DTensor with its local shard moved to ``device`` (collectives need tensors on the mesh device)."""
    if dtensor.to_local().device == device:
        return dtensor
    return DTensor.from_local(dtensor.to_local().to(device),
                              dtensor.device_mesh,
                              dtensor.placements,
                              run_check=False,
                              shape=dtensor.shape,
                              stride=dtensor.stride())


def _full_tensor(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(value, DTensor):
        return _local_on(value, device).full_tensor()
    return value


def iter_full_params_in_buckets(module: nn.Module,
                                bucket_bytes: int = 512 << 20,
                                device: str | torch.device | None = None,
                                dtype: torch.dtype | None = None,
                                to_cpu: bool = False,
                                skip_tied: bool = False) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield the module's full (unsharded) state, parameter by parameter, in lists of ``(name, tensor)`` of about
    ``bucket_bytes`` each (a tensor larger than the budget is a bucket of its own).

    Every rank of the mesh must iterate to the end together: each DTensor's gathering is a collective. Peak extra
    memory is one bucket. Names are the HF names (FSDP2 keeps them). ``dtype`` casts floating tensors (e.g. bf16 for
    a rollout engine); ``to_cpu`` moves gathered tensors to host memory. ``skip_tied`` yields a parameter shared under
    several names (tied embeddings: ``lm_head.weight`` is ``model.embed_tokens.weight``) once, under its first name:
    for a target that shares it the same way (the HF rollout model), where the copy moved ~27% more bytes per sync
    for Qwen2.5-0.5B. Not for vLLM: the output layer of its CPU build did not follow a sync without ``lm_head.weight``
    (tests/workers/rollout/vllm/test_vllm_tied_embeddings.py).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    gather_device = torch.device(device) if device is not None else _accelerator_device()
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    skipped = _tied_duplicate_names(module) if skip_tied else set()
    for name, value in module.state_dict().items():
        if name in skipped:
            continue
        tensor = _full_tensor(value, gather_device).detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if to_cpu:
            tensor = tensor.cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _tied_duplicate_names(module: nn.Module) -> set[str]:
    """Names of parameters that are the same parameter as an earlier name (tied weights), decided from the module's
    structure, so every rank skips the same names (their gathers are collectives)."""
    first: dict[int, str] = {}
    duplicates: set[str] = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            duplicates.add(name)
        else:
            first[id(param)] = name
    return duplicates


def get_full_state_dict(module: nn.Module,
                        cpu_offload: bool = True,
                        rank0_only: bool = False,
                        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full state dict of an FSDP2 (or plain) module; every rank must call it. With ``rank0_only`` other ranks
    return ``{}`` (they still take part in the gathers)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, torch.Tensor] = {}
    for bucket in iter_full_params_in_buckets(module, bucket_bytes=1 << 62, dtype=dtype, to_cpu=cpu_offload):
        if not rank0_only or rank == 0:
            out.update(bucket)
    return out


# ------------------------------------------------------------------------------------------------ offload -------
def _move_module(module: nn.Module, device: torch.device | str) -> None:
    module.to(device)
    for param in module.parameters():
        if param.grad is not None:
            param.grad = param.grad.to(device)


@torch.no_grad()
def offload_fsdp_model_to_cpu(model: nn.Module, empty_cache: bool = True) -> None:
    """Move the model's sharded parameters (and gradients) to host memory. No-op on CPU."""
    if not is_cuda_available():
        return
    _move_module(model, "cpu")
    if empty_cache:
        get_torch_device().empty_cache()


@torch.no_grad()
def load_fsdp_model_to_gpu(model: nn.Module) -> None:
    """Move the model's sharded parameters (and gradients) back to the current accelerator. No-op on CPU."""
    if not is_cuda_available():
        return
    _move_module(model, _accelerator_device())


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    # 0-d entries (Adam's ``step``) stay where the optimizer created them: non-capturable Adam wants them on CPU
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                state[key] = value.to(device, non_blocking=True)


@torch.no_grad()
def offload_fsdp_optimizer(optimizer: torch.optim.Optimizer | None) -> None:
    """Move the optimizer state (Adam moments, ...) to host memory. No-op on CPU or without optimizer/state."""
    if optimizer is None or not optimizer.state or not is_cuda_available():
        return
    _move_optimizer_state(optimizer, "cpu")
    get_torch_device().synchronize()
    get_torch_device().empty_cache()


@torch.no_grad()
def load_fsdp_optimizer(optimizer: torch.optim.Optimizer | None, device_id: int | torch.device | None = None) -> None:
    """Move the optimizer state back to the accelerator. No-op on CPU or without optimizer/state."""
    if optimizer is None or not optimizer.state or not is_cuda_available():
        return
    if device_id is None:
        device_id = get_torch_device().current_device()
    device = device_id if isinstance(device_id, torch.device) else torch.device(get_device_name(), device_id)
    _move_optimizer_state(optimizer, device)
    get_torch_device().synchronize()


# ------------------------------------------------------------------------------------------ gradient norm -------
def _placement_reduce_dims(dtensor: DTensor) -> tuple[int, ...]:
    """Mesh dims over which a DTensor's local values are disjoint pieces (Shard) or partial sums (Partial)."""
    return tuple(i for i, p in enumerate(dtensor.placements) if p.is_shard() or p.is_partial())


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor] | torch.Tensor,
                    max_norm: float | None,
                    norm_type: float = 2.0) -> torch.Tensor:
    """Clip gradients to a global ``max_norm`` and return the total norm (a 0-d float32 tensor).

    Works with FSDP2 DTensor gradients (sharded or HSDP, several meshes at once) and plain tensors: each rank
    reduces its local shards, and the partial results are summed (max for the inf norm) over exactly the mesh
    dimensions the gradients are sharded on. The gradients are scaled only when the norm is finite; a non-finite
    norm is returned as is, so the caller can skip the optimizer step. ``max_norm`` None or <= 0 only measures.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    is_inf = math.isinf(norm_type)
    device = _accelerator_device()
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)

    # group local contributions by (mesh, reduce dims), so that one collective per group suffices
    groups: dict[Any, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float32, device=device))
    meshes: dict[Any, tuple[Any, tuple[int, ...]]] = {}
    for grad in grads:
        if isinstance(grad, DTensor):
            local = grad.to_local()
            dims = _placement_reduce_dims(grad)
            key = (id(grad.device_mesh), dims)
            meshes[key] = (grad.device_mesh, dims)
        else:
            local, key = grad, None
        if local.numel() == 0:
            value = torch.zeros((), dtype=torch.float32, device=device)
        elif is_inf:
            value = local.detach().abs().max().float().to(device)
        else:
            value = torch.linalg.vector_norm(local.detach().float(), ord=norm_type).pow(norm_type).to(device)
        groups[key] = torch.maximum(groups[key], value) if is_inf else groups[key] + value

    total = torch.zeros((), dtype=torch.float32, device=device)
    for key, value in groups.items():
        if key is not None:
            mesh, dims = meshes[key]
            for dim in dims:
                group = mesh.get_group(dim)
                backend_device = torch.device("cpu") if dist.get_backend(group) == "gloo" else device
                buf = value.to(backend_device)
                dist.all_reduce(buf, op=dist.ReduceOp.MAX if is_inf else dist.ReduceOp.SUM, group=group)
                value = buf.to(device)
        total = torch.maximum(total, value) if is_inf else total + value
    total_norm = total if is_inf else total.pow(1.0 / norm_type)

    if max_norm is not None and max_norm > 0 and bool(torch.isfinite(total_norm)):
        clip_coef = float(max_norm) / (float(total_norm) + 1e-6)
        if clip_coef < 1.0:
            for grad in grads:
                grad.mul_(clip_coef)
    return total_norm


fsdp2_clip_grad_norm_ = clip_grad_norm_


# ---------------------------------------------------------------------------------------- model options -------
def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (non-reentrant, which works with FSDP2 and frozen inputs).

    Uses ``activation_checkpointing_enable`` (transformers >= 5.x) when present, else
    ``gradient_checkpointing_enable``.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} supports no gradient checkpointing; set "
                         "model.enable_gradient_checkpointing=False for this model")


def apply_liger_kernel(model: nn.Module) -> None:
    """Swap in liger-kernel's fused Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy).

    Raises a clear error on CPU (liger-kernel installs there, but its Triton kernels need a GPU driver and fail at the
    first forward with "0 active drivers") and when liger-kernel is not installed.
    """
    if not is_cuda_available():
        raise RuntimeError("model.use_liger=True needs a CUDA GPU: liger-kernel's fused kernels are Triton GPU kernels "
                           "and cannot run on CPU; set actor_rollout_ref.model.use_liger=False (the plain "
                           "transformers modules compute the same)")
    try:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    except ImportError as exc:
        raise ImportError("model.use_liger=True needs the liger-kernel package (pip install liger-kernel, CUDA only); "
                          "install it or set actor_rollout_ref.model.use_liger=False") from exc
    _apply_liger_kernel_to_instance(model=model)
