"""Checkpoints of an FSDP2 (or unsharded) model: sharded weights, optimizer, lr scheduler and RNG, per rank.

Files in a checkpoint directory (``.../global_step_N/actor``), ``W`` the world size and ``R`` the rank::

    fsdp_config.json                          FSDP version, world size, device meshes, each parameter's global
                                              shape and placements, the saved contents
    model_world_size_{W}_rank_{R}.pt          {parameter name: this rank's local shard (plain CPU tensor)}
    optim_world_size_{W}_rank_{R}.pt          the optimizer state dict keyed by parameter name, local shards
    extra_state_world_size_{W}_rank_{R}.pt    {"lr_scheduler": ..., "rng": python/numpy/torch/device states}
    huggingface/                              config.json (+ generation config) and tokenizer files, always;
                                              full-weight safetensors too with the ``hf_model`` content

Why plain local tensors rather than pickled DTensors or torch.distributed.checkpoint (DCP) files: the files then
load with ``torch.load(weights_only=True)`` in any process, with or without a process group, so the merger
(``python -m verl.model_merger``) can rebuild full tensors from the shapes and placements in ``fsdp_config.json``
alone. The state dicts are taken and restored through ``torch.distributed.checkpoint.state_dict`` (sharded
options), which normalises parameter names and optimizer-state keys. Loading requires the world size (and device
mesh) of the save; to change it, merge to a Hugging Face directory and start from that.

A checkpoint is written into ``<local_path>.tmp-<id>`` and renamed to ``local_path`` only after every rank has
written all of its files; a failure on any rank is reported on every rank (:class:`CheckpointSaveError`) and
nothing is published.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import warnings
from typing import Any, Optional

import torch

from verl.utils.checkpoint.checkpoint_manager import (BaseCheckpointManager, CheckpointSaveError, _all_gather_objects,
                                                      _barrier, _raise_if_any_failed, _replace_dir)

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor

__all__ = [
    "FSDPCheckpointManager",
    "FSDP_CONFIG_FILE",
    "HF_SUBDIR",
    "model_shard_filename",
    "optim_shard_filename",
    "extra_state_filename",
    "placement_to_str",
]

FSDP_CONFIG_FILE = "fsdp_config.json"
HF_SUBDIR = "huggingface"
FORMAT_NAME = "verl-local-shards"
FORMAT_VERSION = 1
_DTENSOR_ENTRIES_KEY = "__verl_dtensor_entries__"


def model_shard_filename(world_size: int, rank: int) -> str:
    return f"model_world_size_{world_size}_rank_{rank}.pt"


def optim_shard_filename(world_size: int, rank: int) -> str:
    return f"optim_world_size_{world_size}_rank_{rank}.pt"


def extra_state_filename(world_size: int, rank: int) -> str:
    return f"extra_state_world_size_{world_size}_rank_{rank}.pt"


def placement_to_str(placement: Any) -> str:
    """``Shard(d)`` -> ``"S(d)"``, ``Replicate()`` -> ``"R"``; anything else (partial sums, strided shards of
    FSDP+TP) has no portable meaning in a checkpoint and is refused."""
    name = type(placement).__name__
    if name == "Shard":
        return f"S({placement.dim})"
    if name == "Replicate":
        return "R"
    raise ValueError(f"cannot checkpoint a DTensor with placement {placement!r}; only Shard and Replicate "
                     "(FSDP2 / HSDP) are supported")


def _local_cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A compact CPU copy (a view would make torch.save write the whole padded FSDP buffer)."""
    tensor = tensor.detach()
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    out.copy_(tensor)
    return out


def _unwrapped_class_name(model: torch.nn.Module) -> str:
    """The model's own class name, skipping the ``FSDP<Name>`` class that ``fully_shard`` inserts."""
    for cls in type(model).__mro__:
        if not cls.__module__.startswith("torch.distributed"):
            return cls.__name__
    return type(model).__name__


