"""Ray worker roles of the Megatron-core backend (``strategy=megatron``, ``--config-name ppo_megatron_trainer``): the
same classes and registered methods as :mod:`verl.workers.fsdp_workers`.

=========================================  =========================  ============================================
method                                     dispatch                   returns
=========================================  =========================  ============================================
``init_model``                             ONE_TO_ALL                 builds models, optimizers, rollout, ckpt mgr
``generate_sequences``                     n-d mesh ``"rollout"``     the rollout schema (every rank generates)
``compute_log_prob``                       n-d mesh ``"actor"``       ``old_log_probs``, ``entropys``
``compute_ref_log_prob``                   n-d mesh ``"actor"``       ``ref_log_prob``
``update_actor``                           n-d mesh ``"actor"``       ``meta_info["metrics"]``
``compute_values`` / ``update_critic``     n-d mesh ``"critic"``      ``values`` / metrics
``compute_rm_score``                       n-d mesh ``"reward"``      ``rm_scores`` (at the last valid token)
``save_checkpoint`` / ``load_checkpoint``  ONE_TO_ALL                 None (megatron dist checkpoints)
=========================================  =========================  ============================================

Megatron dispatch: the processes form megatron's ``tp x dp x pp`` grid (``*.megatron.tensor_model_parallel_size``,
``pipeline_model_parallel_size``; the rest is data parallelism). Each rank declares its megatron DP rank, so all TP
and PP ranks of a DP group receive the same rows (the first stage needs ``input_ids``, the last the labels), and only
TP rank 0 of the last pipeline stage is collected. For generation with the HF rollout every rank holds the full
weights after the hybrid-engine sync (:mod:`verl.workers.sharding_manager.megatron_hf`) and is its own DP rank.

Batch sizes follow verl: ``ppo_mini_batch_size`` (prompts) becomes rows per megatron DP rank. Offload
(``*.megatron.param_offload`` / ``grad_offload`` / ``optimizer_offload``) frees device memory between phases. On CPU
(gloo) megatron runs through :mod:`verl.utils.megatron_cpu`.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from verl.protocol import DataProto
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils.device import get_device, get_torch_device, is_cuda_available
from verl.utils.dp_update import cfg_get
from verl.workers.config_helpers import (detach_config, import_external_libs, load_generation_config, load_tokenizer,
                                         normalize_micro_batch, normalize_ppo_mini_batch)
from verl.workers.fsdp_workers import (ROLES, _current_lr, _mfu, _peak_memory_metrics, _reduce_timing, init_distributed,
                                       last_valid_token_index)

__all__ = ["ActorRolloutRefWorker", "CriticWorker", "RewardModelWorker", "MegatronWorker"]


def _check_strategy(strategy: Any, key: str) -> None:
    if strategy is not None and str(strategy) != "megatron":
        raise ValueError(f"{key}={strategy!r} cannot run on the Megatron workers (verl.workers.megatron_workers); "
                         "use strategy=megatron, or the FSDP workers for fsdp/fsdp2")


def _hf_config(path: str, trust: bool, override: Any = None) -> Any:
    from transformers import AutoConfig

    from verl.workers.config_helpers import update_model_config

    if not path:
        raise ValueError("model.path is not set; set it to a Hugging Face model directory")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    overrides = OmegaConf.to_container(override, resolve=True) if OmegaConf.is_config(override) else dict(override or
                                                                                                          {})
    overrides.pop("attn_implementation", None)
    update_model_config(config, overrides)
    return config


class MegatronWorker(Worker):
    """Shared set-up: ``torch.distributed``, megatron's parallel state, dispatch registration, offload state."""

    def _init_megatron(self, megatron_cfg: Any, label: str, mesh_name: str, timeout: float) -> None:
        from verl.utils.megatron_utils import init_megatron_parallel

        init_distributed(timeout)
        self.parallel = init_megatron_parallel(megatron_cfg, label)
        self.dp_size = self.parallel.dp_size
        self._register_dispatch_collect_info(mesh_name,
                                             dp_rank=self.parallel.dp_rank,
                                             is_collect=self.parallel.is_collect)
        self._offload_store: dict = {}

    def _load_phase(self, chunks: list, optimizer: Any, params: bool, grads: bool, optim: bool) -> None:
        from verl.utils.megatron_utils import load_megatron_grads, load_megatron_model, load_megatron_optimizer

        if params:
            load_megatron_model(chunks, self._offload_store)
        if grads:
            load_megatron_grads(chunks, self._offload_store)
        if optim:
            load_megatron_optimizer(optimizer, self._offload_store)

    def _offload_phase(self, chunks: list, optimizer: Any, params: bool, grads: bool, optim: bool) -> None:
        from verl.utils.megatron_utils import offload_megatron_grads, offload_megatron_model, offload_megatron_optimizer

        if params:
            offload_megatron_model(chunks, self._offload_store)
        if grads:
            offload_megatron_grads(chunks, self._offload_store)
        if optim:
            offload_megatron_optimizer(optimizer, self._offload_store)
        get_torch_device().empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# actor / rollout / reference
