"""Role logic shared by the FSDP and Megatron workers (:mod:`verl.workers.fsdp_workers`,
:mod:`verl.workers.megatron_workers`).

The registered methods of a role (their dispatch modes, signatures, metrics and offload discipline) are written once
here, so that both backends answer the trainer the same way. A backend class inherits the role and supplies only its
model-specific objects through a few hooks:

=============================================  ===================================================================
hook                                           supplies
=============================================  ===================================================================
``_check_strategy(strategy, key)``             raises unless the backend runs ``strategy`` (read at ``key``)
``_phase_resident(phase)``                     context: the role's state on the device for one phase, offloaded
                                               again afterwards; actor: ``log_prob``, ``ref_log_prob`` (the
                                               reference's), ``update``, ``save``, ``load``; critic: ``forward``,
                                               ``update``, ``save``, ``load``
``_sp_context()``                              context around each model call (Ulysses sequence parallelism)
``_checkpoint_saved()``                        what follows a successful save, while the state is still resident
``_models_built()``                            whether ``init_model`` has built the actor or reference model
``_hf_sharding_manager(module, bytes, cfg)``   the hybrid engine that streams the actor's weights into an HF rollout
``_build_engine_rollout(name, rollout_cls)``   ``(rollout, sharding_manager)`` for engines other than ``hf``; by
                                               default ``build_hybrid_engine`` of the module
                                               ``verl.workers.sharding_manager.<_hybrid_engine_prefix>_<name>``
``_set_forward_meta(data)``                    the critic's forward micro-batching ``meta_info``
=============================================  ===================================================================
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import importlib
import os
import resource
import time
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from verl.protocol import DataProto
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils.device import get_device, get_device_name, get_nccl_backend, get_torch_device, is_cuda_available
from verl.utils.dp_update import cfg_get
from verl.workers.config_helpers import (detach_config, import_external_libs, load_generation_config, load_tokenizer,
                                         normalize_micro_batch, normalize_ppo_mini_batch)

__all__ = [
    "ROLES",
    "ActorRolloutRefRole",
    "CriticRole",
    "RewardModelRole",
    "current_lr",
    "init_distributed",
    "last_valid_token_index",
    "mfu",
    "peak_memory_metrics",
    "reduce_timing",
    "rm_scores_at_last_response_token",
]

#: Roles of ``ActorRolloutRefWorker``.
ROLES = ("actor", "rollout", "ref", "actor_rollout", "actor_rollout_ref")

# ----------------------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------------------


def init_distributed(timeout_s: float = 600) -> None:
    """Join the worker group's ``torch.distributed`` world (``env://``: RANK, WORLD_SIZE, MASTER_ADDR/PORT set by
    the worker group), unless this process already has one. NCCL for accelerator tensors plus gloo for CPU ones on
    CUDA; gloo alone on CPU."""
    if dist.is_initialized():
        return
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        if world_size != 1:
            raise RuntimeError("MASTER_ADDR / MASTER_PORT are not set; start the workers through a worker group "
                               "(RayWorkerGroup), which sets them for every rank")
        from verl.single_controller.base.worker import find_free_port

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_port("127.0.0.1")))
    if is_cuda_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device_count = get_torch_device().device_count()
        # Ray usually shows each actor only its own GPU (index 0); without that, LOCAL_RANK picks it
        get_torch_device().set_device(local_rank if local_rank < device_count else 0)
        backend = f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"
    else:
        backend = get_nccl_backend()
    dist.init_process_group(backend=backend,
                            rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=float(timeout_s)))


def peak_memory_metrics() -> dict[str, float]:
    """Peak accelerator memory of this process; on CPU the peak resident set size stands for 'allocated'."""
    import psutil

    gib = 1024.0**3
    metrics = {"perf/cpu_memory_used_gb": psutil.virtual_memory().used / gib}
    if is_cuda_available():
        metrics["perf/max_memory_allocated_gb"] = get_torch_device().max_memory_allocated() / gib
        metrics["perf/max_memory_reserved_gb"] = get_torch_device().max_memory_reserved() / gib
    else:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 / gib  # ru_maxrss is KiB on Linux
        metrics["perf/max_memory_allocated_gb"] = peak_rss
        metrics["perf/max_memory_reserved_gb"] = peak_rss
    return metrics


def mfu(flops_counter: Any, data: DataProto, delta_time: float, epochs: int, world_size: int) -> float:
    """Model FLOPs utilisation of an update: ``global_token_num`` (set by the trainer for the whole batch) or this
    rank's token counts."""
    if flops_counter is None or delta_time <= 0:
        return 0.0
    seqlens = data.meta_info.get("global_token_num")
    share = world_size
    if seqlens is None:
        seqlens = data.batch["attention_mask"].sum(dim=-1).tolist()
        share = 1
    achieved, promised = flops_counter.estimate_flops(seqlens, delta_time)
    if not promised or promised == float("inf"):
        return 0.0
    return float(achieved * epochs / promised / share)


