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
import copy
import datetime
import importlib
import logging
import os
import resource
import time
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict

from verl.protocol import DataProto
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils.device import (get_device, get_device_name, get_nccl_backend, get_torch_device, is_cuda_available)
from verl.utils.dp_update import cfg_get
from verl.utils.ulysses import check_ulysses_config
from verl.workers.config_helpers import (build_lr_scheduler, build_optimizer, detach_config, import_external_libs,
                                         load_generation_config, load_tokenizer, normalize_micro_batch,
                                         normalize_ppo_mini_batch, update_model_config)

__all__ = [
    "ActorRolloutRefWorker",
    "CriticWorker",
    "RewardModelWorker",
    "ROLES",
    "build_fsdp_model",
    "init_distributed",
]

logger = logging.getLogger(__name__)

#: Roles of :class:`ActorRolloutRefWorker`.
ROLES = ("actor", "rollout", "ref", "actor_rollout", "actor_rollout_ref")

_FSDP_STRATEGIES = ("fsdp", "fsdp2")

# ----------------------------------------------------------------------------------------------------------------------
# shared building blocks of the three roles
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _resident_for_checkpoint_io(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, offload_param: bool,
                                offload_optimizer: bool):
    """Bring offloaded parameters (and optimizer state, when given) onto the device for checkpoint I/O and offload
    them again afterwards, even when the I/O fails, so actor and critic share one offload discipline."""
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


def _peak_memory_metrics() -> dict[str, float]:
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


def _mfu(flops_counter: Any, data: DataProto, delta_time: float, epochs: int, world_size: int) -> float:
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


def _current_lr(scheduler: Any) -> float:
    lr = scheduler.get_last_lr()[0]
    return float(lr.item() if torch.is_tensor(lr) else lr)