# ----------------------------------------------------------------------------------------------------------------------


class ActorRolloutRefWorker(MegatronWorker):
    """The hybrid engine on Megatron-core: actor, rollout (HF) and/or reference policy in one process.

    Args:
        config: the ``actor_rollout_ref`` node (``model``, ``actor``, ``rollout``, ``ref``; ``actor.megatron`` sizes).
        role: ``actor``, ``rollout``, ``ref``, ``actor_rollout`` or ``actor_rollout_ref``.
    """

    def __init__(self, config: Any, role: str, **kwargs: Any) -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"ActorRolloutRefWorker: unknown role {role!r}; use one of {list(ROLES)}")
        self.config = detach_config(config)
        self.role = role
        self._is_actor = role in ("actor", "actor_rollout", "actor_rollout_ref")
        self._is_rollout = role in ("rollout", "actor_rollout", "actor_rollout_ref")
        self._is_ref = role in ("ref", "actor_rollout_ref")
        _check_strategy(cfg_get(self.config, "actor.strategy"), "actor_rollout_ref.actor.strategy")
        section = "actor" if (self._is_actor or self._is_rollout) else "ref"
        self.megatron_config = cfg_get(self.config, f"{section}.megatron", {}) or {}
        self._init_megatron(self.megatron_config, f"actor_rollout_ref.{section}.megatron", "actor",
                            float(self.config.get("nccl_timeout", 600) or 600))
        self._register_dispatch_collect_info("rollout", dp_rank=dist.get_rank(), is_collect=True)
        mcfg = self.megatron_config
        self._offload_param = self._is_actor and bool(cfg_get(mcfg, "param_offload", False))
        self._offload_grad = self._is_actor and bool(cfg_get(mcfg, "grad_offload", False))
        self._offload_optimizer = self._is_actor and bool(cfg_get(mcfg, "optimizer_offload", False))
        self._offload_ref = self._is_ref and bool(cfg_get(self.config, "ref.megatron.param_offload", False))
        rollout_n = int(cfg_get(self.config, "rollout.n", 1))
        if self._is_actor:
            normalize_ppo_mini_batch(self.config.actor, rollout_n, self.dp_size, "actor_rollout_ref.actor")
        if self._is_rollout and "rollout" in self.config:
            normalize_micro_batch(self.config.rollout, "log_prob_micro_batch_size", "log_prob_micro_batch_size_per_gpu",
                                  self.dp_size, "actor_rollout_ref.rollout")
        if self._is_ref and "ref" in self.config:
            normalize_micro_batch(self.config.ref, "log_prob_micro_batch_size", "log_prob_micro_batch_size_per_gpu",
                                  self.dp_size, "actor_rollout_ref.ref")
        self.actor = self.actor_module = self.actor_optimizer = self.actor_lr_scheduler = None
        self.rollout = self.rollout_sharding_manager = None
        self.ref_policy = self.ref_module = None
        self.checkpoint_manager = self.flops_counter = self.tokenizer = self.generation_config = None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        """Build the actor's megatron chunks (from the HF checkpoint), optimizer and scheduler, the rollout with its
        hybrid engine, the reference policy and the checkpoint manager."""
        from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager
        from verl.utils.flops_counter import FlopsCounter
        from verl.utils.megatron_utils import MegatronLRScheduler, build_megatron_model, build_megatron_optimizer
        from verl.workers.actor.megatron_actor import MegatronPPOActor

        model_cfg = self.config.model
        import_external_libs(model_cfg.get("external_lib"))
        path = model_cfg.get("path")
        trust = bool(model_cfg.get("trust_remote_code", False))
        self.hf_config = _hf_config(path, trust, model_cfg.get("override_config"))
        self.tokenizer = load_tokenizer(model_cfg.get("tokenizer_path") or path, trust)
        self.generation_config = load_generation_config(path, trust)
        if self._is_actor or self._is_rollout:
            load = bool(cfg_get(self.config, "actor.load_weight", True))
            self.actor_module, self.tf_config, self.converter = build_megatron_model(self.hf_config,
                                                                                     self.megatron_config,
                                                                                     path,
                                                                                     wrap_ddp=self._is_actor,
                                                                                     load_weights=load)
            if self._is_actor:
                self.actor_optimizer = build_megatron_optimizer(self.actor_module, self.config.actor.optim,
                                                                self.megatron_config,
                                                                cfg_get(self.config, "actor.grad_clip", 1.0))
                self.actor_lr_scheduler = MegatronLRScheduler(self.actor_optimizer, self.config.actor.optim)
                self.actor = MegatronPPOActor(self.config.actor, self.hf_config, self.tf_config, self.actor_module,
                                              self.actor_optimizer)
                self.flops_counter = FlopsCounter(self.hf_config)
                self.checkpoint_manager = MegatronCheckpointManager(self.actor_module,
                                                                    self.actor_optimizer,
                                                                    self.actor_lr_scheduler,
                                                                    processing_class=self.tokenizer,
                                                                    checkpoint_config=cfg_get(
                                                                        self.config, "actor.checkpoint"),
                                                                    converter=self.converter,
                                                                    hf_config=self.hf_config)
        if self._is_rollout:
            self.rollout, self.rollout_sharding_manager = self._build_rollout()
        if self._is_ref:
            ref_cfg = self.config.get("ref") or OmegaConf.create({})
            ref_mcfg = cfg_get(ref_cfg, "megatron", None) or self.megatron_config
            self.ref_module, ref_tf, _ = build_megatron_model(self.hf_config,
                                                              ref_mcfg,
                                                              path,
                                                              wrap_ddp=False,
                                                              load_weights=bool(cfg_get(ref_cfg, "load_weight", True)))
            self.ref_policy = MegatronPPOActor(ref_cfg, self.hf_config, ref_tf, self.ref_module)
            if self._offload_ref:
                self._offload_phase(self.ref_module, None, True, False, False)
        if self._is_actor:
            self._offload_phase(self.actor_module, self.actor_optimizer, self._offload_param, self._offload_grad,
                                self._offload_optimizer)

    def _build_rollout(self) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM

        from verl.utils.fsdp_utils import to_torch_dtype
        from verl.workers.rollout import get_rollout_class
        from verl.workers.sharding_manager.megatron_hf import MegatronHFShardingManager

        rollout_cfg = self.config.rollout
        name, mode = str(rollout_cfg.get("name", "hf")), str(rollout_cfg.get("mode", "sync") or "sync")
        rollout_cls = get_rollout_class(name, mode)
        if name != "hf":
            raise NotImplementedError(f"actor_rollout_ref.rollout.name={name!r} with strategy=megatron: the Megatron "
                                      "worker wires the HF rollout; vLLM/SGLang take the same weight generator "
                                      "(MegatronHFShardingManager.iter_weight_buckets) but are not wired yet. Set "
                                      "actor_rollout_ref.rollout.name=hf")
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
        rollout = rollout_cls(module=module, config=rollout_cfg, tokenizer=self.tokenizer)
        bucket_mb = float(rollout_cfg.get("update_weights_bucket_megabytes", 512) or 512)
        manager = MegatronHFShardingManager(self.actor_module,
                                            self.converter,
                                            inference_module=module,
                                            bucket_bytes=int(bucket_mb * (1 << 20)),
                                            offload_param=self._offload_param,
                                            param_store=self._offload_store,
                                            offload_rollout=bool(rollout_cfg.get("free_cache_engine", True)))
        return rollout, manager

    def _require(self, flag: bool, what: str) -> None:
        if not flag:
            raise RuntimeError(f"{what} is not available on a worker with role={self.role!r}")
        if self.actor_module is None and self.ref_module is None:
            raise RuntimeError("the worker has no models yet; call init_model() on the worker group first")

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="rollout"))
    def generate_sequences(self, prompts: DataProto) -> DataProto:
        """Generate with the actor's current weights (streamed into the rollout model first)."""
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
                output = self.rollout.generate_sequences(prompts=prompts)
        timing.update(self.rollout_sharding_manager.timing)
        timing = _reduce_timing(timing)
        output = output.to("cpu")
        output.meta_info["timing"] = timing
        metrics = {f"timing_s/{k}": v for k, v in timing.items()}
        metrics.update(self.rollout_sharding_manager.metrics)
        output.meta_info["metrics"] = metrics
        get_torch_device().empty_cache()
        return output

    def _log_prob_meta(self, data: DataProto, section: Any, label: str) -> None:
        use_dynamic = bool(cfg_get(section, "log_prob_use_dynamic_bsz", False))
        micro = cfg_get(section, "log_prob_micro_batch_size_per_gpu")
        if not use_dynamic and micro is None:
            raise ValueError(f"{label}.log_prob_micro_batch_size_per_gpu is not set; set it (rows per device per "
                             f"forward pass) or {label}.log_prob_use_dynamic_bsz=True")
        data.meta_info["micro_batch_size"] = micro
        data.meta_info["max_token_len"] = cfg_get(section, "log_prob_max_token_len_per_gpu")
        data.meta_info["use_dynamic_bsz"] = use_dynamic
        data.meta_info["temperature"] = float(cfg_get(self.config, "rollout.temperature", 1.0))

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def compute_log_prob(self, data: DataProto) -> DataProto:
        """``old_log_probs`` and ``entropys`` of ``responses`` under the current actor."""
        self._require(self._is_actor, "compute_log_prob")
        self._log_prob_meta(data, self.config.get("rollout") or {}, "actor_rollout_ref.rollout")
        self._load_phase(self.actor_module, None, self._offload_param, False, False)
        try:
            log_probs, entropys = self.actor.compute_log_prob(data=data, calculate_entropy=True)
        finally:
            self._offload_phase(self.actor_module, None, self._offload_param, False, False)
        return DataProto.from_dict(tensors={
            "old_log_probs": log_probs,
            "entropys": entropys
        },
                                   meta_info={"temperature": data.meta_info["temperature"]})

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def compute_ref_log_prob(self, data: DataProto) -> DataProto:
        """``ref_log_prob`` under the frozen reference policy."""
        self._require(self._is_ref, "compute_ref_log_prob")
        self._log_prob_meta(data, self.config.get("ref") or {}, "actor_rollout_ref.ref")
        self._load_phase(self.ref_module, None, self._offload_ref, False, False)
        try:
            log_probs, _ = self.ref_policy.compute_log_prob(data=data, calculate_entropy=False)
        finally:
            self._offload_phase(self.ref_module, None, self._offload_ref, False, False)
        return DataProto.from_dict(tensors={"ref_log_prob": log_probs})

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data: DataProto) -> DataProto:
        """One PPO update; returns ``meta_info["metrics"]`` and steps the lr schedule."""
        from verl.utils.dp_update import mean_metric_lists

        self._require(self._is_actor, "update_actor")
        data.meta_info.setdefault("temperature", float(cfg_get(self.config, "rollout.temperature", 1.0)))
        flags = (self._offload_param, self._offload_grad, self._offload_optimizer)
        self._load_phase(self.actor_module, self.actor_optimizer, *flags)
        try:
            start = time.perf_counter()
            metrics: dict[str, Any] = dict(self.actor.update_policy(data=data))
            delta = time.perf_counter() - start
            metrics["perf/mfu/actor"] = _mfu(self.flops_counter, data, delta,
                                             int(cfg_get(self.config, "actor.ppo_epochs", 1)), self.world_size)
            metrics.update(_peak_memory_metrics())
            metrics["actor/lr"] = _current_lr(self.actor_lr_scheduler)
            self.actor_lr_scheduler.step()
        finally:
            self._offload_phase(self.actor_module, self.actor_optimizer, *flags)
        return DataProto(meta_info={"metrics": metrics})

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self,
                        local_path: str,
                        hdfs_path: str | None = None,
                        global_step: int = 0,
                        max_ckpt_to_keep: int | None = None) -> None:
        """Megatron dist checkpoint of the actor (model, optimizer, scheduler, RNG) at ``local_path``."""
        self._require(self._is_actor, "save_checkpoint")
        flags = (self._offload_param, False, self._offload_optimizer)
        self._load_phase(self.actor_module, self.actor_optimizer, *flags)
        try:
            self.checkpoint_manager.save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)
        finally:
            self._offload_phase(self.actor_module, self.actor_optimizer, *flags)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self,
                        local_path: str | None,
                        hdfs_path: str | None = None,
                        del_local_after_load: bool = False) -> None:
        """Restore the actor from a checkpoint written by :meth:`save_checkpoint` (None: nothing)."""
        self._require(self._is_actor, "load_checkpoint")
        flags = (self._offload_param, False, self._offload_optimizer)
        self._load_phase(self.actor_module, self.actor_optimizer, *flags)
        try:
            self.checkpoint_manager.load_checkpoint(local_path, hdfs_path, del_local_after_load)
        finally:
            self._offload_phase(self.actor_module, self.actor_optimizer, *flags)