def current_lr(scheduler: Any) -> float:
    """The scheduler's current learning rate as a float (some schedulers hold it as a tensor)."""
    lr = scheduler.get_last_lr()[0]
    return float(lr.item() if torch.is_tensor(lr) else lr)


def reduce_timing(timing: dict[str, float]) -> dict[str, float]:
    """Mean over ranks, so that every rank reports the same numbers (their ``meta_info`` must agree to concat)."""
    if not timing or not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(timing)
    keys = sorted(timing)
    device = get_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([float(timing[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values = (values / dist.get_world_size()).cpu().tolist()
    return dict(zip(keys, values))


def last_valid_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last token with ``attention_mask`` 1 (0 for an all-padding row)."""
    cols = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (cols * attention_mask.bool().long()).argmax(dim=-1)


def rm_scores_at_last_response_token(data: DataProto, scores: torch.Tensor) -> DataProto:
    """``rm_scores`` ``(batch, response_length)``: each row's score at its last valid response token, zeros
    elsewhere, where the reward managers put rule-based scores too."""
    from verl.workers.reward_manager.common import response_lengths

    _, resp_lens = response_lengths(data)
    rm_scores = torch.zeros(data.batch["responses"].shape, dtype=torch.float32)
    rm_scores[torch.arange(len(data)), (resp_lens.cpu() - 1).clamp(min=0)] = scores.float()
    return DataProto.from_dict(tensors={"rm_scores": rm_scores})


def _log_prob_meta(data: DataProto, config: Any, section: Any, label: str) -> None:
    """Micro-batching and temperature of a forward-only pass, from ``section`` (rollout or ref config)."""
    use_dynamic = bool(cfg_get(section, "log_prob_use_dynamic_bsz", False))
    micro = cfg_get(section, "log_prob_micro_batch_size_per_gpu")
    if not use_dynamic and micro is None:
        raise ValueError(f"{label}.log_prob_micro_batch_size_per_gpu is not set; set it (rows per device per "
                         f"forward pass) or {label}.log_prob_use_dynamic_bsz=True")
    data.meta_info["micro_batch_size"] = micro
    data.meta_info["max_token_len"] = cfg_get(section, "log_prob_max_token_len_per_gpu")
    data.meta_info["use_dynamic_bsz"] = use_dynamic
    data.meta_info["temperature"] = float(cfg_get(config, "rollout.temperature", 1.0))


# ----------------------------------------------------------------------------------------------------------------------
# what the roles share
# ----------------------------------------------------------------------------------------------------------------------


class _Role(Worker):
    """Every role: the backend's strategy check and the model section of its config."""

    def _check_strategy(self, strategy: Any, key: str) -> None:
        raise NotImplementedError

    def _model_config(self, label: str, what: str) -> tuple[Any, str, bool]:
        """Import ``<label>.model.external_lib``; returns ``(model config, model path, trust_remote_code)``, or
        raises when the path is not set (``what``: what the path should name)."""
        model_cfg = self.config.get("model") or OmegaConf.create({})
        import_external_libs(model_cfg.get("external_lib"))
        path = model_cfg.get("path")
        if not path:
            raise ValueError(f"{label}.model.path is not set; set it to {what}")
        return model_cfg, path, bool(model_cfg.get("trust_remote_code", False))


class _TrainedRole(_Role):
    """A role with an optimizer: the timed update and the registered checkpoint methods."""

    # --------------------------------------------------------------------------------------------------- hooks ---
    def _phase_resident(self, phase: str) -> ContextManager:
        raise NotImplementedError

    def _sp_context(self) -> ContextManager:
        return contextlib.nullcontext()

    def _checkpoint_saved(self) -> None:
        return None

    def _require_trained(self, what: str) -> None:
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------------- shared ---
    def _timed_update(self, update: Callable[..., dict], data: DataProto, name: str, scheduler: Any, epochs: int,
                      memory_metrics: bool) -> DataProto:
        """Run ``update(data=data)`` with the role's state on the device; adds ``perf/mfu/<name>``, the peak memory
        (when ``memory_metrics``) and ``<name>/lr`` to its metrics, then steps ``scheduler``."""
        with self._phase_resident("update"):
            start = time.perf_counter()
            with self._sp_context():
                metrics: dict[str, Any] = dict(update(data=data))
            delta_time = time.perf_counter() - start
            metrics[f"perf/mfu/{name}"] = mfu(self.flops_counter, data, delta_time, epochs, self.world_size)
            if memory_metrics:
                metrics.update(peak_memory_metrics())
            metrics[f"{name}/lr"] = current_lr(scheduler)
            scheduler.step()
        get_torch_device().empty_cache()
        return DataProto(meta_info={"metrics": metrics})

    # ---------------------------------------------------------------------------------------------- checkpoint ---
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self,
                        local_path: str,
                        hdfs_path: str | None = None,
                        global_step: int = 0,
                        max_ckpt_to_keep: int | None = None) -> None:
        """Write the role's model, optimizer, lr scheduler and RNG state (what its ``checkpoint.save_contents``
        names) to ``local_path``, keeping the newest ``max_ckpt_to_keep`` checkpoints."""
        self._require_trained("save_checkpoint")
        with self._phase_resident("save"):
            self.checkpoint_manager.save_checkpoint(local_path=local_path,
                                                    hdfs_path=hdfs_path,
                                                    global_step=global_step,
                                                    max_ckpt_to_keep=max_ckpt_to_keep)
            self._checkpoint_saved()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self,
                        local_path: str | None,
                        hdfs_path: str | None = None,
                        del_local_after_load: bool = False) -> None:
        """Restore what the role's ``checkpoint.load_contents`` names from a checkpoint written by
        :meth:`save_checkpoint` at ``local_path`` (None: nothing)."""
        self._require_trained("load_checkpoint")
        with self._phase_resident("load"):
            self.checkpoint_manager.load_checkpoint(local_path=local_path,
                                                    hdfs_path=hdfs_path,
                                                    del_local_after_load=del_local_after_load)


# ----------------------------------------------------------------------------------------------------------------------
# actor / rollout / reference
# ----------------------------------------------------------------------------------------------------------------------


class ActorRolloutRefRole(_TrainedRole):
    """The hybrid actor / rollout / reference role without its backend: set-up of the role flags and batch sizes,
    the rollout build, and the registered compute, update and checkpoint methods (see the module's hook table)."""

    # -------------------------------------------------------------------------------------------------- set-up ---
    def _init_role(self, config: Any, role: str) -> None:
        """Check ``role`` and ``actor.strategy``, keep a private copy of ``config`` and clear the handles
        ``init_model`` fills."""
        if role not in ROLES:
            raise ValueError(f"ActorRolloutRefWorker: unknown role {role!r}; use one of {list(ROLES)}")
        self.config = detach_config(config)
        self.role = role
        self._is_actor = role in ("actor", "actor_rollout", "actor_rollout_ref")
        self._is_rollout = role in ("rollout", "actor_rollout", "actor_rollout_ref")
        self._is_ref = role in ("ref", "actor_rollout_ref")
        self._check_strategy(cfg_get(self.config, "actor.strategy"), "actor_rollout_ref.actor.strategy")
        self.actor = self.actor_optimizer = self.actor_lr_scheduler = None
        self.rollout = self.rollout_sharding_manager = None
        self.ref_policy = None
        self.checkpoint_manager = self.flops_counter = self.tokenizer = self.generation_config = None

    def _normalize_batch_sizes(self) -> None:
        """Global prompt counts and deprecated global micro-batch sizes -> rows per data-parallel rank."""
        rollout_n = int(cfg_get(self.config, "rollout.n", 1))
        if self._is_actor:
            normalize_ppo_mini_batch(self.config.actor, rollout_n, self.dp_size, "actor_rollout_ref.actor")
        if self._is_rollout and "rollout" in self.config:
            normalize_micro_batch(self.config.rollout, "log_prob_micro_batch_size", "log_prob_micro_batch_size_per_gpu",
                                  self.dp_size, "actor_rollout_ref.rollout")
        if self._is_ref and "ref" in self.config:
            normalize_micro_batch(self.config.ref, "log_prob_micro_batch_size", "log_prob_micro_batch_size_per_gpu",
                                  self.dp_size, "actor_rollout_ref.ref")

    def _load_model_files(self) -> tuple[Any, str, bool]:
        """Import ``model.external_lib`` and load the tokenizer and generation config; returns
        ``(model config, model path, trust_remote_code)``."""
        model_cfg, path, trust = self._model_config("actor_rollout_ref", "a Hugging Face model directory")
        self.tokenizer = load_tokenizer(model_cfg.get("tokenizer_path") or path, trust)
        self.generation_config = load_generation_config(path, trust)
        return model_cfg, path, trust

    def _build_rollout(self) -> tuple[Any, Any]:
        """The rollout engine (``rollout.name``) and its sharding manager. For ``hf``: an unsharded copy of the model
        whose weights the sharding manager overwrites with the actor's before every generation."""
        from verl.workers.rollout import get_rollout_class

        rollout_cfg = self.config.rollout
        name, mode = str(rollout_cfg.get("name", "hf")), str(rollout_cfg.get("mode", "sync") or "sync")
        rollout_cls = get_rollout_class(name, mode)  # reports unknown names and missing engine packages
        if name != "hf":
            return self._build_engine_rollout(name, rollout_cls)
        module = self._hf_rollout_module(rollout_cfg)
        rollout = rollout_cls(module=module, config=rollout_cfg, tokenizer=self.tokenizer)
        bucket_mb = float(rollout_cfg.get("update_weights_bucket_megabytes", 512) or 512)
        return rollout, self._hf_sharding_manager(module, int(bucket_mb * (1 << 20)), rollout_cfg)

    def _hf_rollout_module(self, rollout_cfg: Any) -> torch.nn.Module:
        """The HF rollout's model, in eval mode: ``rollout.dtype`` (bf16) on accelerators, fp32 on CPU like the
        actor's compute there. Its weights are random until the sharding manager copies the actor's in."""
        from transformers import AutoModelForCausalLM

        from verl.utils.fsdp_utils import to_torch_dtype

        dtype = to_torch_dtype(rollout_cfg.get("dtype"), torch.bfloat16) if is_cuda_available() else torch.float32
        hf_config = copy.deepcopy(self.hf_config)
        hf_config.use_cache = True
        with torch.device(get_device()):
            module = AutoModelForCausalLM.from_config(hf_config,
                                                      dtype=dtype,
                                                      trust_remote_code=bool(
                                                          self.config.model.get("trust_remote_code", False)),
                                                      attn_implementation="sdpa")
        module.eval()
        return module

    # --------------------------------------------------------------------------------------------------- hooks ---
    def _models_built(self) -> bool:
        raise NotImplementedError

    def _hf_sharding_manager(self, module: torch.nn.Module, bucket_bytes: int, rollout_cfg: Any) -> Any:
        raise NotImplementedError

    #: the backend's hybrid-engine modules are ``verl.workers.sharding_manager.<prefix>_<rollout name>``
    _hybrid_engine_prefix: str | None = None

    def _build_engine_rollout(self, name: str, rollout_cls: Any) -> tuple[Any, Any]:
        """Engine backends own their hybrid-engine wiring: ``verl.workers.sharding_manager.<prefix>_<name>`` (prefix:
        ``_hybrid_engine_prefix``) exposes ``build_hybrid_engine(worker, rollout_cls) -> (rollout, manager)``."""
        prefix = self._hybrid_engine_prefix
        unsupported = NotImplementedError(
            f"actor_rollout_ref.rollout.name={name!r}: the {prefix or type(self).__name__} "
            "worker has no hybrid engine for this backend; set "
            "actor_rollout_ref.rollout.name=hf")
        if prefix is None:
            raise unsupported
        module_name = f"verl.workers.sharding_manager.{prefix}_{name}"
        try:
            backend = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            raise unsupported from None
        return backend.build_hybrid_engine(worker=self, rollout_cls=rollout_cls)

    def _require(self, flag: bool, what: str) -> None:
        if not flag:
            raise RuntimeError(f"{what} is not available on a worker with role={self.role!r}")
        if not self._models_built():
            raise RuntimeError("the worker has no models yet; call init_model() on the worker group first")

    def _require_trained(self, what: str) -> None:
        self._require(self._is_actor, what)

    # ------------------------------------------------------------------------------------------------- rollout ---
    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="rollout"))
    def generate_sequences(self, prompts: DataProto) -> DataProto:
        """Generate responses with the actor's current weights (synced into the rollout engine first)."""
        from verl.utils.timer import simple_timer

        self._require(self._is_rollout, "generate_sequences")
        gen = self.generation_config
        prompts.meta_info.setdefault(
            "eos_token_id",
            gen.eos_token_id if gen is not None and gen.eos_token_id is not None else self.tokenizer.eos_token_id)
        prompts.meta_info.setdefault(
            "pad_token_id",
            gen.pad_token_id if gen is not None and gen.pad_token_id is not None else self.tokenizer.pad_token_id)
        timing: dict[str, float] = {}
        with simple_timer("generate_sequences", timing):
            with self.rollout_sharding_manager:
                data = self.rollout_sharding_manager.preprocess_data(prompts)
                output = self.rollout.generate_sequences(prompts=data)
                output = self.rollout_sharding_manager.postprocess_data(output)
        sync_metrics = dict(getattr(self.rollout_sharding_manager, "metrics", None) or {})
        sync_timing = dict(getattr(self.rollout_sharding_manager, "timing", None) or {})
        timing.update(sync_timing)
        timing = reduce_timing(timing)
        output = output.to("cpu")
        output.meta_info["timing"] = timing
        metrics = {f"timing_s/{k}": v for k, v in timing.items()}
        metrics.update(sync_metrics)
        output.meta_info["metrics"] = metrics
        get_torch_device().empty_cache()
        return output

    # ----------------------------------------------------------------------------------------------- log-probs ---
    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def compute_log_prob(self, data: DataProto) -> DataProto:
        """Log-probs of ``responses`` under the current actor (``old_log_probs``) and the policy's entropy
        (``entropys``), at the rollout's sampling temperature."""
        self._require(self._is_actor, "compute_log_prob")
        _log_prob_meta(data, self.config, self.config.get("rollout") or {}, "actor_rollout_ref.rollout")
        with self._phase_resident("log_prob"), self._sp_context():
            log_probs, entropys = self.actor.compute_log_prob(data=data, calculate_entropy=True)
        output = DataProto.from_dict(tensors={
            "old_log_probs": log_probs,
            "entropys": entropys
        },
                                     meta_info={"temperature": data.meta_info["temperature"]})
        get_torch_device().empty_cache()
        return output.to("cpu")

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def compute_ref_log_prob(self, data: DataProto) -> DataProto:
        """Log-probs of ``responses`` under the frozen reference policy (``ref_log_prob``)."""
        self._require(self._is_ref, "compute_ref_log_prob")
        _log_prob_meta(data, self.config, self.config.get("ref") or {}, "actor_rollout_ref.ref")
        with self._phase_resident("ref_log_prob"), self._sp_context():
            log_probs, _ = self.ref_policy.compute_log_prob(data=data, calculate_entropy=False)
        get_torch_device().empty_cache()
        return DataProto.from_dict(tensors={"ref_log_prob": log_probs}).to("cpu")

    # -------------------------------------------------------------------------------------------------- update ---
    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data: DataProto) -> DataProto:
        """One PPO update of the actor on the batch; returns ``meta_info["metrics"]`` (``actor/*``,
        ``perf/mfu/actor``, ``perf/max_memory_allocated_gb``, ``actor/lr``) and steps the lr scheduler."""
        self._require(self._is_actor, "update_actor")
        data.meta_info.setdefault("temperature", float(cfg_get(self.config, "rollout.temperature", 1.0)))
        return self._timed_update(self.actor.update_policy,
                                  data,
                                  "actor",
                                  self.actor_lr_scheduler,
                                  int(cfg_get(self.config, "actor.ppo_epochs", 1)),
                                  memory_metrics=True)