def _reduce_timing(timing: dict[str, float]) -> dict[str, float]:
    """Mean over ranks, so that every rank reports the same numbers (their ``meta_info`` must agree to concat)."""
    if not timing or not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(timing)
    keys = sorted(timing)
    device = get_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([float(timing[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values = (values / dist.get_world_size()).cpu().tolist()
    return dict(zip(keys, values))


def _with_key(node: DictConfig, key: str, value: Any) -> DictConfig:
    with open_dict(node):
        node[key] = value
    return node


# ----------------------------------------------------------------------------------------------------------------------
# actor / rollout / reference
# ----------------------------------------------------------------------------------------------------------------------


class ActorRolloutRefWorker(Worker):
    """One process of the hybrid engine: the FSDP2 actor, the rollout engine and/or the reference policy.

    Args:
        config: the ``actor_rollout_ref`` config node (``model``, ``actor``, ``rollout``, ``ref``).
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

        rollout_n = int(cfg_get(self.config, "rollout.n", 1))
        if self._is_actor:
            normalize_ppo_mini_batch(self.config.actor, rollout_n, self.dp_size, "actor_rollout_ref.actor")
        if self._is_rollout and "rollout" in self.config:
            normalize_micro_batch(self.config.rollout, "log_prob_micro_batch_size", "log_prob_micro_batch_size_per_gpu",
                                  self.dp_size, "actor_rollout_ref.rollout")
        if self._is_ref and "ref" in self.config:
            normalize_micro_batch(self.config.ref, "log_prob_micro_batch_size", "log_prob_micro_batch_size_per_gpu",
                                  self.dp_size, "actor_rollout_ref.ref")

        self.actor = None
        self.actor_module_fsdp = None
        self.actor_optimizer = None
        self.actor_lr_scheduler = None
        self.rollout = None
        self.rollout_sharding_manager = None
        self.ref_policy = None
        self.ref_module_fsdp = None
        self.checkpoint_manager = None
        self.flops_counter = None
        self.tokenizer = None
        self.generation_config = None

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

        model_cfg = self.config.model
        import_external_libs(model_cfg.get("external_lib"))
        path = model_cfg.get("path")
        if not path:
            raise ValueError("actor_rollout_ref.model.path is not set; set it to a Hugging Face model directory")
        trust = bool(model_cfg.get("trust_remote_code", False))
        self.tokenizer = load_tokenizer(model_cfg.get("tokenizer_path") or path, trust)
        self.generation_config = load_generation_config(path, trust)
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

    def _build_rollout(self) -> tuple[Any, Any]:
        """The rollout engine (``rollout.name``) with its own unsharded copy of the model, and the sharding manager
        that loads the actor's current weights into it before every generation."""
        from transformers import AutoModelForCausalLM

        from verl.utils.fsdp_utils import to_torch_dtype
        from verl.workers.rollout import get_rollout_class
        from verl.workers.sharding_manager import FSDPHFShardingManager

        rollout_cfg = self.config.rollout
        name, mode = str(rollout_cfg.get("name", "hf")), str(rollout_cfg.get("mode", "sync") or "sync")
        rollout_cls = get_rollout_class(name, mode)  # reports unknown names and missing engine packages
        if name != "hf":
            # engine backends own their hybrid-engine wiring: ``verl.workers.sharding_manager.fsdp_<name>`` exposes
            # ``build_hybrid_engine(worker, rollout_cls) -> (rollout, sharding_manager)``
            try:
                backend = importlib.import_module(f"verl.workers.sharding_manager.fsdp_{name}")
            except ModuleNotFoundError as err:
                if err.name != f"verl.workers.sharding_manager.fsdp_{name}":
                    raise
                raise NotImplementedError(f"actor_rollout_ref.rollout.name={name!r}: the FSDP worker has no hybrid "
                                          "engine for this backend; set actor_rollout_ref.rollout.name=hf") from None
            return backend.build_hybrid_engine(worker=self, rollout_cls=rollout_cls)
        # rollout.dtype (bf16) on accelerators; on CPU fp32, like the actor's compute dtype there. The weights are
        # random until the sharding manager copies the actor's in, before every generation, so none are read here.
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
        sharding_manager = FSDPHFShardingManager(module=self.actor_module_fsdp,
                                                 inference_module=module,
                                                 bucket_bytes=int(bucket_mb * (1 << 20)),
                                                 offload_param=self._is_offload_param,
                                                 offload_rollout=bool(rollout_cfg.get("free_cache_engine", True)),
                                                 device_mesh=self.device_mesh)
        return rollout, sharding_manager

    def _require(self, flag: bool, what: str) -> None:
        if not flag:
            raise RuntimeError(f"{what} is not available on a worker with role={self.role!r}")
        if (self.actor_module_fsdp is None and self.ref_module_fsdp is None):
            raise RuntimeError("the worker has no models yet; call init_model() on the worker group first")

    # --------------------------------------------------------------------------------------------------- rollout ---
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
        timing = _reduce_timing(timing)
        output = output.to("cpu")
        output.meta_info["timing"] = timing
        metrics = {f"timing_s/{k}": v for k, v in timing.items()}
        metrics.update(sync_metrics)
        output.meta_info["metrics"] = metrics
        get_torch_device().empty_cache()
        return output

    # ------------------------------------------------------------------------------------------------ log-probs ---
    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def compute_log_prob(self, data: DataProto) -> DataProto:
        """Log-probs of ``responses`` under the current actor (``old_log_probs``) and the policy's entropy
        (``entropys``), at the rollout's sampling temperature."""
        from verl.utils.fsdp_utils import load_fsdp_model_to_gpu, offload_fsdp_model_to_cpu

        self._require(self._is_actor, "compute_log_prob")
        rollout_cfg = self.config.get("rollout") or {}
        self._log_prob_meta(data, rollout_cfg, "actor_rollout_ref.rollout")
        if self._is_offload_param:
            load_fsdp_model_to_gpu(self.actor_module_fsdp)
        try:
            with self.ulysses_sharding_manager:
                log_probs, entropys = self.actor.compute_log_prob(data=data, calculate_entropy=True)
        finally:
            if self._is_offload_param:
                offload_fsdp_model_to_cpu(self.actor_module_fsdp)
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
        from verl.utils.fsdp_utils import load_fsdp_model_to_gpu, offload_fsdp_model_to_cpu

        self._require(self._is_ref, "compute_ref_log_prob")
        self._log_prob_meta(data, self.config.get("ref") or {}, "actor_rollout_ref.ref")
        if self._is_offload_ref_param:
            load_fsdp_model_to_gpu(self.ref_module_fsdp)
        try:
            with self.ulysses_sharding_manager:
                log_probs, _ = self.ref_policy.compute_log_prob(data=data, calculate_entropy=False)
        finally:
            if self._is_offload_ref_param:
                offload_fsdp_model_to_cpu(self.ref_module_fsdp)
        get_torch_device().empty_cache()
        return DataProto.from_dict(tensors={"ref_log_prob": log_probs}).to("cpu")

    def _log_prob_meta(self, data: DataProto, section: Any, label: str) -> None:
        """Micro-batching and temperature of a forward-only pass, from ``section`` (rollout or ref config)."""
        use_dynamic = bool(cfg_get(section, "log_prob_use_dynamic_bsz", False))
        micro = cfg_get(section, "log_prob_micro_batch_size_per_gpu")
        if not use_dynamic and micro is None:
            raise ValueError(f"{label}.log_prob_micro_batch_size_per_gpu is not set; set it (rows per device per "
                             f"forward pass) or {label}.log_prob_use_dynamic_bsz=True")
        data.meta_info["micro_batch_size"] = micro
        data.meta_info["max_token_len"] = cfg_get(section, "log_prob_max_token_len_per_gpu")
        data.meta_info["use_dynamic_bsz"] = use_dynamic
        data.meta_info["temperature"] = float(cfg_get(self.config, "rollout.temperature", 1.0))

    # --------------------------------------------------------------------------------------------------- update ---
    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data: DataProto) -> DataProto:
        """One PPO update of the actor on the batch; returns ``meta_info["metrics"]`` (``actor/*``,
        ``perf/mfu/actor``, ``perf/max_memory_allocated_gb``, ``actor/lr``) and steps the lr scheduler."""
        from verl.utils.fsdp_utils import (load_fsdp_model_to_gpu, load_fsdp_optimizer, offload_fsdp_model_to_cpu,
                                           offload_fsdp_optimizer)

        self._require(self._is_actor, "update_actor")
        if self._is_offload_param:
            load_fsdp_model_to_gpu(self.actor_module_fsdp)
        if self._is_offload_optimizer:
            load_fsdp_optimizer(self.actor_optimizer)
        data.meta_info.setdefault("temperature", float(cfg_get(self.config, "rollout.temperature", 1.0)))
        try:
            start = time.perf_counter()
            with self.ulysses_sharding_manager:
                metrics: dict[str, Any] = dict(self.actor.update_policy(data=data))
            delta_time = time.perf_counter() - start
            metrics["perf/mfu/actor"] = _mfu(self.flops_counter, data, delta_time,
                                             int(cfg_get(self.config, "actor.ppo_epochs", 1)), self.world_size)
            metrics.update(_peak_memory_metrics())
            metrics["actor/lr"] = _current_lr(self.actor_lr_scheduler)
            self.actor_lr_scheduler.step()
        finally:
            if self._is_offload_param:
                offload_fsdp_model_to_cpu(self.actor_module_fsdp)
            if self._is_offload_optimizer:
                offload_fsdp_optimizer(self.actor_optimizer)
        get_torch_device().empty_cache()
        return DataProto(meta_info={"metrics": metrics})

    # ----------------------------------------------------------------------------------------------- checkpoint ---
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self,
                        local_path: str,
                        hdfs_path: str | None = None,
                        global_step: int = 0,
                        max_ckpt_to_keep: int | None = None) -> None:
        """Write the actor's sharded model, optimizer, lr scheduler and RNG state to ``local_path``."""
        self._require(self._is_actor, "save_checkpoint")
        with _resident_for_checkpoint_io(self.actor_module_fsdp, None, self._is_offload_param, False):
            self.checkpoint_manager.save_checkpoint(local_path=local_path,
                                                    hdfs_path=hdfs_path,
                                                    global_step=global_step,
                                                    max_ckpt_to_keep=max_ckpt_to_keep)
            dist.barrier()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self,
                        local_path: str | None,
                        hdfs_path: str | None = None,
                        del_local_after_load: bool = False) -> None:
        """Restore what ``actor.checkpoint.load_contents`` names from ``local_path`` (None: nothing)."""
        self._require(self._is_actor, "load_checkpoint")
        with _resident_for_checkpoint_io(self.actor_module_fsdp, self.actor_optimizer, self._is_offload_param,
                                         self._is_offload_optimizer):
            self.checkpoint_manager.load_checkpoint(local_path=local_path,
                                                    hdfs_path=hdfs_path,
                                                    del_local_after_load=del_local_after_load)


# ----------------------------------------------------------------------------------------------------------------------
# critic
# ----------------------------------------------------------------------------------------------------------------------


class CriticWorker(Worker):
    """The value model: an FSDP2 token-classification model with one label, trained on returns.

    Args:
        config: the ``critic`` config node.
    """

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__()
        self.config = detach_config(config)
        _check_strategy(self.config.get("strategy"), "critic.strategy")
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

        normalize_ppo_mini_batch(self.config, int(self.config.get("rollout_n", 1) or 1), self.dp_size, "critic")
        normalize_micro_batch(self.config, "forward_micro_batch_size", "forward_micro_batch_size_per_gpu", self.dp_size,
                              "critic")
        self.critic = None
        self.critic_module = None
        self.critic_optimizer = None
        self.critic_lr_scheduler = None
        self.checkpoint_manager = None
        self.flops_counter = None

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

        model_cfg = self.config.get("model") or OmegaConf.create({})
        import_external_libs(model_cfg.get("external_lib"))
        path = model_cfg.get("path")
        if not path:
            raise ValueError("critic.model.path is not set; set it to a Hugging Face model directory (usually the "
                             "actor's model)")
        trust = bool(model_cfg.get("trust_remote_code", False))
        self.tokenizer = load_tokenizer(model_cfg.get("tokenizer_path") or path, trust)
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

    def _require_model(self) -> None:
        if self.critic is None:
            raise RuntimeError("the critic has no model yet; call init_model() on the worker group first")

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="critic"))
    def compute_values(self, data: DataProto) -> DataProto:
        """Values ``(batch, response_length)`` of the response positions (``values``)."""
        from verl.utils.fsdp_utils import load_fsdp_model_to_gpu, offload_fsdp_model_to_cpu

        self._require_model()
        use_dynamic = bool(self.config.get("use_dynamic_bsz", False))
        micro = self.config.get("forward_micro_batch_size_per_gpu")
        if not use_dynamic and micro is None:
            raise ValueError(
                "critic.forward_micro_batch_size_per_gpu is not set; set it (or "
                "critic.ppo_micro_batch_size_per_gpu, which it defaults to) or critic.use_dynamic_bsz=True")
        data.meta_info["micro_batch_size"] = micro
        data.meta_info["max_token_len"] = self.config.get("forward_max_token_len_per_gpu")
        data.meta_info["use_dynamic_bsz"] = use_dynamic
        if self._is_offload_param:
            load_fsdp_model_to_gpu(self.critic_module)
        try:
            with self.ulysses_sharding_manager:
                values = self.critic.compute_values(data=data)
        finally:
            if self._is_offload_param:
                offload_fsdp_model_to_cpu(self.critic_module)
        get_torch_device().empty_cache()
        return DataProto.from_dict(tensors={"values": values}).to("cpu")

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="critic"))
    def update_critic(self, data: DataProto) -> DataProto:
        """One value-regression update; returns ``meta_info["metrics"]`` (``critic/*``, ``perf/mfu/critic``,
        ``critic/lr``) and steps the lr scheduler."""
        from verl.utils.fsdp_utils import (load_fsdp_model_to_gpu, load_fsdp_optimizer, offload_fsdp_model_to_cpu,
                                           offload_fsdp_optimizer)

        self._require_model()
        if self._is_offload_param:
            load_fsdp_model_to_gpu(self.critic_module)
        if self._is_offload_optimizer:
            load_fsdp_optimizer(self.critic_optimizer)
        try:
            start = time.perf_counter()
            with self.ulysses_sharding_manager:
                metrics: dict[str, Any] = dict(self.critic.update_critic(data=data))
            delta_time = time.perf_counter() - start
            metrics["perf/mfu/critic"] = _mfu(self.flops_counter, data, delta_time,
                                              int(self.config.get("ppo_epochs", 1) or 1), self.world_size)
            metrics["critic/lr"] = _current_lr(self.critic_lr_scheduler)
            self.critic_lr_scheduler.step()
        finally:
            if self._is_offload_param:
                offload_fsdp_model_to_cpu(self.critic_module)
            if self._is_offload_optimizer:
                offload_fsdp_optimizer(self.critic_optimizer)
        get_torch_device().empty_cache()
        return DataProto(meta_info={"metrics": metrics})

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self,
                        local_path: str,
                        hdfs_path: str | None = None,
                        global_step: int = 0,
                        max_ckpt_to_keep: int | None = None) -> None:
        """Write the critic's sharded model, optimizer, lr scheduler and RNG state to ``local_path``."""
        self._require_model()
        with _resident_for_checkpoint_io(self.critic_module, None, self._is_offload_param, False):
            self.checkpoint_manager.save_checkpoint(local_path=local_path,
                                                    hdfs_path=hdfs_path,
                                                    global_step=global_step,
                                                    max_ckpt_to_keep=max_ckpt_to_keep)
            dist.barrier()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self,
                        local_path: str | None,
                        hdfs_path: str | None = None,
                        del_local_after_load: bool = False) -> None:
        """Restore what ``critic.checkpoint.load_contents`` names from ``local_path`` (None: nothing)."""
        self._require_model()
        with _resident_for_checkpoint_io(self.critic_module, self.critic_optimizer, self._is_offload_param,
                                         self._is_offload_optimizer):
            self.checkpoint_manager.load_checkpoint(local_path=local_path,
                                                    hdfs_path=hdfs_path,
                                                    del_local_after_load=del_local_after_load)


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


