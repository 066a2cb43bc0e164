"""Checkpoints of the Megatron backend: megatron-core dist checkpointing of the model chunks and the (distributed)
optimizer, plus per-rank extra state and an optional Hugging Face export.

Layout of ``local_path`` (e.g. ``<default_local_dir>/global_step_N/actor``), published atomically like the FSDP
manager's::

    dist_ckpt/                      megatron.core.dist_checkpointing (model "model<i>" per virtual chunk, "optimizer")
    extra_state_rank_<r>.pt         lr scheduler, Python / numpy / torch RNG and megatron's RNG tracker states
    huggingface/                    config, tokenizer and (with ``hf_model`` in save_contents) model.safetensors
    megatron_checkpoint.json        sizes and contents

The model part of a dist checkpoint is sharding-agnostic: it loads with other TP / PP / DP sizes (megatron re-shards
on load). The distributed optimizer is saved in megatron's ``dp_reshardable`` format, the one of megatron-core 0.16
that loads into a torch Adam here: it re-shards over data-parallel ranks only, so resuming the optimizer needs the
tensor / pipeline sizes of the save (checked, with an error that says how to resume the weights alone).

The optimizer's step counter is kept here, next to megatron's state: the ``dp_reshardable`` format treats torch
Adam's per-parameter ``step`` as a local, non-persistent object, so on load it would keep whatever the live optimizer
had (0 in a fresh process), and Adam's bias correction would restart. It is saved as ``optimizer_step`` in the dist
checkpoint's common state and put back after megatron loads the rest, so a resumed run replays the next update exactly.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from verl.utils.checkpoint.checkpoint_manager import BaseCheckpointManager, _barrier

__all__ = ["MegatronCheckpointManager"]

DIST_SUBDIR = "dist_ckpt"
HF_SUBDIR = "huggingface"
META_FILE = "megatron_checkpoint.json"


def _extra_name(rank: int) -> str:
    return f"extra_state_rank_{rank}.pt"


def _inner_optimizers(optimizer: Any) -> list:
    """The torch optimizers behind a megatron optimizer (one per chained optimizer)."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(opt, "optimizer", opt) for opt in chained]


def _optimizer_step(optimizer: Any) -> Optional[int]:
    """Updates taken so far: torch Adam keeps them per parameter state, TE / Apex FusedAdam per param group."""
    steps = [float(state["step"]) for inner in _inner_optimizers(optimizer) for state in inner.state.values()]
    steps += [float(g["step"]) for inner in _inner_optimizers(optimizer) for g in inner.param_groups if "step" in g]
    return int(max(steps)) if steps else None


def _set_optimizer_step(optimizer: Any, step: int) -> None:
    """Set the step counter of every parameter state, each to a tensor of its own: megatron's loader hands all states
    one shared tensor, which torch Adam would then advance once per parameter on every update."""
    for inner in _inner_optimizers(optimizer):
        for state in inner.state.values():
            if "step" in state:
                old = state["step"]
                state["step"] = torch.full_like(old, step) if torch.is_tensor(old) else step
        for group in inner.param_groups:
            if "step" in group:
                group["step"] = step


def _allocate_adam_state(optimizer: Any) -> None:
    """Give a fresh torch Adam(W) its (zero) state. Megatron's distributed optimizer reads the step counter from the
    live state while it describes what to load, and fails on an optimizer that has not stepped yet (a new process
    resuming); allocating zeros here, instead of a dummy update, leaves the parameters untouched."""
    for inner in _inner_optimizers(optimizer):
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW) or len(inner.state) > 0:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }


class MegatronCheckpointManager(BaseCheckpointManager):
    """Save / load this rank's megatron chunks, optimizer and scheduler (every rank calls both).

    Args:
        model: the model chunks (list, DDP-wrapped or plain).
        optimizer: megatron's optimizer (or None).
        lr_scheduler: :class:`verl.utils.megatron_utils.MegatronLRScheduler` (or None).
        processing_class: tokenizer saved with the HF assets.
        checkpoint_config: ``*.checkpoint`` (``save_contents`` / ``load_contents``).
        converter / hf_config: for the ``hf_model`` export (HF names and config).
    """

    def __init__(self,
                 model: list,
                 optimizer: Any = None,
                 lr_scheduler: Any = None,
                 processing_class: Any = None,
                 checkpoint_config: Any = None,
                 converter: Any = None,
                 hf_config: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(list(model), optimizer, lr_scheduler, processing_class, checkpoint_config, **kwargs)
        self.converter = converter
        self.hf_config = hf_config

    # -------------------------------------------------------------------------------------- state dicts -----
    def _sharded_state_dict(self, with_model: bool, with_optimizer: bool, is_loading: bool) -> dict:
        from verl.utils.megatron_utils import unwrap_model

        model_sd = {f"model{i}": unwrap_model(chunk).sharded_state_dict() for i, chunk in enumerate(self.model)}
        out = dict(model_sd) if with_model else {}
        if with_optimizer and self.optimizer is not None:
            if is_loading:
                _allocate_adam_state(self.optimizer)
            out["optimizer"] = self.optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})
            if not is_loading:
                out["optimizer_step"] = _optimizer_step(self.optimizer)  # common state (see the module docstring)
        return out

    def _extra_state(self) -> dict:
        from megatron.core import tensor_parallel

        state = {"rng": self.get_rng_state(), "mcore_rng_tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        return state

    # ------------------------------------------------------------------------------------------------ save -----
    def save_checkpoint(self,
                        local_path: str,
                        hdfs_path: Optional[str] = None,
                        global_step: int = 0,
                        max_ckpt_to_keep: Optional[int] = None) -> None:
        """Write the checkpoint to ``local_path`` and keep the newest ``max_ckpt_to_keep``."""
        from megatron.core import dist_checkpointing

        from verl.utils.megatron_cpu import device_scope

        if local_path is None:
            raise ValueError("save_checkpoint needs local_path (e.g. <trainer.default_local_dir>/global_step_N/actor)")
        if hdfs_path is not None:
            raise NotImplementedError("hdfs_path is not supported by the Megatron checkpoint manager; mount the "
                                      "remote directory and use trainer.default_local_dir")
        if self.should_save_optimizer and self.optimizer is None:
            raise ValueError("checkpoint.save_contents includes 'optimizer' but this role has no optimizer; remove it")
        local_path = os.path.abspath(os.path.expanduser(local_path))
        tmp = self._make_tmp_dir(local_path)
        with device_scope():
            if self.should_save_model or self.should_save_optimizer:
                sharded = self._sharded_state_dict(self.should_save_model, self.should_save_optimizer, False)
                ckpt_dir = os.path.join(tmp, DIST_SUBDIR)
                if self.rank == 0:
                    os.makedirs(ckpt_dir, exist_ok=True)
                _barrier()
                os.makedirs(ckpt_dir, exist_ok=True)
                dist_checkpointing.save(sharded, ckpt_dir)
            if self.should_save_extra:
                torch.save(self._extra_state(), os.path.join(tmp, _extra_name(self.rank)))
            hf_state = self._gather_hf_state() if self.should_save_hf_model else None
        if self.rank == 0:
            hf_dir = os.path.join(tmp, HF_SUBDIR)
            os.makedirs(hf_dir, exist_ok=True)
            if self.hf_config is not None:
                self.hf_config.save_pretrained(hf_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(hf_dir)
            if hf_state is not None:
                from safetensors.torch import save_file

                save_file({
                    k: v.detach().cpu().contiguous() for k, v in hf_state.items()
                },
                          os.path.join(hf_dir, "model.safetensors"),
                          metadata={"format": "pt"})
            meta = {
                "format": "verl-megatron",
                "global_step": int(global_step),
                "world_size": self.world_size,
                "contents": list(self.checkpoint_save_contents),
            }
            if self.converter is not None:
                lay = self.converter.layout
                meta.update(tensor_model_parallel_size=lay.tp_size,
                            pipeline_model_parallel_size=lay.pp_size,
                            virtual_pipeline_model_parallel_size=lay.vpp_size,
                            expert_model_parallel_size=lay.ep_size)
            with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
        _barrier()
        self._publish(tmp, local_path)
        self._prune(local_path, max_ckpt_to_keep)

    def _gather_hf_state(self) -> Optional[dict[str, torch.Tensor]]:
        """The full HF state dict on rank 0 (None elsewhere), gathered with the hybrid engine's generator."""
        if self.converter is None:
            raise ValueError("checkpoint.save_contents has 'hf_model' but the manager has no weight converter")
        from verl.workers.sharding_manager.megatron_hf import MegatronHFShardingManager

        gen = MegatronHFShardingManager(self.model, self.converter, load_weights_fn=lambda bucket: None)
        state = {}
        for name, tensor in gen.iter_hf_weights():
            if self.rank == 0:
                state[name] = tensor.detach().cpu()
        return state if self.rank == 0 else None

    # ------------------------------------------------------------------------------------------------ load -----
    def _check_optimizer_layout(self, local_path: str) -> None:
        """The optimizer state loads only into the tensor / pipeline layout that saved it (see the module docstring);
        say so plainly instead of megatron's shape-mismatch error deep in the loader."""
        meta_path = os.path.join(local_path, META_FILE)
        if self.converter is None or not os.path.isfile(meta_path):
            return
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        lay = self.converter.layout
        keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size")
        saved = tuple(meta.get(k) for k in keys) + (meta.get("expert_model_parallel_size", 1),)
        if saved[0] is None or saved == (lay.tp_size, lay.pp_size, lay.vpp_size, lay.ep_size):
            return
        raise ValueError(
            f"checkpoint {local_path!r} was written with (tensor, pipeline, virtual pipeline, expert) parallel sizes "
            f"{saved}, this run has {(lay.tp_size, lay.pp_size, lay.vpp_size, lay.ep_size)}: the distributed "
            "optimizer's state loads only "
            "with the sizes of the save (the data-parallel size may differ). Resume with those sizes, or resume the "
            "weights alone with a fresh optimizer: checkpoint.load_contents=[model] for this role "
            "(actor_rollout_ref.actor.checkpoint.load_contents / critic.checkpoint.load_contents)")

    def load_checkpoint(self,
                        local_path: Optional[str],
                        hdfs_path: Optional[str] = None,
                        del_local_after_load: bool = False) -> None:
        """Restore what ``load_contents`` names from ``local_path`` (None: nothing)."""
        from megatron.core import dist_checkpointing, tensor_parallel

        from verl.utils.megatron_cpu import device_scope
        from verl.utils.megatron_utils import unwrap_model

        if local_path is None:
            return
        local_path = os.path.abspath(os.path.expanduser(local_path))
        if not os.path.isdir(local_path):
            raise FileNotFoundError(f"checkpoint directory {local_path!r} does not exist")
        with device_scope():
            if self.should_load_model or self.should_load_optimizer:
                ckpt_dir = os.path.join(local_path, DIST_SUBDIR)
                if not os.path.isdir(ckpt_dir):
                    raise FileNotFoundError(f"{ckpt_dir!r} is missing: {local_path!r} is not a Megatron checkpoint of "
                                            "this backend (strategy=megatron)")
                with_optim = self.should_load_optimizer and self.optimizer is not None
                if with_optim:
                    self._check_optimizer_layout(local_path)
                sharded = self._sharded_state_dict(True, with_optim, True)
                state = dist_checkpointing.load(sharded, ckpt_dir)
                if self.should_load_model:
                    for i, chunk in enumerate(self.model):
                        unwrap_model(chunk).load_state_dict(state[f"model{i}"], strict=False)
                if with_optim:
                    with torch.no_grad():  # fp32 main params are views of the model's (grad-requiring) params
                        self.optimizer.load_state_dict(state["optimizer"])
                    step = state.get("optimizer_step")  # absent in checkpoints written before it was kept
                    _set_optimizer_step(self.optimizer, _optimizer_step(self.optimizer) if step is None else step)
            if self.should_load_extra:
                path = os.path.join(local_path, _extra_name(self.rank))
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path!r} is missing: the checkpoint was written by another world size; "
                                            "drop 'extra' from checkpoint.load_contents to resume without it")
                extra = torch.load(path, map_location="cpu", weights_only=False)
                self.load_rng_state(extra["rng"])
                tensor_parallel.get_cuda_rng_tracker().set_states(extra["mcore_rng_tracker"])
                if self.lr_scheduler is not None and "lr_scheduler" in extra:
                    self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        _barrier()
        if del_local_after_load and self.rank == 0:
            import shutil

            shutil.rmtree(local_path, ignore_errors=True)
        if dist.is_initialized():
            _barrier()
