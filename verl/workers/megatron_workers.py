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
TP rank 0 of the last pipeline stage is collected. For generation every rank holds the full weights after the
hybrid-engine sync and is its own DP rank: the Megatron weight generator
(:class:`~verl.workers.sharding_manager.megatron_hf.MegatronWeightGenerator`) feeds the HF rollout
(:mod:`~verl.workers.sharding_manager.megatron_hf`), vLLM (:mod:`~verl.workers.sharding_manager.megatron_vllm`) or
SGLang (:mod:`~verl.workers.sharding_manager.megatron_sglang`), whose engines shard the weights for their own
tensor-parallel layout (``rollout.tensor_model_parallel_size``, independent of the actor's).

Batch sizes follow verl: ``ppo_mini_batch_size`` (prompts) becomes rows per megatron DP rank. Offload
(``*.megatron.param_offload`` / ``grad_offload`` / ``optimizer_offload``) frees device memory between phases. On CPU
(gloo) megatron runs through :mod:`verl.utils.megatron_cpu`.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterator

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from verl.protocol import DataProto
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils.device import get_torch_device
from verl.utils.dp_update import cfg_get
from verl.workers.config_helpers import normalize_micro_batch
from verl.workers.role_common import (ActorRolloutRefRole, CriticRole, RewardModelRole, init_distributed,
                                      last_valid_token_index, rm_scores_at_last_response_token)

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
    """Shared set-up: ``torch.distributed``, megatron's parallel state, dispatch registration, offload state; the
    strategy check of the roles (:mod:`verl.workers.role_common`)."""

    _check_strategy = staticmethod(_check_strategy)

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

    @contextlib.contextmanager
    def _on_device(self, chunks: list, optimizer: Any, params: bool, grads: bool, optim: bool) -> Iterator[None]:
        """:meth:`_load_phase` for one phase and :meth:`_offload_phase` afterwards, even when the phase fails."""
        self._load_phase(chunks, optimizer, params, grads, optim)
        try:
            yield
        finally:
            self._offload_phase(chunks, optimizer, params, grads, optim)


# ----------------------------------------------------------------------------------------------------------------------
# actor / rollout / reference
# ----------------------------------------------------------------------------------------------------------------------


class ActorRolloutRefWorker(MegatronWorker, ActorRolloutRefRole):
    """The hybrid engine on Megatron-core: actor, rollout (HF, vLLM or SGLang) and/or reference policy in one
    process. The registered
    methods other than ``init_model`` are :class:`~verl.workers.role_common.ActorRolloutRefRole`'s.

    Args:
        config: the ``actor_rollout_ref`` node (``model``, ``actor``, ``rollout``, ``ref``; ``actor.megatron`` sizes).
        role: ``actor``, ``rollout``, ``ref``, ``actor_rollout`` or ``actor_rollout_ref``.
    """

    def __init__(self, config: Any, role: str, **kwargs: Any) -> None:
        super().__init__()
        self._init_role(config, role)
        self.actor_module = self.ref_module = None
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
        self._normalize_batch_sizes()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        """Build the actor's megatron chunks (from the HF checkpoint), optimizer and scheduler, the rollout with its
        hybrid engine, the reference policy and the checkpoint manager."""
        from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager
        from verl.utils.flops_counter import FlopsCounter
        from verl.utils.megatron_utils import MegatronLRScheduler, build_megatron_model, build_megatron_optimizer
        from verl.workers.actor.megatron_actor import MegatronPPOActor

        model_cfg, path, trust = self._load_model_files()
        self.hf_config = _hf_config(path, trust, model_cfg.get("override_config"))
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

    # --------------------------------------------------------------------------------------------------- hooks ---
    #: vLLM / SGLang: ``verl.workers.sharding_manager.megatron_<name>.build_hybrid_engine`` (see ``role_common``)
    _hybrid_engine_prefix = "megatron"

    def _hf_sharding_manager(self, module: torch.nn.Module, bucket_bytes: int, rollout_cfg: Any) -> Any:
        from verl.workers.sharding_manager.megatron_hf import MegatronHFShardingManager

        return MegatronHFShardingManager(self.actor_module,
                                         self.converter,
                                         inference_module=module,
                                         bucket_bytes=bucket_bytes,
                                         offload_param=self._offload_param,
                                         param_store=self._offload_store,
                                         offload_rollout=bool(rollout_cfg.get("free_cache_engine", True)))

    def _models_built(self) -> bool:
        return self.actor_module is not None or self.ref_module is not None

    def _phase_resident(self, phase: str) -> ContextManager:
        if phase == "ref_log_prob":
            return self._on_device(self.ref_module, None, self._offload_ref, False, False)
        if phase == "log_prob":
            return self._on_device(self.actor_module, None, self._offload_param, False, False)
        grads = self._offload_grad if phase == "update" else False  # checkpoints do not hold gradients
        return self._on_device(self.actor_module, self.actor_optimizer, self._offload_param, grads,
                               self._offload_optimizer)


# ----------------------------------------------------------------------------------------------------------------------
# critic
# ----------------------------------------------------------------------------------------------------------------------


class CriticWorker(MegatronWorker, CriticRole):
    """The value model on Megatron-core (``critic.megatron`` sizes). The registered methods other than
    ``init_model`` are :class:`~verl.workers.role_common.CriticRole`'s.

    Args:
        config: the ``critic`` config node.
    """

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__()
        self._init_role(config)
        self.megatron_config = self.config.get("megatron") or {}
        self._init_megatron(self.megatron_config, "critic.megatron", "critic",
                            float(self.config.get("nccl_timeout", 600) or 600))
        mcfg = self.megatron_config
        self._flags = (bool(cfg_get(mcfg, "param_offload",
                                    False)), bool(cfg_get(mcfg, "grad_offload",
                                                          False)), bool(cfg_get(mcfg, "optimizer_offload", False)))
        self._normalize_batch_sizes()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        """Build the value model (``critic.model.path`` with a one-output head), optimizer and scheduler."""
        from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager
        from verl.utils.flops_counter import FlopsCounter
        from verl.utils.megatron_utils import MegatronLRScheduler, build_megatron_model, build_megatron_optimizer
        from verl.workers.critic.megatron_critic import MegatronPPOCritic

        model_cfg, path, trust = self._load_model_files()
        self.hf_config = _hf_config(path, trust, model_cfg.get("override_config"))
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

    # --------------------------------------------------------------------------------------------------- hooks ---
    def _set_forward_meta(self, data: DataProto) -> None:
        use_dynamic = bool(self.config.get("use_dynamic_bsz", False))
        micro = self.config.get("forward_micro_batch_size_per_gpu") or self.config.get("ppo_micro_batch_size_per_gpu")
        if not use_dynamic and micro is None:
            raise ValueError(
                "critic.forward_micro_batch_size_per_gpu is not set; set it or critic.use_dynamic_bsz=True")
        data.meta_info.update(micro_batch_size=micro,
                              max_token_len=self.config.get("forward_max_token_len_per_gpu") or
                              self.config.get("ppo_max_token_len_per_gpu"),
                              use_dynamic_bsz=use_dynamic)

    def _phase_resident(self, phase: str) -> ContextManager:
        params, grads, optim = self._flags
        if phase == "forward":
            return self._on_device(self.critic_module, None, params, False, False)
        grads = grads if phase == "update" else False  # checkpoints do not hold gradients
        return self._on_device(self.critic_module, self.critic_optimizer, params, grads, optim)


# ----------------------------------------------------------------------------------------------------------------------
# reward model
# ----------------------------------------------------------------------------------------------------------------------


class RewardModelWorker(MegatronWorker, RewardModelRole):
    """A sequence-classification reward model on Megatron-core: the value head (loaded from the checkpoint's
    ``score.weight``) read at each row's last valid token and placed at the last valid response token of
    ``rm_scores``. The reward model must share the policy's tokenizer (``reward_model.model.input_tokenizer`` unset
    or equal).

    Args:
        config: the ``reward_model`` config node.
    """

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__()
        self._init_role(config)
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

        model_cfg, path, trust = self._reward_model_config()
        input_tok = model_cfg.get("input_tokenizer")
        if input_tok and str(input_tok) != str(path):
            raise NotImplementedError("reward_model.model.input_tokenizer differs from the reward model: the Megatron "
                                      "reward worker scores the policy's tokens as they are; use a reward model with "
                                      "the policy's tokenizer or reward_model.strategy=fsdp")
        self.hf_config = _hf_config(path, trust, model_cfg.get("override_config"))
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
        return rm_scores_at_last_response_token(data, scores)