def _torch_load(path: str) -> Any:
    """Load our own files with ``weights_only``; fall back to full unpickling for checkpoints written by other
    verl versions (pickled DTensors)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False)


def _as_local(value: Any) -> Any:
    return value.to_local() if isinstance(value, DTensor) else value


class FSDPCheckpointManager(BaseCheckpointManager):
    """Save and restore an FSDP2-sharded model with its optimizer, lr scheduler and RNG state.

    Args:
        model: the FSDP2 module (``fully_shard``; a plain module works with world size 1 or replicated weights).
        optimizer, lr_scheduler: saved with the ``optimizer`` / ``extra`` contents (may be None if not saved).
        processing_class: tokenizer or processor saved into ``huggingface/`` (``tokenizer=`` is accepted too).
        checkpoint_config: ``save_contents`` / ``load_contents`` (see :class:`BaseCheckpointManager`).
    """

    def __init__(self,
                 model: torch.nn.Module,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 lr_scheduler: Any = None,
                 processing_class: Any = None,
                 checkpoint_config: Any = None,
                 checkpoint_contents: Optional[list[str]] = None,
                 **kwargs: Any) -> None:
        if processing_class is None and "tokenizer" in kwargs:
            processing_class = kwargs.pop("tokenizer")
        if kwargs:
            raise TypeError(f"FSDPCheckpointManager got unexpected arguments {sorted(kwargs)}")
        super().__init__(model,
                         optimizer,
                         lr_scheduler,
                         processing_class,
                         checkpoint_config=checkpoint_config,
                         checkpoint_contents=checkpoint_contents)

    # ------------------------------------------------------------------------------------------------ state ------
    def _sharded_model_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=False))

    def _sharding_metadata(self, model_state: dict[str, Any]) -> dict[str, Any]:
        meshes: list[dict[str, Any]] = []
        params: dict[str, Any] = {}
        for name, value in model_state.items():
            if not isinstance(value, DTensor):
                params[name] = {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
                continue
            mesh = {"ranks": value.device_mesh.mesh.tolist(), "dim_names": list(value.device_mesh.mesh_dim_names or [])}
            if mesh not in meshes:
                meshes.append(mesh)
            params[name] = {
                "shape": list(value.shape),
                "dtype": str(value.dtype).replace("torch.", ""),
                "mesh": meshes.index(mesh),
                "placements": [placement_to_str(p) for p in value.placements],
            }
        return {"meshes": meshes, "params": params}

    def _local_optimizer_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=False))
        entries = []
        state = {}
        for fqn, param_state in osd["state"].items():
            local = {}
            for key, value in param_state.items():
                if isinstance(value, DTensor):
                    entries.append([fqn, key])
                    local[key] = _local_cpu_copy(value.to_local())
                elif isinstance(value, torch.Tensor):
                    local[key] = _local_cpu_copy(value)
                else:
                    local[key] = value
            state[fqn] = local
        return {"state": state, "param_groups": copy.deepcopy(osd["param_groups"]), _DTENSOR_ENTRIES_KEY: entries}

    def _extra_state(self) -> dict[str, Any]:
        return {
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "rng": self.get_rng_state(),
        }

    def _hf_config(self) -> Any:
        config = getattr(self.model, "config", None)
        if config is None or not hasattr(config, "save_pretrained"):
            return None
        config = copy.deepcopy(config)
        if not getattr(config, "architectures", None):
            config.architectures = [_unwrapped_class_name(self.model)]
        return config

    def _save_hf_assets(self, hf_dir: str) -> None:
        """Config, generation config and tokenizer: what the merger needs to rebuild a usable HF directory."""
        config = self._hf_config()
        if config is None:
            warnings.warn(
                f"{type(self.model).__name__} has no transformers config; the checkpoint has no "
                f"{HF_SUBDIR}/config.json, so the merger will need --hf_model_config_path",
                stacklevel=3)
            return
        os.makedirs(hf_dir, exist_ok=True)
        config.save_pretrained(hf_dir)
        generation_config = getattr(self.model, "generation_config", None)
        if generation_config is not None:
            try:
                generation_config.save_pretrained(hf_dir)
            except Exception as exc:  # noqa: BLE001 - an invalid generation config must not lose the checkpoint
                warnings.warn(f"generation config not saved: {exc}", stacklevel=3)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(hf_dir)

    # ------------------------------------------------------------------------------------------------- save ------
    def save_checkpoint(self,
                        local_path: str,
                        hdfs_path: Optional[str] = None,
                        global_step: int = 0,
                        max_ckpt_to_keep: Optional[int] = None) -> None:
        """Write this manager's checkpoint to ``local_path`` (every rank calls it), then keep only the newest
        ``max_ckpt_to_keep`` checkpoints. ``hdfs_path``: a second (mounted) directory to copy the result to."""
        if local_path is None:
            raise ValueError("save_checkpoint needs local_path (e.g. <trainer.default_local_dir>/global_step_N/actor)")
        if self.should_save_optimizer and self.optimizer is None:
            raise ValueError("checkpoint.save_contents includes 'optimizer' but no optimizer was given; remove it from "
                             "save_contents (e.g. for a reference model) or pass the optimizer")
        local_path = os.path.abspath(os.path.expanduser(local_path))
        rank, world = self.rank, self.world_size
        # collectives first, while every rank is sure to take part
        model_state = self._sharded_model_state() if (self.should_save_model or self.should_save_hf_model) else {}
        optim_state = self._local_optimizer_state() if self.should_save_optimizer else None

        tmp = self._make_tmp_dir(local_path)
        error: Optional[BaseException] = None
        try:
            if self.should_save_model:
                torch.save({
                    k: _local_cpu_copy(_as_local(v)) for k, v in model_state.items()
                }, os.path.join(tmp, model_shard_filename(world, rank)))
            if optim_state is not None:
                torch.save(optim_state, os.path.join(tmp, optim_shard_filename(world, rank)))
            if self.should_save_extra:
                torch.save(self._extra_state(), os.path.join(tmp, extra_state_filename(world, rank)))
            if rank == 0:
                meta = {
                    "FSDP_version": 2,
                    "world_size": world,
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "global_step": int(global_step),
                    "contents": list(self.checkpoint_save_contents),
                    **self._sharding_metadata(model_state),
                }
                with open(os.path.join(tmp, FSDP_CONFIG_FILE), "w", encoding="utf-8") as f:
                    json.dump(meta, f, indent=1)
                self._save_hf_assets(os.path.join(tmp, HF_SUBDIR))
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = exc
        self._check_all_ranks(error, tmp, local_path)

        if self.should_save_hf_model:
            self._save_hf_weights(tmp, local_path)
        del model_state, optim_state

        self._publish(tmp, local_path)
        self._prune(local_path, max_ckpt_to_keep)
        if hdfs_path is not None:
            error = None
            if rank == 0:
                try:
                    _copy_dir_to(local_path, hdfs_path)
                except Exception as exc:  # noqa: BLE001 - reported on every rank
                    error = exc
            errors = _all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
            _raise_if_any_failed(
                errors, f"copying checkpoint {local_path} to {hdfs_path} (the local checkpoint is "
                "complete)")

    def _check_all_ranks(self, error: Optional[BaseException], tmp: str, local_path: str) -> None:
        errors = _all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        if any(errors):
            self._discard_tmp(tmp)
            try:
                _raise_if_any_failed(
                    errors, f"saving checkpoint {local_path} (nothing was written there; the previous "
                    "checkpoint is intact)")
            except CheckpointSaveError as exc:
                raise exc from error

    def _save_hf_weights(self, tmp: str, local_path: str) -> None:
        """Gather the full weights (every rank) and let rank 0 write them as safetensors into ``huggingface/``."""
        from verl.utils.checkpoint.hf_checkpoint import save_hf_model_from_state_dict
        from verl.utils.fsdp_utils import get_full_state_dict

        config = self._hf_config()
        if config is None:
            raise ValueError(f"checkpoint.save_contents has 'hf_model' but {type(self.model).__name__} has no "
                             "transformers config; remove 'hf_model' from save_contents")
        full_state = get_full_state_dict(self.model, cpu_offload=True, rank0_only=True)
        error: Optional[BaseException] = None
        if self.rank == 0:
            try:
                save_hf_model_from_state_dict(full_state,
                                              config,
                                              os.path.join(tmp, HF_SUBDIR),
                                              generation_config=getattr(self.model, "generation_config", None))
            except Exception as exc:  # noqa: BLE001 - reported on every rank
                error = exc
        del full_state
        self._check_all_ranks(error, tmp, local_path)

    # ------------------------------------------------------------------------------------------------- load ------
    def load_checkpoint(self,
                        local_path: Optional[str],
                        hdfs_path: Optional[str] = None,
                        del_local_after_load: bool = False) -> None:
        """Restore what ``load_contents`` names from ``local_path`` (every rank calls it; None does nothing).

        ``hdfs_path``: a (mounted) copy to fetch first when ``local_path`` does not exist. Raises
        ``FileNotFoundError`` naming missing files and ``ValueError`` when the world size or device mesh differs
        from the one the checkpoint was saved with.
        """
        if local_path is None:
            return
        local_path = os.path.abspath(os.path.expanduser(local_path))
        if not os.path.isdir(local_path) and hdfs_path is not None:
            if self.rank == 0:
                _copy_dir_to(hdfs_path, local_path)
            _barrier()
        meta = self._read_metadata(local_path)
        rank, world = self.rank, self.world_size
        saved_world = int(meta.get("world_size", -1))
        if saved_world != world:
            raise ValueError(f"checkpoint {local_path} was saved with world size {saved_world}, but this run has world "
                             f"size {world}; resume with {saved_world} ranks, or convert it with `python -m "
                             f"verl.model_merger merge --backend fsdp --local_dir {local_path} --target_dir <dir>` and "
                             "start from that Hugging Face model")
        saved_contents = meta.get("contents")
        wanted = {
            "model": (self.should_load_model, model_shard_filename(world, rank)),
            "optimizer": (self.should_load_optimizer, optim_shard_filename(world, rank)),
            "extra": (self.should_load_extra, extra_state_filename(world, rank)),
        }
        missing = []
        for content, (wanted_now, filename) in wanted.items():
            if wanted_now and not os.path.isfile(os.path.join(local_path, filename)):
                hint = "" if saved_contents is None or content in saved_contents else \
                    f" (it was saved with save_contents={saved_contents}; drop '{content}' from load_contents)"
                missing.append(f"{filename}{hint}")
        errors = _all_gather_objects(f"missing {', '.join(missing)}" if missing else None)
        _raise_if_any_failed(errors, f"loading checkpoint {local_path}", FileNotFoundError)

        live_state = None
        if self.should_load_model or self.should_load_optimizer:
            live_state = self._sharded_model_state()
            self._check_layout(meta, live_state, local_path)
        if self.should_load_model:
            self._load_model(os.path.join(local_path, model_shard_filename(world, rank)), live_state)
        if self.should_load_optimizer:
            if self.optimizer is None:
                raise ValueError("checkpoint.load_contents includes 'optimizer' but no optimizer was given; remove it "
                                 "from load_contents or pass the optimizer")
            self._load_optimizer(os.path.join(local_path, optim_shard_filename(world, rank)), live_state)
        if self.should_load_extra:
            extra = _torch_load(os.path.join(local_path, extra_state_filename(world, rank)))
            if self.lr_scheduler is not None and extra.get("lr_scheduler") is not None:
                self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
            if extra.get("rng") is not None:
                self.load_rng_state(extra["rng"])
        _barrier()
        if del_local_after_load and self.rank == 0:
            shutil.rmtree(local_path, ignore_errors=True)
        _barrier()

    def _read_metadata(self, local_path: str) -> dict[str, Any]:
        path = os.path.join(local_path, FSDP_CONFIG_FILE)
        if not os.path.isfile(path):
            listing = sorted(os.listdir(local_path))[:10] if os.path.isdir(local_path) else None
            raise FileNotFoundError(
                f"{local_path} is not an FSDP checkpoint directory: expected {FSDP_CONFIG_FILE} and "
                f"{model_shard_filename(self.world_size, 0).replace('_rank_0', '_rank_<R>')} files" +
                (" (the directory does not exist)" if listing is None else f", found {listing}") +
                "; pass the manager's directory, e.g. <default_local_dir>/global_step_N/actor")
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def _check_layout(self, meta: dict[str, Any], live_state: dict[str, Any], local_path: str) -> None:
        """Same device mesh as at save time (the shards are only meaningful in that layout)."""
        saved_meshes = [m["ranks"] for m in meta.get("meshes", [])]
        live_meshes = []
        for value in live_state.values():
            if isinstance(value, DTensor):
                ranks = value.device_mesh.mesh.tolist()
                if ranks not in live_meshes:
                    live_meshes.append(ranks)
        if "meshes" in meta and saved_meshes != live_meshes:
            raise ValueError(f"checkpoint {local_path} was saved with device mesh(es) {saved_meshes}, this model is "
                             f"sharded over {live_meshes}; use the same fsdp_config.fsdp_size as the saving run")

    @staticmethod
    def _rebuild(saved: torch.Tensor, live: Any, name: str) -> Any:
        """The saved local shard as a tensor shaped like ``live`` (a DTensor with the same mesh and placements)."""
        saved = _as_local(saved)
        if isinstance(live, DTensor):
            live_local = live.to_local()
            if tuple(saved.shape) != tuple(live_local.shape):
                raise ValueError(f"checkpoint shard of {name!r} has shape {tuple(saved.shape)}, this rank's shard is "
                                 f"{tuple(live_local.shape)}; the model or its sharding differs from the saving run")
            return DTensor.from_local(saved.to(device=live_local.device, dtype=live_local.dtype),
                                      live.device_mesh,
                                      live.placements,
                                      run_check=False,
                                      shape=live.shape,
                                      stride=live.stride())
        if isinstance(live, torch.Tensor):
            if tuple(saved.shape) != tuple(live.shape):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(saved.shape)}, the model's is "
                                 f"{tuple(live.shape)}")
            return saved.to(device=live.device, dtype=live.dtype)
        return saved

    def _load_model(self, path: str, live_state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        saved = _torch_load(path)
        missing = sorted(set(live_state) - set(saved))
        unexpected = sorted(set(saved) - set(live_state))
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:8]}, unexpected "
                             f"{unexpected[:8]}; was it saved from a different model?")
        state = {name: self._rebuild(saved[name], live, name) for name, live in live_state.items()}
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=False, strict=True))

    def _load_optimizer(self, path: str, live_state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        saved = _torch_load(path)
        entries = saved.pop(_DTENSOR_ENTRIES_KEY, None)
        state = saved["state"]
        if entries is None:  # files with pickled DTensors: restore them on this rank's mesh too
            entries = [[fqn, key] for fqn, ps in state.items() for key, v in ps.items() if isinstance(v, DTensor)]
        for fqn, key in entries:
            if fqn not in live_state:
                raise ValueError(f"optimizer checkpoint {path} has state for {fqn!r}, which the model does not have")
            state[fqn][key] = self._rebuild(state[fqn][key], live_state[fqn], f"{fqn}/{key}")
        set_optimizer_state_dict(self.model,
                                 self.optimizer,
                                 saved,
                                 options=StateDictOptions(full_state_dict=False, strict=True))


def _copy_dir_to(src: str, dst: str) -> None:
    """Copy a checkpoint directory to a mounted path (``hdfs://`` and other remote schemes are not supported)."""
    for path in (src, dst):
        if "://" in str(path):
            raise NotImplementedError(f"remote checkpoint path {path!r} is not supported; mount the filesystem and "
                                      "pass a local path (trainer.default_hdfs_dir) or leave it null")
    dst = os.path.abspath(os.path.expanduser(dst))
    tmp = dst + ".copying"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    _replace_dir(tmp, dst)