# ----------------------------------------------------------------------------------------------------------------------
# critic
# ----------------------------------------------------------------------------------------------------------------------


class CriticWorker(MegatronWorker):
    """The value model on Megatron-core (``critic.megatron`` sizes).

    Args:
        config: the ``critic`` config node.
    """

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__()
        self.config = detach_config(config)
        _check_strategy(self.config.get("strategy"), "critic.strategy")
        self.megatron_config = self.config.get("megatron") or {}
        self._init_megatron(self.megatron_config, "critic.megatron", "critic",
                            float(self.config.get("nccl_timeout", 600) or 600))
        mcfg = self.megatron_config
        self._flags = (bool(cfg_get(mcfg, "param_offload",
                                    False)), bool(cfg_get(mcfg, "grad_offload",
                                                          False)), bool(cfg_get(mcfg, "optimizer_offload", False)))
        normalize_ppo_mini_batch(self.config, int(self.config.get("rollout_n", 1) or 1), self.dp_size, "critic")
        normalize_micro_batch(self.config, "forward_micro_batch_size", "forward_micro_batch_size_per_gpu", self.dp_size,
                              "critic")
        self.critic = self.critic_module = self.critic_optimizer = self.critic_lr_scheduler = None
        self.checkpoint_manager = self.flops_counter = None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        """Build the value model (``critic.model.path`` with a one-output head), optimizer and scheduler."""
        from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager
        from verl.utils.flops_counter import FlopsCounter
        from verl.utils.megatron_utils import MegatronLRScheduler, build_megatron_model, build_megatron_optimizer
        from verl.workers.critic.megatron_critic import MegatronPPOCritic

        model_cfg = self.config.get("model") or OmegaConf.create({})
        import_external_libs(model_cfg.get("external_lib"))
        path = model_cfg.get("path")
        trust = bool(model_cfg.get("trust_remote_code", False))
        self.hf_config = _hf_config(path, trust, model_cfg.get("override_config"))
        self.tokenizer = load_tokenizer(model_cfg.get("tokenizer_path") or path, trust)
        self.critic_module, tf_config, converter = build_megatron_model(self.hf_config,
                                                                        self.megatron_config,
                                                                        path,
                                                                        value_head=True,
                                                                        load_weights=bool(
                                                                            self.config.get("load_weight", True)))
        self.critic_optimizer = build_megatron_optimizer(self.critic_module, self.config.optim, self.megatron_config,
                                                         self.config.get("grad_clip", 1.0))
        self.critic_lr_scheduler = MegatronLRScheduler(self.critic_optimizer, self.config.optim)
        self.critic = MegatronPPOCritic(self.config, self.hf_config, tf_config, self.critic_module,
                                        self.critic_optimizer)
        self.flops_counter = FlopsCounter(self.hf_config)
        self.checkpoint_manager = MegatronCheckpointManager(self.critic_module,
                                                            self.critic_optimizer,
                                                            self.critic_lr_scheduler,
                                                            processing_class=self.tokenizer,
                                                            checkpoint_config=self.config.get("checkpoint"),
                                                            converter=converter,
                                                            hf_config=self.hf_config)
        self._offload_phase(self.critic_module, self.critic_optimizer, *self._flags)

    def _require_model(self) -> None:
        if self.critic is None:
            raise RuntimeError("the critic has no model yet; call init_model() on the worker group first")

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="critic"))
    def compute_values(self, data: DataProto) -> DataProto:
        """``values`` ``(batch, response_length)``."""
        self._require_model()
        use_dynamic = bool(self.config.get("use_dynamic_bsz", False))
        micro = self.config.get("forward_micro_batch_size_per_gpu") or self.config.get("ppo_micro_batch_size_per_gpu")
        if not use_dynamic and micro is None:
            raise ValueError(
                "critic.forward_micro_batch_size_per_gpu is not set; set it or critic.use_dynamic_bsz=True")
        data.meta_info.update(micro_batch_size=micro,
                              max_token_len=self.config.get("forward_max_token_len_per_gpu") or
                              self.config.get("ppo_max_token_len_per_gpu"),
                              use_dynamic_bsz=use_dynamic)
        self._load_phase(self.critic_module, None, self._flags[0], False, False)
        try:
            values = self.critic.compute_values(data=data)
        finally:
            self._offload_phase(self.critic_module, None, self._flags[0], False, False)
        return DataProto.from_dict(tensors={"values": values})

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="critic"))
    def update_critic(self, data: DataProto) -> DataProto:
        """One value-regression update; returns ``meta_info["metrics"]``."""
        self._require_model()
        self._load_phase(self.critic_module, self.critic_optimizer, *self._flags)
        try:
            start = time.perf_counter()
            metrics: dict[str, Any] = dict(self.critic.update_critic(data=data))
            metrics["perf/mfu/critic"] = _mfu(self.flops_counter, data,
                                              time.perf_counter() - start, int(self.config.get("ppo_epochs", 1) or 1),
                                              self.world_size)
            metrics["critic/lr"] = _current_lr(self.critic_lr_scheduler)
            self.critic_lr_scheduler.step()
        finally:
            self._offload_phase(self.critic_module, self.critic_optimizer, *self._flags)
        return DataProto(meta_info={"metrics": metrics})

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self,
                        local_path: str,
                        hdfs_path: str | None = None,
                        global_step: int = 0,
                        max_ckpt_to_keep: int | None = None) -> None:
        """Megatron dist checkpoint of the critic."""
        self._require_model()
        flags = (self._flags[0], False, self._flags[2])
        self._load_phase(self.critic_module, self.critic_optimizer, *flags)
        try:
            self.checkpoint_manager.save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)
        finally:
            self._offload_phase(self.critic_module, self.critic_optimizer, *flags)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self,
                        local_path: str | None,
                        hdfs_path: str | None = None,
                        del_local_after_load: bool = False) -> None:
        """Restore the critic (None: nothing)."""
        self._require_model()
        flags = (self._flags[0], False, self._flags[2])
        self._load_phase(self.critic_module, self.critic_optimizer, *flags)
        try:
            self.checkpoint_manager.load_checkpoint(local_path, hdfs_path, del_local_after_load)
        finally:
            self._offload_phase(self.critic_module, self.critic_optimizer, *flags)