def last_valid_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last token with ``attention_mask`` 1 (0 for an all-padding row)."""
    cols = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (cols * attention_mask.bool().long()).argmax(dim=-1)


class RewardModelWorker(Worker):
    """A model-based reward: an FSDP2 sequence-classification model scoring whole (prompt, response) sequences.

    The score of a row is the model's output at the row's last valid token, placed at the last valid response token
    of ``rm_scores`` (zeros elsewhere), where the reward managers put rule-based scores too. When
    ``reward_model.model.input_tokenizer`` differs from the reward model's own tokenizer, the conversation is
    re-rendered with the reward model's chat template (needs ``raw_prompt``: ``data.return_raw_chat=True``).

    Args:
        config: the ``reward_model`` config node.
    """

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__()
        self.config = detach_config(config)
        _check_strategy(self.config.get("strategy"), "reward_model.strategy")
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

        model_cfg = self.config.get("model") or OmegaConf.create({})
        import_external_libs(model_cfg.get("external_lib"))
        path = model_cfg.get("path")
        if not path:
            raise ValueError("reward_model.model.path is not set; set it to a Hugging Face sequence-classification "
                             "model directory, or set reward_model.enable=False for rule-based rewards")
        trust = bool(model_cfg.get("trust_remote_code", False))
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
        from verl.workers.reward_manager.common import response_lengths

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
        _, resp_lens = response_lengths(data)
        responses = data.batch["responses"]
        rm_scores = torch.zeros(responses.shape, dtype=torch.float32)
        rm_scores[torch.arange(len(data)), (resp_lens.cpu() - 1).clamp(min=0)] = scores
        get_torch_device().empty_cache()
        return DataProto.from_dict(tensors={"rm_scores": rm_scores})


def _same_tokenizer(a: Any, b: Any) -> bool:
    """Same vocabulary and chat template: no need to re-render the conversation for the reward model."""
    return a.get_vocab() == b.get_vocab() and getattr(a, "chat_template", None) == getattr(b, "chat_template", None)
