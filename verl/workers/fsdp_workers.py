"""Ray worker roles of the FSDP2 backend: the hybrid actor / rollout / reference worker, the critic and the reward
model.

Each class is a :class:`~verl.single_controller.base.Worker`; the driver builds a worker group from it and calls
the ``@register``-ed methods below, which split the batch over the ranks and join the results:

=========================================  =========================  ============================================
method                                     dispatch                   returns
=========================================  =========================  ============================================
``init_model``                             ONE_TO_ALL                 builds models, optimizers, rollout, ckpt mgr
``generate_sequences``                     n-d mesh ``"rollout"``     the rollout schema (``prompts``, ...)
``compute_log_prob``                       n-d mesh ``"actor"``       ``old_log_probs``, ``entropys``
``compute_ref_log_prob``                   n-d mesh ``"actor"``       ``ref_log_prob``
``update_actor``                           n-d mesh ``"actor"``       ``meta_info["metrics"]``
``compute_values``                         n-d mesh ``"critic"``      ``values``
``update_critic``                          n-d mesh ``"critic"``      ``meta_info["metrics"]``
``compute_rm_score``                       n-d mesh ``"reward"``      ``rm_scores`` (at the last valid token)
``save_checkpoint`` / ``load_checkpoint``  ONE_TO_ALL                 None
=========================================  =========================  ============================================

FSDP2 shards parameters over all ranks. Without sequence parallelism every rank is one data-parallel rank of its
mesh, so the n-d mesh modes behave like ``DP_COMPUTE_PROTO``. With ``ulysses_sequence_parallel_size = sp > 1``
(actor, reference, critic) the ranks form a ``(dp, sp)`` mesh: the ``"actor"`` / ``"critic"`` meshes declare
``dp_rank = rank // sp`` and collect only sp rank 0, so the sp ranks of a group receive the same rows and split
their packed tokens (Ulysses, :mod:`verl.utils.ulysses`) inside :class:`FSDPUlyssesShardingManager`; the rollout
mesh stays one dp rank per rank.

Batch sizes follow verl: ``ppo_mini_batch_size`` counts prompts for the whole group and becomes rows per dp rank
(``* rollout.n // dp_size``, ``dp_size = world_size // sp``) in ``__init__``; the deprecated global ``*_micro_batch_size`` become
``*_micro_batch_size_per_gpu``. The same code runs on CPU (gloo, fp32) and CUDA (NCCL, bf16 compute).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict

from verl.protocol import DataProto
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils.device import get_device, get_torch_device, is_cuda_available
from verl.utils.dp_update import cfg_get
from verl.utils.ulysses import check_ulysses_config
from verl.workers.config_helpers import (build_lr_scheduler, build_optimizer, load_tokenizer, normalize_micro_batch,
                                         update_model_config)
from verl.workers.role_common import (ROLES, ActorRolloutRefRole, CriticRole, RewardModelRole, init_distributed,
                                      last_valid_token_index, rm_scores_at_last_response_token)

__all__ = [
    "ActorRolloutRefWorker",
    "CriticWorker",
    "RewardModelWorker",
    "ROLES",
    "build_fsdp_model",
    "init_distributed",
]

logger = logging.getLogger(__name__)

_FSDP_STRATEGIES = ("fsdp", "fsdp2")

# ----------------------------------------------------------------------------------------------------------------------
# shared building blocks of the three roles
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _resident_on_device(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, offload_param: bool,
                        offload_optimizer: bool):
    """Bring offloaded parameters (and optimizer state, when given) onto the device for one phase (forward, update,
    checkpoint I/O) and offload them again afterwards, even when the phase fails."""
    from verl.utils.fsdp_utils import (load_fsdp_model_to_gpu, load_fsdp_optimizer, offload_fsdp_model_to_cpu,
                                       offload_fsdp_optimizer)

    reload_optimizer = optimizer is not None and offload_optimizer
    if offload_param:
        load_fsdp_model_to_gpu(module)
    if reload_optimizer:
        load_fsdp_optimizer(optimizer)
    try:
        yield
    finally:
        if offload_param:
            offload_fsdp_model_to_cpu(module)
        if reload_optimizer:
            offload_fsdp_optimizer(optimizer)


def _check_strategy(strategy: Any, key: str) -> None:
    if strategy is not None and str(strategy) not in _FSDP_STRATEGIES:
        raise ValueError(f"{key}={strategy!r} cannot run on the FSDP workers (verl.workers.fsdp_workers); use "
                         f"{' or '.join(_FSDP_STRATEGIES)}, or the Megatron workers for strategy=megatron")


def _check_unsupported(model_config: Any, where: str) -> None:
    if int(cfg_get(model_config, "lora_rank", 0) or 0) > 0:
        raise NotImplementedError(f"{where}.model.lora_rank > 0 (LoRA) is not supported by the FSDP workers; set "
                                  f"{where}.model.lora_rank=0")


def _ulysses_layout(worker: Worker, sp_size: int, mesh_name: str) -> None:
    """The ``(dp, sp)`` layout of a role: ``ulysses_device_mesh`` and its sharding manager, ``dp_size``, and the
    dispatch info of ``mesh_name`` (the sp ranks of one dp group get the same rows; sp rank 0 is collected)."""
    from verl.workers.sharding_manager.fsdp_ulysses import (FSDPUlyssesShardingManager, create_ulysses_device_mesh)

    world_size, rank = dist.get_world_size(), dist.get_rank()
    worker.ulysses_sequence_parallel_size = sp_size
    worker.ulysses_device_mesh = create_ulysses_device_mesh(world_size, sp_size)
    worker.ulysses_sharding_manager = FSDPUlyssesShardingManager(worker.ulysses_device_mesh)
    worker.dp_size = world_size // sp_size
    worker._register_dispatch_collect_info(mesh_name, dp_rank=rank // sp_size, is_collect=rank % sp_size == 0)


class _FSDPBackend:
    """What the FSDP actor and critic give their roles alike (:mod:`verl.workers.role_common`): the strategy check,
    Ulysses sequence parallelism around model calls, and a barrier after a checkpoint is written."""

    _check_strategy = staticmethod(_check_strategy)

    def _sp_context(self) -> ContextManager:
        return self.ulysses_sharding_manager

    def _checkpoint_saved(self) -> None:
        dist.barrier()


def _mixed_precision_policy(fsdp_config: Any) -> Any:
    from verl.utils.fsdp_utils import get_mixed_precision_policy

    mp = cfg_get(fsdp_config, "mixed_precision", None) or {}
    return get_mixed_precision_policy(param_dtype=cfg_get(mp, "param_dtype"), reduce_dtype=cfg_get(mp, "reduce_dtype"))


def build_fsdp_model(model_path: str,
                     auto_class: Any,
                     device_mesh: Any,
                     fsdp_config: Any = None,
                     trust_remote_code: bool = False,
                     override_config: Any = None,
                     extra_config: dict[str, Any] | None = None,
                     enable_gradient_checkpointing: bool = False,
                     use_liger: bool = False,
                     train: bool = True,
                     ulysses_sp_size: int = 1,
                     use_remove_padding: bool = False) -> tuple[torch.nn.Module, Any]:
    """Load a Hugging Face model and shard it with FSDP2 over ``device_mesh``; returns ``(module, hf_config)``.

    Rank 0 reads the weights, the other ranks build the model on the meta device and receive their shards from rank
    0, so host memory holds one full copy; weights the checkpoint lacks (a new head) are initialised from a fixed
    seed. ``extra_config`` (e.g. ``num_labels=1``) and then ``override_config``
    (``model.override_config``) update the transformers config; ``override_config.attn_implementation`` picks the
    attention kernel (default ``sdpa``). ``fsdp_config`` keys read: ``model_dtype`` (master weights, default fp32),
    ``mixed_precision.{param_dtype,reduce_dtype}``, ``offload_policy`` (FSDP2 CPU offload, accelerators only),
    ``reshard_after_forward``, ``wrap_policy.transformer_layer_cls_to_wrap``. ``ulysses_sp_size`` > 1 patches the
    attention for Ulysses sequence parallelism (:func:`verl.models.transformers.apply_monkey_patch`; needs
    ``use_remove_padding``, and heads divisible by the sp size).
    """
    from transformers import AutoConfig

    from verl.utils.fsdp_utils import (apply_fsdp2, apply_liger_kernel, enable_gradient_checkpointing as enable_gc,
                                       fsdp2_load_full_state_dict, get_fsdp_wrap_module_names, get_offload_policy,
                                       to_torch_dtype)

    if not model_path:
        raise ValueError("the model path is not set; set model.path to a Hugging Face model directory or hub id")
    try:
        hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise OSError(f"cannot load a model config from {model_path!r} ({exc}); model.path must be a Hugging Face "
                      "model directory or hub id") from exc
    update_model_config(hf_config, extra_config)
    overrides = OmegaConf.to_container(override_config, resolve=True) if isinstance(
        override_config, DictConfig) else dict(override_config or {})
    attn_implementation = overrides.pop("attn_implementation", None) or "sdpa"
    update_model_config(hf_config, overrides)
    dtype = to_torch_dtype(cfg_get(fsdp_config, "model_dtype"), torch.float32)
    rank = dist.get_rank() if dist.is_initialized() else 0
    common = dict(dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    if rank == 0:
        # a fixed seed for weights the checkpoint lacks (a new value / score head): runs are reproducible
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = auto_class.from_pretrained(model_path, config=hf_config, **common)
        full_state = module.state_dict()
    else:
        with torch.device("meta"):
            module = auto_class.from_config(hf_config, **common)
        full_state = None
    if train:
        module.config.use_cache = False
    if ulysses_sp_size > 1:
        from verl.models.transformers.monkey_patch import apply_monkey_patch

        apply_monkey_patch(module, ulysses_sp_size=ulysses_sp_size, use_remove_padding=use_remove_padding)
    if enable_gradient_checkpointing:
        enable_gc(module)
    if use_liger:
        apply_liger_kernel(module)
    offload = bool(cfg_get(fsdp_config, "offload_policy", False))
    extra_wrap = cfg_get(fsdp_config, "wrap_policy.transformer_layer_cls_to_wrap")
    apply_fsdp2(module,
                device_mesh,
                mp_policy=_mixed_precision_policy(fsdp_config),
                offload_policy=get_offload_policy(offload),
                reshard_after_forward=bool(cfg_get(fsdp_config, "reshard_after_forward", True)),
                wrap_module_names=get_fsdp_wrap_module_names(module, extra_wrap) if extra_wrap else None)
    fsdp2_load_full_state_dict(module, full_state, device_mesh, cpu_offload=offload and is_cuda_available())
    del full_state
    module.train(train)
    return module, hf_config


def _with_key(node: DictConfig, key: str, value: Any) -> DictConfig:
    with open_dict(node):
        node[key] = value
    return node


# ----------------------------------------------------------------------------------------------------------------------
# actor / rollout / reference
# ----------------------------------------------------------------------------------------------------------------------


class ActorRolloutRefWorker(_FSDPBackend, ActorRolloutRefRole):
    """One process of the hybrid engine: the FSDP2 actor, the rollout engine and/or the reference policy. The
    registered methods other than ``init_model`` are :class:`~verl.workers.role_common.ActorRolloutRefRole`'s.

    Args:
        config: the ``actor_rollout_ref`` config node (``model``, ``actor``, ``rollout``, ``ref``).
        role: ``actor``, ``rollout``, ``ref``, ``actor_rollout`` or ``actor_rollout_ref``.
    """

    def __init__(self, config: Any, role: str, **kwargs: Any) -> None:
        super().__init__()
        self._init_role(config, role)
        self.actor_module_fsdp = None
        self.ref_module_fsdp = None
        _check_unsupported(self.config.get("model"), "actor_rollout_ref")
        sp_size = self._ulysses_size()

        init_distributed(float(self.config.get("nccl_timeout", 600) or 600))
        from verl.utils.fsdp_utils import create_device_mesh

        world_size = dist.get_world_size()
        self.device_mesh = create_device_mesh(world_size, int(cfg_get(self.config, "actor.fsdp_config.fsdp_size", -1)))
        # actor / ref: (dp, sp) layout; the HF rollout: every rank is its own data-parallel rank
        _ulysses_layout(self, sp_size, "actor")
        self._register_dispatch_collect_info("rollout", dp_rank=dist.get_rank(), is_collect=True)

        actor_fsdp = cfg_get(self.config, "actor.fsdp_config", {})
        uses_offload_policy = bool(cfg_get(actor_fsdp, "offload_policy", False))
        self._is_offload_param = self._is_actor and bool(cfg_get(actor_fsdp, "param_offload",
                                                                 False)) and not uses_offload_policy
        self._is_offload_optimizer = self._is_actor and bool(cfg_get(actor_fsdp, "optimizer_offload",
                                                                     False)) and not uses_offload_policy
        self._is_offload_ref_param = self._is_ref and bool(cfg_get(self.config, "ref.fsdp_config.param_offload", False))

        self._normalize_batch_sizes()

    def _ulysses_size(self) -> int:
        """The sp size of the actor (or of the reference policy on a ``ref`` worker); both share the ``"actor"``
        dispatch mesh, so they must agree."""
        use_remove_padding = bool(cfg_get(self.config, "model.use_remove_padding", False))
        sizes = {}
        if self._is_actor:
            sizes["actor"] = int(cfg_get(self.config, "actor.ulysses_sequence_parallel_size", 1))
        if self._is_ref:
            sizes["ref"] = int(cfg_get(self.config, "ref.ulysses_sequence_parallel_size", sizes.get("actor", 1)))
        for name, size in sizes.items():
            check_ulysses_config(size, use_remove_padding, f"actor_rollout_ref.{name}.ulysses_sequence_parallel_size",
                                 "actor_rollout_ref.model.use_remove_padding")
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"actor_rollout_ref.actor.ulysses_sequence_parallel_size={sizes['actor']} and "
                f"actor_rollout_ref.ref.ulysses_sequence_parallel_size={sizes['ref']} differ, but the actor "
                "and the reference policy of one worker share its (dp, sp) layout; set them equal")
        return max(sizes.values(), default=1)

    # --------------------------------------------------------------------------------------------------- build ---
    def _model_kwargs(self) -> dict[str, Any]:
        model = self.config.model
        return dict(trust_remote_code=bool(model.get("trust_remote_code", False)),
                    override_config=model.get("override_config", None))

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        """Build the actor (model, optimizer, lr scheduler), rollout, reference policy and checkpoint manager."""
        from transformers import AutoModelForCausalLM

        from verl.utils.flops_counter import FlopsCounter
        from verl.utils.fsdp_utils import offload_fsdp_model_to_cpu, offload_fsdp_optimizer
        from verl.workers.actor import DataParallelPPOActor

        model_cfg, path, _ = self._load_model_files()
        use_remove_padding = bool(model_cfg.get("use_remove_padding", False))

        if self._is_actor or self._is_rollout:
            # the rollout-only role still keeps a sharded copy: it is where the rollout's weights come from
            fsdp_config = cfg_get(self.config, "actor.fsdp_config", {}) if self._is_actor else {}
            self.actor_module_fsdp, hf_config = build_fsdp_model(
                path,
                AutoModelForCausalLM,
                self.device_mesh,
                fsdp_config=fsdp_config,
                enable_gradient_checkpointing=self._is_actor and
                bool(model_cfg.get("enable_gradient_checkpointing", False)),
                use_liger=bool(model_cfg.get("use_liger", False)),
                train=self._is_actor,
                ulysses_sp_size=self.ulysses_sequence_parallel_size if self._is_actor else 1,
                use_remove_padding=use_remove_padding,
                **self._model_kwargs())
            self.hf_config = hf_config
            if self._is_actor:
                optim_config = self.config.actor.optim
                self.actor_optimizer = build_optimizer(self.actor_module_fsdp.parameters(), optim_config)
                self.actor_lr_scheduler = build_lr_scheduler(self.actor_optimizer, optim_config)

        if self._is_actor:
            _with_key(self.config.actor, "use_remove_padding", use_remove_padding)
            self.actor = DataParallelPPOActor(config=self.config.actor,
                                              actor_module=self.actor_module_fsdp,
                                              actor_optimizer=self.actor_optimizer)
            self.flops_counter = FlopsCounter(self.hf_config)
            from verl.utils.checkpoint import FSDPCheckpointManager

            self.checkpoint_manager = FSDPCheckpointManager(model=self.actor_module_fsdp,
                                                            optimizer=self.actor_optimizer,
                                                            lr_scheduler=self.actor_lr_scheduler,
                                                            processing_class=self.tokenizer,
                                                            checkpoint_config=cfg_get(self.config, "actor.checkpoint"))

        if self._is_rollout:
            self.rollout, self.rollout_sharding_manager = self._build_rollout()

        if self._is_ref:
            ref_cfg = self.config.get("ref") or OmegaConf.create({})
            self.ref_module_fsdp, _ = build_fsdp_model(path,
                                                       AutoModelForCausalLM,
                                                       self.device_mesh,
                                                       fsdp_config=ref_cfg.get("fsdp_config", {}),
                                                       train=False,
                                                       ulysses_sp_size=self.ulysses_sequence_parallel_size,
                                                       use_remove_padding=use_remove_padding,
                                                       **self._model_kwargs())
            _with_key(ref_cfg, "use_remove_padding", use_remove_padding)
            _with_key(ref_cfg, "ulysses_sequence_parallel_size", self.ulysses_sequence_parallel_size)
            self.ref_policy = DataParallelPPOActor(config=ref_cfg, actor_module=self.ref_module_fsdp)
            if self._is_offload_ref_param:
                offload_fsdp_model_to_cpu(self.ref_module_fsdp)

        if self._is_offload_param:
            offload_fsdp_model_to_cpu(self.actor_module_fsdp)
        if self._is_offload_optimizer:
            offload_fsdp_optimizer(self.actor_optimizer)
        get_torch_device().empty_cache()

    # --------------------------------------------------------------------------------------------------- hooks ---
    _hybrid_engine_prefix = "fsdp"  # rollout engines come from verl.workers.sharding_manager.fsdp_<name>

    def _hf_sharding_manager(self, module: torch.nn.Module, bucket_bytes: int, rollout_cfg: Any) -> Any:
        from verl.workers.sharding_manager import FSDPHFShardingManager

        return FSDPHFShardingManager(module=self.actor_module_fsdp,
                                     inference_module=module,
                                     bucket_bytes=bucket_bytes,
                                     offload_param=self._is_offload_param,
                                     offload_rollout=bool(rollout_cfg.get("free_cache_engine", True)),
                                     device_mesh=self.device_mesh)

    def _models_built(self) -> bool:
        return self.actor_module_fsdp is not None or self.ref_module_fsdp is not None

    def _phase_resident(self, phase: str) -> ContextManager:
        if phase == "ref_log_prob":
            return _resident_on_device(self.ref_module_fsdp, None, self._is_offload_ref_param, False)
        # updates and restores touch the optimizer state; forwards and saves (which read it where it lies) do not
        optimizer = self.actor_optimizer if phase in ("update", "load") else None
        return _resident_on_device(self.actor_module_fsdp, optimizer, self._is_offload_param,
                                   self._is_offload_optimizer)


# ----------------------------------------------------------------------------------------------------------------------
# critic
# ----------------------------------------------------------------------------------------------------------------------


class CriticWorker(_FSDPBackend, CriticRole):
    """The value model: an FSDP2 token-classification model with one label, trained on returns. The registered
    methods other than ``init_model`` are :class:`~verl.workers.role_common.CriticRole`'s.

    Args:
        config: the ``critic`` config node.
    """

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__()
        self._init_role(config)
        _check_unsupported(self.config.get("model"), "critic")
        sp_size = int(self.config.get("ulysses_sequence_parallel_size", 1) or 1)
        check_ulysses_config(sp_size, self._use_remove_padding(), "critic.ulysses_sequence_parallel_size",
                             "critic.model.use_remove_padding")
        init_distributed(float(self.config.get("nccl_timeout", 600) or 600))
        from verl.utils.fsdp_utils import create_device_mesh

        world_size = dist.get_world_size()
        self.device_mesh = create_device_mesh(world_size, int(cfg_get(self.config, "model.fsdp_config.fsdp_size", -1)))
        _ulysses_layout(self, sp_size, "critic")

        fsdp = cfg_get(self.config, "model.fsdp_config", {})
        uses_offload_policy = bool(cfg_get(fsdp, "offload_policy", False))
        self._is_offload_param = bool(cfg_get(fsdp, "param_offload", False)) and not uses_offload_policy
        self._is_offload_optimizer = bool(cfg_get(fsdp, "optimizer_offload", False)) and not uses_offload_policy

        self._normalize_batch_sizes()

    def _use_remove_padding(self) -> bool:
        return bool(
            cfg_get(self.config, "model.use_remove_padding", False) or
            cfg_get(self.config, "use_remove_padding", False))

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        """Build the value model (``critic.model.path`` with a fresh 1-label head), its optimizer and scheduler."""
        from transformers import AutoModelForTokenClassification

        from verl.utils.checkpoint import FSDPCheckpointManager
        from verl.utils.flops_counter import FlopsCounter
        from verl.utils.fsdp_utils import offload_fsdp_model_to_cpu, offload_fsdp_optimizer
        from verl.workers.critic import DataParallelPPOCritic

        model_cfg, path, trust = self._load_model_files()
        self.critic_module, hf_config = build_fsdp_model(path,
                                                         AutoModelForTokenClassification,
                                                         self.device_mesh,
                                                         fsdp_config=model_cfg.get("fsdp_config", {}),
                                                         trust_remote_code=trust,
                                                         override_config=model_cfg.get("override_config"),
                                                         extra_config={
                                                             "num_labels": 1,
                                                             "classifier_dropout": 0.0
                                                         },
                                                         enable_gradient_checkpointing=bool(
                                                             model_cfg.get("enable_gradient_checkpointing", False)),
                                                         train=True,
                                                         ulysses_sp_size=self.ulysses_sequence_parallel_size,
                                                         use_remove_padding=self._use_remove_padding())
        self.critic_optimizer = build_optimizer(self.critic_module.parameters(), self.config.optim)
        self.critic_lr_scheduler = build_lr_scheduler(self.critic_optimizer, self.config.optim)
        self.critic = DataParallelPPOCritic(config=self.config,
                                            critic_module=self.critic_module,
                                            critic_optimizer=self.critic_optimizer)
        self.flops_counter = FlopsCounter(hf_config)
        self.checkpoint_manager = FSDPCheckpointManager(model=self.critic_module,
                                                        optimizer=self.critic_optimizer,
                                                        lr_scheduler=self.critic_lr_scheduler,
                                                        processing_class=self.tokenizer,
                                                        checkpoint_config=self.config.get("checkpoint"))
        if self._is_offload_param:
            offload_fsdp_model_to_cpu(self.critic_module)
        if self._is_offload_optimizer:
            offload_fsdp_optimizer(self.critic_optimizer)

    # --------------------------------------------------------------------------------------------------- hooks ---
    def _set_forward_meta(self, data: DataProto) -> None:
        use_dynamic = bool(self.config.get("use_dynamic_bsz", False))
        micro = self.config.get("forward_micro_batch_size_per_gpu")
        if not use_dynamic and micro is None:
            raise ValueError(
                "critic.forward_micro_batch_size_per_gpu is not set; set it (or "
                "critic.ppo_micro_batch_size_per_gpu, which it defaults to) or critic.use_dynamic_bsz=True")
        data.meta_info["micro_batch_size"] = micro
        data.meta_info["max_token_len"] = self.config.get("forward_max_token_len_per_gpu")
        data.meta_info["use_dynamic_bsz"] = use_dynamic

    def _phase_resident(self, phase: str) -> ContextManager:
        # updates and restores touch the optimizer state; forwards and saves (which read it where it lies) do not
        optimizer = self.critic_optimizer if phase in ("update", "load") else None
        return _resident_on_device(self.critic_module, optimizer, self._is_offload_param, self._is_offload_optimizer)


# ----------------------------------------------------------------------------------------------------------------------
# reward model
# ----------------------------------------------------------------------------------------------------------------------


def _classifier_head(module: torch.nn.Module) -> torch.nn.Module | None:
    """The per-token scoring head of a sequence-classification model (``score`` in decoder models,
    ``classifier`` in encoders), whose output precedes the model's own pooling."""
    for name in ("score", "classifier"):
        head = getattr(module, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    return None


class RewardModelWorker(RewardModelRole):
    """A model-based reward: an FSDP2 sequence-classification model scoring whole (prompt, response) sequences.

    The score of a row is the model's output at the row's last valid token, placed at the last valid response token
    of ``rm_scores`` (zeros elsewhere), where the reward managers put rule-based scores too. When
    ``reward_model.model.input_tokenizer`` differs from the reward model's own tokenizer, the conversation is
    re-rendered with the reward model's chat template (needs ``raw_prompt``: ``data.return_raw_chat=True``).

    Args:
        config: the ``reward_model`` config node.
    """

    _check_strategy = staticmethod(_check_strategy)

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__()
        self._init_role(config)
        _check_unsupported(self.config.get("model"), "reward_model")
        rm_sp = int(self.config.get("ulysses_sequence_parallel_size", 1) or 1)
        if rm_sp != 1:
            raise NotImplementedError(f"reward_model.ulysses_sequence_parallel_size={rm_sp}: the reward model worker "
                                      "has no sequence parallelism; set reward_model.ulysses_sequence_parallel_size=1")
        init_distributed(float(self.config.get("nccl_timeout", 600) or 600))
        from verl.utils.fsdp_utils import create_device_mesh

        world_size = dist.get_world_size()
        self.device_mesh = create_device_mesh(world_size, int(cfg_get(self.config, "model.fsdp_config.fsdp_size", -1)))
        self.dp_size = world_size
        self._register_dispatch_collect_info("reward", dp_rank=dist.get_rank(), is_collect=True)
        self._is_offload_param = bool(cfg_get(self.config, "model.fsdp_config.param_offload", False))
        normalize_micro_batch(self.config, "micro_batch_size", "micro_batch_size_per_gpu", self.dp_size, "reward_model")
        self.reward_module = None
        self._head = None
        self.tokenizer = None
        self.input_tokenizer = None
        self._do_switch_chat_template = False

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        """Load the reward model (``reward_model.model.path``) and, when the policy's tokenizer differs, both
        tokenizers for re-rendering."""
        from transformers import AutoModelForSequenceClassification

        from verl.utils.fsdp_utils import offload_fsdp_model_to_cpu

        model_cfg, path, trust = self._reward_model_config()
        self.tokenizer = load_tokenizer(path, trust)
        input_path = model_cfg.get("input_tokenizer")
        if input_path and os.path.abspath(str(input_path)) != os.path.abspath(str(path)):
            self.input_tokenizer = load_tokenizer(input_path, trust)
            self._do_switch_chat_template = not _same_tokenizer(self.input_tokenizer, self.tokenizer)
        self.reward_module, _ = build_fsdp_model(path,
                                                 AutoModelForSequenceClassification,
                                                 self.device_mesh,
                                                 fsdp_config=model_cfg.get("fsdp_config", {}),
                                                 trust_remote_code=trust,
                                                 override_config=model_cfg.get("override_config"),
                                                 extra_config={"num_labels": 1},
                                                 train=False)
        self._head = _classifier_head(self.reward_module)
        if self._is_offload_param:
            offload_fsdp_model_to_cpu(self.reward_module)

    # ----------------------------------------------------------------------------------------------- scoring ---
    def _switch_chat_template(self, data: DataProto) -> DataProto:
        """Re-render each (prompt messages, decoded response) with the reward model's tokenizer, right-padded."""
        from verl.workers.reward_manager.common import response_lengths

        if "raw_prompt" not in data.non_tensor_batch:
            raise KeyError("the reward model's tokenizer differs from the policy's "
                           f"(reward_model.model.input_tokenizer={self.config.model.get('input_tokenizer')!r}), so the "
                           "conversation is re-rendered for it, which needs the chat messages: set "
                           "data.return_raw_chat=True (or set reward_model.model.input_tokenizer=null if both "
                           "tokenizers are the same)")
        _, resp_lens = response_lengths(data)
        responses = data.batch["responses"]
        texts = []
        for i in range(len(data)):
            response = self.input_tokenizer.decode(responses[i, :int(resp_lens[i])].tolist(), skip_special_tokens=True)
            chat = list(data.non_tensor_batch["raw_prompt"][i]) + [{"role": "assistant", "content": response}]
            texts.append(self.tokenizer.apply_chat_template(chat, tokenize=False))
        max_length = self.config.get("max_length")
        encoded = self.tokenizer(texts,
                                 add_special_tokens=False,
                                 padding="max_length" if max_length else "longest",
                                 truncation=bool(max_length),
                                 max_length=int(max_length) if max_length else None,
                                 padding_side="right",
                                 return_tensors="pt")
        attention_mask = encoded["attention_mask"]
        position_ids = torch.clamp(attention_mask.cumsum(-1) - 1, min=0)
        return DataProto.from_dict(tensors={
            "input_ids": encoded["input_ids"],
            "attention_mask": attention_mask,
            "position_ids": position_ids
        })

    def _score_micro_batch(self, batch: Any) -> torch.Tensor:
        """One scalar per row: the per-token score at the row's last valid token."""
        device = get_device()
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        position_ids = batch["position_ids"].to(device)
        captured: list[torch.Tensor] = []
        handle = None
        if self._head is not None:
            handle = self._head.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            output = self.reward_module(input_ids=input_ids,
                                        attention_mask=attention_mask,
                                        position_ids=position_ids,
                                        use_cache=False)
        finally:
            if handle is not None:
                handle.remove()
        rows = torch.arange(input_ids.shape[0], device=device)
        if captured and captured[-1].dim() == 3:
            return captured[-1][rows, last_valid_token_index(attention_mask), 0].float()
        return output.logits[:, 0].float()

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="reward"))
    def compute_rm_score(self, data: DataProto) -> DataProto:
        """``rm_scores`` ``(batch, response_length)``: the reward model's score at each row's last valid response
        token, zeros elsewhere."""
        from verl.utils.fsdp_utils import load_fsdp_model_to_gpu, offload_fsdp_model_to_cpu
        from verl.utils.seqlen_balancing import prepare_dynamic_batch, restore_dynamic_batch

        if self.reward_module is None:
            raise RuntimeError("the reward model is not loaded yet; call init_model() on the worker group first")
        if self._do_switch_chat_template:
            rm_data = self._switch_chat_template(data)
        else:
            rm_data = data.select(batch_keys=["input_ids", "attention_mask", "position_ids"], non_tensor_batch_keys=[])
        use_dynamic = bool(self.config.get("use_dynamic_bsz", False))
        batch_idx = None
        if use_dynamic:
            micro_batches, batch_idx = prepare_dynamic_batch(
                rm_data, max_token_len=self.config.get("forward_max_token_len_per_gpu"), same_micro_num_in_dp=True)
        else:
            micro = self.config.get("micro_batch_size_per_gpu")
            if micro is None:
                raise ValueError(
                    "reward_model.micro_batch_size_per_gpu is not set; set it (rows per device per forward "
                    "pass) or reward_model.use_dynamic_bsz=True")
            micro_batches = rm_data.split(int(micro))
        if self._is_offload_param:
            load_fsdp_model_to_gpu(self.reward_module)
        try:
            with torch.no_grad():
                scores = torch.cat([self._score_micro_batch(mb.batch) for mb in micro_batches], dim=0).cpu()
        finally:
            if self._is_offload_param:
                offload_fsdp_model_to_cpu(self.reward_module)
        if batch_idx is not None:
            scores = restore_dynamic_batch(scores, batch_idx)
        get_torch_device().empty_cache()
        return rm_scores_at_last_response_token(data, scores)


def _same_tokenizer(a: Any, b: Any) -> bool:
    """Same vocabulary and chat template: no need to re-render the conversation for the reward model."""
    return a.get_vocab() == b.get_vocab() and getattr(a, "chat_template", None) == getattr(b, "chat_template", None)