# ----------------------------------------------------------------------------------------------------------------------
# critic
# ----------------------------------------------------------------------------------------------------------------------


class CriticRole(_TrainedRole):
    """The value-model role without its backend: set-up, batch sizes and the registered compute, update and
    checkpoint methods (see the module's hook table)."""

    def _init_role(self, config: Any) -> None:
        """Keep a private copy of ``config``, check ``critic.strategy`` and clear the handles ``init_model``
        fills."""
        self.config = detach_config(config)
        self._check_strategy(self.config.get("strategy"), "critic.strategy")
        self.critic = self.critic_module = self.critic_optimizer = self.critic_lr_scheduler = None
        self.checkpoint_manager = self.flops_counter = None

    def _normalize_batch_sizes(self) -> None:
        """Global prompt counts and deprecated global micro-batch sizes -> rows per data-parallel rank."""
        normalize_ppo_mini_batch(self.config, int(self.config.get("rollout_n", 1) or 1), self.dp_size, "critic")
        normalize_micro_batch(self.config, "forward_micro_batch_size", "forward_micro_batch_size_per_gpu", self.dp_size,
                              "critic")

    def _load_model_files(self) -> tuple[Any, str, bool]:
        """Import ``critic.model.external_lib`` and load the tokenizer; returns ``(model config, model path,
        trust_remote_code)``."""
        model_cfg, path, trust = self._model_config("critic",
                                                    "a Hugging Face model directory (usually the actor's model)")
        self.tokenizer = load_tokenizer(model_cfg.get("tokenizer_path") or path, trust)
        return model_cfg, path, trust

    # --------------------------------------------------------------------------------------------------- hooks ---
    def _set_forward_meta(self, data: DataProto) -> None:
        raise NotImplementedError

    def _require_model(self) -> None:
        if self.critic is None:
            raise RuntimeError("the critic has no model yet; call init_model() on the worker group first")

    def _require_trained(self, what: str) -> None:
        self._require_model()

    # ------------------------------------------------------------------------------------------------- methods ---
    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="critic"))
    def compute_values(self, data: DataProto) -> DataProto:
        """Values ``(batch, response_length)`` of the response positions (``values``)."""
        self._require_model()
        self._set_forward_meta(data)
        with self._phase_resident("forward"), self._sp_context():
            values = self.critic.compute_values(data=data)
        get_torch_device().empty_cache()
        return DataProto.from_dict(tensors={"values": values}).to("cpu")

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="critic"))
    def update_critic(self, data: DataProto) -> DataProto:
        """One value-regression update; returns ``meta_info["metrics"]`` (``critic/*``, ``perf/mfu/critic``,
        ``critic/lr``) and steps the lr scheduler."""
        self._require_model()
        return self._timed_update(self.critic.update_critic,
                                  data,
                                  "critic",
                                  self.critic_lr_scheduler,
                                  int(self.config.get("ppo_epochs", 1) or 1),
                                  memory_metrics=False)


# ----------------------------------------------------------------------------------------------------------------------
# reward model
# ----------------------------------------------------------------------------------------------------------------------


class RewardModelRole(_Role):
    """The reward-model role without its backend: set-up and the model section; the backend's ``init_model`` and
    ``compute_rm_score`` score the sequences (:func:`rm_scores_at_last_response_token` places the scores)."""

    def _init_role(self, config: Any) -> None:
        """Keep a private copy of ``config`` and check ``reward_model.strategy``."""
        self.config = detach_config(config)
        self._check_strategy(self.config.get("strategy"), "reward_model.strategy")

    def _reward_model_config(self) -> tuple[Any, str, bool]:
        return self._model_config(
            "reward_model", "a Hugging Face sequence-classification model directory, or set "
            "reward_model.enable=False for rule-based rewards")