# ----------------------------------------------------------------------------------------------------------------------
# reward model
# ----------------------------------------------------------------------------------------------------------------------


class RewardModelWorker(MegatronWorker):
    """A sequence-classification reward model on Megatron-core: the value head (loaded from the checkpoint's
    ``score.weight``) read at each row's last valid token and placed at the last valid response token of
    ``rm_scores``. The reward model must share the policy's tokenizer (``reward_model.model.input_tokenizer`` unset
    or equal).

    Args:
        config: the ``reward_model`` config node.
    """

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__()
        self.config = detach_config(config)
        _check_strategy(self.config.get("strategy"), "reward_model.strategy")
        self.megatron_config = self.config.get("megatron") or {}
        self._init_megatron(self.megatron_config, "reward_model.megatron", "reward",
                            float(self.config.get("nccl_timeout", 600) or 600))
        self._offload = bool(cfg_get(self.megatron_config, "param_offload", False))
        normalize_micro_batch(self.config, "micro_batch_size", "micro_batch_size_per_gpu", self.dp_size, "reward_model")
        self.reward_module = None
        self.critic = None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        """Load the reward model (``reward_model.model.path``)."""
        from verl.utils.megatron_utils import build_megatron_model
        from verl.workers.critic.megatron_critic import MegatronPPOCritic

        model_cfg = self.config.get("model") or OmegaConf.create({})
        import_external_libs(model_cfg.get("external_lib"))
        path = model_cfg.get("path")
        input_tok = model_cfg.get("input_tokenizer")
        if input_tok and str(input_tok) != str(path):
            raise NotImplementedError("reward_model.model.input_tokenizer differs from the reward model: the Megatron "
                                      "reward worker scores the policy's tokens as they are; use a reward model with "
                                      "the policy's tokenizer or reward_model.strategy=fsdp")
        self.hf_config = _hf_config(path, bool(model_cfg.get("trust_remote_code", False)),
                                    model_cfg.get("override_config"))
        self.reward_module, tf_config, _ = build_megatron_model(self.hf_config,
                                                                self.megatron_config,
                                                                path,
                                                                value_head=True,
                                                                wrap_ddp=False)
        self.critic = MegatronPPOCritic({}, self.hf_config, tf_config, self.reward_module, None)
        if self._offload:
            self._offload_phase(self.reward_module, None, True, False, False)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="reward"))
    def compute_rm_score(self, data: DataProto) -> DataProto:
        """``rm_scores`` ``(batch, response_length)``: the score at each row's last valid response token."""
        from verl.workers.reward_manager.common import response_lengths

        if self.critic is None:
            raise RuntimeError("the reward model is not loaded yet; call init_model() on the worker group first")
        micro = self.config.get("micro_batch_size_per_gpu")
        use_dynamic = bool(self.config.get("use_dynamic_bsz", False))
        if micro is None and not use_dynamic:
            raise ValueError("reward_model.micro_batch_size_per_gpu is not set; set it or reward_model.use_dynamic_bsz")
        attention_mask = data.batch["attention_mask"]
        # score every position: the "response" is the whole sequence shifted by one, so values[:, j] is position j
        seq = DataProto.from_dict(tensors={
            "input_ids": data.batch["input_ids"],
            "attention_mask": attention_mask,
            "position_ids": data.batch["position_ids"],
            "responses": torch.nn.functional.pad(data.batch["input_ids"], (0, 1))[:, 1:],
        },
                                  meta_info={
                                      "micro_batch_size": micro,
                                      "use_dynamic_bsz": use_dynamic,
                                      "max_token_len": self.config.get("forward_max_token_len_per_gpu")
                                  })
        seq.batch["input_ids"] = torch.nn.functional.pad(seq.batch["input_ids"], (0, 1))
        seq.batch["attention_mask"] = torch.nn.functional.pad(attention_mask, (0, 1))
        seq.batch["position_ids"] = torch.nn.functional.pad(seq.batch["position_ids"], (0, 1))
        seq.batch["response_mask"] = torch.ones_like(seq.batch["responses"])
        if self._offload:
            self._load_phase(self.reward_module, None, True, False, False)
        try:
            per_token = self.critic.compute_values(seq)
        finally:
            if self._offload:
                self._offload_phase(self.reward_module, None, True, False, False)
        scores = per_token[torch.arange(len(data)), last_valid_token_index(attention_mask)]
        _, resp_lens = response_lengths(data)
        rm_scores = torch.zeros(data.batch["responses"].shape, dtype=torch.float32)
        rm_scores[torch.arange(len(data)), (resp_lens.cpu() - 1).clamp(min=0)] = scores.float()
        return DataProto.from_dict(tensors={"rm_scores": rm_scores})
