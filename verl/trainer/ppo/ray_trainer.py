"""The PPO driver: :class:`RayPPOTrainer` runs the RL dataflow as ordinary Python over Ray worker groups.

One training step (:meth:`RayPPOTrainer.fit`)::

    batch       <- next prompts from the dataloader, one uid per prompt
    gen         <- actor_rollout_wg.generate_sequences(prompts repeated rollout.n times, interleaved)
    batch       <- prompts repeated n times  U  gen           (then balanced across data-parallel ranks)
    reward      <- rm_wg.compute_rm_score (model reward, optional) and reward_fn (rules / custom function)
    old_log_probs <- actor_rollout_wg.compute_log_prob          ref_log_prob <- ref_policy_wg.compute_ref_log_prob
    values      <- critic_wg.compute_values                      (GAE only)
    rewards     <- scores - beta * KL(old || ref)                (algorithm.use_kl_in_reward)
    advantages  <- compute_advantage(...)                        (on the driver: cheap)
    critic_wg.update_critic(batch); actor_rollout_wg.update_actor(batch)   (actor after trainer.critic_warmup)

plus validation (``trainer.test_freq``, ``trainer.val_before_train``), metrics to :class:`~verl.utils.tracking.Tracking`,
checkpoints (``trainer.save_freq``; ``trainer.resume_mode``) and rollout/validation dumps (one ``{step}.jsonl`` per
step). Recipes subclass the trainer and override ``fit``, ``_validate``, ``_save_checkpoint``, ``_load_checkpoint``,
``_balance_batch`` or ``_create_dataloader``: those names and their signatures are kept stable.
"""
from __future__ import annotations

import inspect
import os
import uuid
import warnings
from collections import defaultdict
from copy import deepcopy
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional

import numpy as np
import ray
import torch
from omegaconf import OmegaConf, open_dict
from tqdm import tqdm

from verl.protocol import DataProto, pad_dataproto_to_divisor, unpad_dataproto
from verl.single_controller.base import Worker
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.single_controller.ray.base import create_colocated_worker_cls
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.core_algos import AdvantageEstimator, agg_loss
from verl.trainer.ppo.metric_utils import (compute_data_metrics, compute_throughout_metrics, compute_timing_metrics,
                                           flatten_validation_metrics, process_validation_metrics, reduce_metrics)
from verl.trainer.ppo.reward import compute_reward, compute_reward_async
from verl.utils.checkpoint import (atomic_torch_save, find_latest_ckpt_path, should_save_ckpt_esi,
                                   write_latest_checkpointed_iteration)
from verl.utils.config import cfg_select, need_critic, need_reference_policy, resolve_device
from verl.utils.rollout_dump import (SAMPLE_FIELDS, batch_sample_records, make_sample_records, write_metrics,
                                     write_samples)
from verl.utils.seqlen_balancing import get_seqlen_balanced_partitions, log_seqlen_unbalance
from verl.utils.timer import marked_timer
from verl.utils.torch_functional import masked_mean
from verl.utils.tracking import ValidationGenerationsLogger

__all__ = [
    "Role",
    "WorkerType",
    "ResourcePoolManager",
    "RayPPOTrainer",
    "AdvantageEstimator",
    "apply_kl_penalty",
    "compute_advantage",
    "compute_response_mask",
]

# torchdata's StatefulDataLoader calls a torch API that recent torch versions deprecate; nothing to act on.
warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated.*")

WorkerType = type[Worker]


class Role(Enum):
    """The roles a worker class can play. ``str(role)`` is the prefix of the role's methods in a colocated worker
    (``actor_rollout_generate_sequences``)."""

    Actor = 0
    Rollout = 1
    ActorRollout = 2
    Critic = 3
    RefPolicy = 4
    RewardModel = 5
    ActorRolloutRef = 6

    def __str__(self) -> str:
        return _ROLE_NAMES[self]


_ROLE_NAMES = {
    Role.Actor: "actor",
    Role.Rollout: "rollout",
    Role.ActorRollout: "actor_rollout",
    Role.Critic: "critic",
    Role.RefPolicy: "ref",
    Role.RewardModel: "rm",
    Role.ActorRolloutRef: "actor_rollout_ref",
}


@dataclass
class ResourcePoolManager:
    """Which processes each role runs on.

    ``resource_pool_spec`` names pools and their processes per node (``{"global_pool": [2]}``: 2 processes on one
    node); ``mapping`` assigns each :class:`Role` a pool. Roles that share a pool are fused into one process per slot
    (``create_colocated_worker_cls``). ``use_gpu``: one GPU per process; ``None`` asks ``verl.utils.device``.
    """

    resource_pool_spec: dict[str, list[int]]
    mapping: dict[Role, str]
    resource_pool_dict: dict[str, RayResourcePool] = field(default_factory=dict)
    use_gpu: Optional[bool] = None

    def create_resource_pool(self) -> None:
        """Reserve every pool (Ray placement groups); fails at once when the cluster cannot hold them."""
        for name, process_on_nodes in self.resource_pool_spec.items():
            if name in self.resource_pool_dict:
                continue
            # max_colocate_count=1: all roles of a pool live in one fused process per slot
            self.resource_pool_dict[name] = RayResourcePool(process_on_nodes=list(process_on_nodes),
                                                            use_gpu=self.use_gpu,
                                                            max_colocate_count=1,
                                                            name_prefix=f"{name}_{uuid.uuid4().hex[:6]}_")
        for name, pool in self.resource_pool_dict.items():
            pool.get_placement_groups()

    def get_resource_pool(self, role: Role) -> RayResourcePool:
        """The pool ``role`` runs on."""
        if role not in self.mapping:
            raise KeyError(f"role {role} has no resource pool in ResourcePoolManager.mapping ({self.mapping})")
        name = self.mapping[role]
        if name not in self.resource_pool_dict:
            raise KeyError(f"resource pool {name!r} of role {role} was not created; call create_resource_pool() first "
                           f"(pools in the spec: {list(self.resource_pool_spec)})")
        return self.resource_pool_dict[name]

    def get_n_gpus(self) -> int:
        """Processes (devices) over all pools: the denominator of per-device throughput."""
        return sum(sum(nodes) for nodes in self.resource_pool_spec.values())

    def shutdown(self) -> None:
        """Release the placement groups (after the worker groups on them are gone)."""
        for pool in self.resource_pool_dict.values():
            pool.shutdown()
        self.resource_pool_dict = {}


# ----------------------------------------------------------------------------------------------------------------------
# driver-side algorithm steps
# ----------------------------------------------------------------------------------------------------------------------


def compute_response_mask(data: DataProto) -> torch.Tensor:
    """1 for response tokens: the last ``responses.shape[-1]`` columns of the attention mask."""
    response_length = data.batch["responses"].shape[-1]
    return data.batch["attention_mask"][:, -response_length:]


def apply_kl_penalty(data: DataProto, kl_ctrl: Any, kl_penalty: str = "kl") -> tuple[DataProto, dict[str, float]]:
    """``token_level_rewards = token_level_scores - beta * KL(old_log_probs, ref_log_prob)`` on response tokens.

    ``beta`` is ``kl_ctrl.value``; the controller is then updated with the batch's mean per-sequence KL. Returns the
    data (modified in place) and ``actor/reward_kl_penalty`` / ``actor/reward_kl_penalty_coeff``.
    """
    for key in ("token_level_scores", "old_log_probs", "ref_log_prob"):
        if key not in data.batch.keys():
            raise KeyError(f"apply_kl_penalty needs batch[{key!r}] (present: {sorted(data.batch.keys())}); "
                           "compute rewards, old log-probs and reference log-probs first")
    if "response_mask" not in data.batch.keys():
        data.batch["response_mask"] = compute_response_mask(data)
    response_mask = data.batch["response_mask"].to(data.batch["token_level_scores"].dtype)
    kld = core_algos.kl_penalty(data.batch["old_log_probs"], data.batch["ref_log_prob"], kl_penalty=kl_penalty)
    kld = kld * response_mask
    beta = float(kl_ctrl.value)
    data.batch["token_level_rewards"] = data.batch["token_level_scores"] - beta * kld
    per_sequence = masked_mean(kld, response_mask, axis=-1)
    current_kl = float(torch.mean(per_sequence).item())
    kl_ctrl.update(current_kl=current_kl, n_steps=len(data))
    return data, {"actor/reward_kl_penalty": current_kl, "actor/reward_kl_penalty_coeff": beta}


def _call_with_supported_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Call ``fn`` with the keyword arguments it declares (all of them when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def compute_advantage(data: DataProto,
                      adv_estimator: Any,
                      gamma: float = 1.0,
                      lam: float = 1.0,
                      num_repeat: int = 1,
                      norm_adv_by_std_in_grpo: bool = True,
                      config: Any = None) -> DataProto:
    """Fill ``batch['advantages']`` and ``batch['returns']`` with the estimator registered as ``adv_estimator``.

    Needs ``token_level_rewards`` (and ``values`` for ``gae``, ``non_tensor_batch['uid']`` for group estimators,
    ``reward_baselines`` for ``remax``). ``num_repeat`` (= rollout.n) is accepted for compatibility: groups are
    found by uid. ``config`` is the ``algorithm`` config, passed through to the estimator.
    """
    if "token_level_rewards" not in data.batch.keys():
        raise KeyError("compute_advantage needs batch['token_level_rewards'] (set it from token_level_scores, or "
                       "apply_kl_penalty)")
    if "response_mask" not in data.batch.keys():
        data.batch["response_mask"] = compute_response_mask(data)
    name = adv_estimator.value if isinstance(adv_estimator, Enum) else str(adv_estimator)
    fn = core_algos.get_adv_estimator_fn(name)
    kwargs: dict[str, Any] = {
        "token_level_rewards": data.batch["token_level_rewards"],
        "response_mask": data.batch["response_mask"],
        "config": config,
    }
    if name == AdvantageEstimator.GAE.value:
        if "values" not in data.batch.keys():
            raise KeyError(
                "algorithm.adv_estimator=gae needs batch['values'] from the critic (critic_wg.compute_values)")
        kwargs.update(values=data.batch["values"], gamma=gamma, lam=lam)
    else:
        if name == AdvantageEstimator.GRPO.value:
            kwargs["norm_adv_by_std_in_grpo"] = norm_adv_by_std_in_grpo
        kwargs["gamma"] = gamma  # for the estimators that discount (reinforce_plus_plus); the others ignore it
    if "uid" in data.non_tensor_batch:
        kwargs["index"] = data.non_tensor_batch["uid"]
    if "reward_baselines" in data.batch.keys():
        kwargs["reward_baselines"] = data.batch["reward_baselines"]
    advantages, returns = _call_with_supported_kwargs(fn, kwargs)
    data.batch["advantages"] = advantages
    data.batch["returns"] = returns
    return data


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------

# non-tensor columns the rollout needs (moved to the generation batch); others stay with the prompts
_GEN_NON_TENSOR_KEYS = ("raw_prompt_ids", "multi_modal_data", "raw_prompt", "tools_kwargs", "interaction_kwargs",
                        "index", "agent_name")
_GEN_TENSOR_KEYS = ("input_ids", "attention_mask", "position_ids")
# meta_info keys of worker outputs that are reports, not data: they are taken out before a union
_REPORT_META_KEYS = ("metrics", "timing")


class RayPPOTrainer:
    """Runs PPO-family algorithms over Ray worker groups (see the module docstring for the step).

    Args:
        config: the full ``ppo_trainer.yaml`` tree (DictConfig).
        tokenizer: the policy's tokenizer (decoding for rewards, dumps and validation).
        role_worker_mapping: ``{Role: worker class}``; ``Role.ActorRollout`` is required, ``Role.Critic``,
            ``Role.RefPolicy`` and ``Role.RewardModel`` are used when present.
        resource_pool_manager: where each role runs.
        ray_worker_group_cls: the worker-group class (``RayWorkerGroup``).
        processor: multimodal processor (passed to datasets).
        reward_fn / val_reward_fn: reward managers for training / validation (``load_reward_manager``).
        train_dataset / val_dataset / collate_fn / train_sampler: built from ``config.data`` when not given.
        device_name: ``cuda`` or ``cpu``; default from ``trainer.device``.
    """

    def __init__(self,
                 config: Any,
                 tokenizer: Any,
                 role_worker_mapping: dict[Role, WorkerType],
                 resource_pool_manager: ResourcePoolManager,
                 ray_worker_group_cls: type[RayWorkerGroup] = RayWorkerGroup,
                 processor: Any = None,
                 reward_fn: Optional[Callable[..., Any]] = None,
                 val_reward_fn: Optional[Callable[..., Any]] = None,
                 train_dataset: Any = None,
                 val_dataset: Any = None,
                 collate_fn: Optional[Callable[..., Any]] = None,
                 train_sampler: Any = None,
                 device_name: Optional[str] = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.processor = processor
        self.reward_fn = reward_fn
        self.val_reward_fn = val_reward_fn

        self.hybrid_engine = bool(cfg_select(config, "actor_rollout_ref.hybrid_engine", True))
        if not self.hybrid_engine:
            raise NotImplementedError("actor_rollout_ref.hybrid_engine=False is not supported: actor and rollout "
                                      "share processes. Set actor_rollout_ref.hybrid_engine=True")
        if Role.ActorRollout not in role_worker_mapping and Role.ActorRolloutRef not in role_worker_mapping:
            raise ValueError(f"role_worker_mapping needs Role.ActorRollout (got {list(map(str, role_worker_mapping))})")

        self.role_worker_mapping = role_worker_mapping
        self.resource_pool_manager = resource_pool_manager
        self.ray_worker_group_cls = ray_worker_group_cls
        self.device_name = device_name or resolve_device(config)
        # LoRA: the reference policy is the actor with its adapter disabled, no separate worker
        self.ref_in_actor = (int(cfg_select(config, "actor_rollout_ref.model.lora_rank", 0) or 0) > 0 and
                             Role.RefPolicy not in role_worker_mapping)
        self.use_reference_policy = Role.RefPolicy in role_worker_mapping or (self.ref_in_actor and
                                                                              need_reference_policy(config))
        self.use_rm = Role.RewardModel in role_worker_mapping
        self.use_critic = need_critic(config)
        if self.use_critic and Role.Critic not in role_worker_mapping:
            raise ValueError("the config needs a critic (algorithm.adv_estimator=gae or critic.enable=True) but "
                             "role_worker_mapping has no Role.Critic")
        self.use_kl_in_reward = bool(cfg_select(config, "algorithm.use_kl_in_reward", False))
        if self.use_kl_in_reward:
            self.kl_ctrl_in_reward = core_algos.get_kl_controller(config.algorithm.kl_ctrl)
        if bool(cfg_select(config, "algorithm.use_pf_ppo", False)):
            raise NotImplementedError("algorithm.use_pf_ppo=True is not supported by this trainer; set "
                                      "algorithm.use_pf_ppo=False")
        for key in ("algorithm.rollout_correction.rollout_is", "algorithm.rollout_correction.rollout_rs"):
            if cfg_select(config, key):
                raise NotImplementedError(f"{key} is not supported by this trainer; set {key}=null")

        self.validation_generations_logger = ValidationGenerationsLogger(
            project_name=cfg_select(config, "trainer.project_name"),
            experiment_name=cfg_select(config, "trainer.experiment_name"))
        self.global_steps = 0
        self.max_steps_duration = 0.0
        self._worker_groups: list[RayWorkerGroup] = []
        self._create_dataloader(train_dataset, val_dataset, collate_fn, train_sampler)

    # ------------------------------------------------------------------------------------------------ data -----
    def _create_dataloader(self, train_dataset: Any, val_dataset: Any, collate_fn: Any, train_sampler: Any) -> None:
        """Train and validation dataloaders (``StatefulDataLoader``, so the position survives a resume), and the
        total number of training steps, which is written into the actor's and critic's optimizer configs."""
        from torchdata.stateful_dataloader import StatefulDataLoader

        data_cfg = self.config.data
        if train_dataset is None or val_dataset is None:
            from verl.utils.dataset.rl_dataset import get_dataset_class

            dataset_cls = get_dataset_class(data_cfg)
            if train_dataset is None:
                train_dataset = dataset_cls(data_files=data_cfg.train_files,
                                            tokenizer=self.tokenizer,
                                            config=data_cfg,
                                            processor=self.processor,
                                            max_samples=int(cfg_select(data_cfg, "train_max_samples", -1) or -1))
            if val_dataset is None and cfg_select(data_cfg, "val_files"):
                val_dataset = dataset_cls(data_files=data_cfg.val_files,
                                          tokenizer=self.tokenizer,
                                          config=data_cfg,
                                          processor=self.processor,
                                          max_samples=int(cfg_select(data_cfg, "val_max_samples", -1) or -1))
        if collate_fn is None:
            from verl.utils.dataset.rl_dataset import collate_fn as default_collate_fn

            collate_fn = default_collate_fn
        if train_sampler is None:
            from verl.utils.dataset.sampler import create_rl_sampler

            train_sampler = create_rl_sampler(data_cfg, train_dataset)
        self.train_dataset, self.val_dataset, self.train_sampler = train_dataset, val_dataset, train_sampler

        batch_size = int(cfg_select(data_cfg, "gen_batch_size", None) or cfg_select(data_cfg, "train_batch_size"))
        num_workers = int(cfg_select(data_cfg, "dataloader_num_workers", 0) or 0)
        if len(train_dataset) < batch_size:
            raise ValueError(f"the training set has {len(train_dataset)} prompts, fewer than one batch of "
                             f"data.train_batch_size={batch_size} (drop_last discards it, so nothing would train). "
                             "Lower data.train_batch_size or use more data")
        self.train_dataloader = StatefulDataLoader(dataset=train_dataset,
                                                   batch_size=batch_size,
                                                   num_workers=num_workers,
                                                   drop_last=True,
                                                   collate_fn=collate_fn,
                                                   sampler=train_sampler)
        self.val_dataloader = None
        if val_dataset is not None:
            val_batch_size = cfg_select(data_cfg, "val_batch_size") or len(val_dataset)
            self.val_dataloader = StatefulDataLoader(dataset=val_dataset,
                                                     batch_size=int(val_batch_size),
                                                     num_workers=num_workers,
                                                     shuffle=bool(cfg_select(data_cfg, "validation_shuffle", False)),
                                                     drop_last=False,
                                                     collate_fn=collate_fn)
        if len(self.train_dataloader) < 1:
            raise ValueError("the training dataloader is empty; check data.train_files and data.train_batch_size")

        total = len(self.train_dataloader) * int(cfg_select(self.config, "trainer.total_epochs", 1) or 1)
        explicit = cfg_select(self.config, "trainer.total_training_steps")
        if explicit is not None:
            total = int(explicit)
        self.total_training_steps = total
        print(
            f"[verl] {len(self.train_dataloader)} training batches per epoch, {len(self.val_dataloader or [])} "
            f"validation batches; total training steps: {total}",
            flush=True)
        with open_dict(self.config):
            if cfg_select(self.config, "actor_rollout_ref.actor.optim") is not None:
                self.config.actor_rollout_ref.actor.optim.total_training_steps = total
            if cfg_select(self.config, "critic.optim") is not None:
                self.config.critic.optim.total_training_steps = total

    # --------------------------------------------------------------------------------------------- workers -----
    def init_workers(self) -> None:
        """Reserve the resource pools, start one fused worker process per slot (all roles of a pool colocated),
        and build each role's model; the actor/rollout last, once the others hold their memory."""
        self.resource_pool_manager.create_resource_pool()
        pool_to_cls: dict[RayResourcePool, dict[str, RayClassWithInitArgs]] = {
            pool: {} for pool in self.resource_pool_manager.resource_pool_dict.values()
        }

        actor_role = Role.ActorRollout if Role.ActorRollout in self.role_worker_mapping else Role.ActorRolloutRef
        pool = self.resource_pool_manager.get_resource_pool(actor_role)
        pool_to_cls[pool][str(Role.ActorRollout)] = RayClassWithInitArgs(cls=self.role_worker_mapping[actor_role],
                                                                         config=self.config.actor_rollout_ref,
                                                                         role=str(actor_role))
        if self.use_critic:
            pool = self.resource_pool_manager.get_resource_pool(Role.Critic)
            pool_to_cls[pool][str(Role.Critic)] = RayClassWithInitArgs(cls=self.role_worker_mapping[Role.Critic],
                                                                       config=self.config.critic)
        if self.use_reference_policy:
            pool = self.resource_pool_manager.get_resource_pool(Role.RefPolicy)
            pool_to_cls[pool][str(Role.RefPolicy)] = RayClassWithInitArgs(cls=self.role_worker_mapping[Role.RefPolicy],
                                                                          config=self.config.actor_rollout_ref,
                                                                          role=str(Role.RefPolicy))
        if self.use_rm:
            pool = self.resource_pool_manager.get_resource_pool(Role.RewardModel)
            pool_to_cls[pool][str(Role.RewardModel)] = RayClassWithInitArgs(
                cls=self.role_worker_mapping[Role.RewardModel], config=self.config.reward_model)

        wg_kwargs: dict[str, Any] = {}
        timeout = cfg_select(self.config, "trainer.ray_wait_register_center_timeout")
        if timeout is not None:
            wg_kwargs["ray_wait_register_center_timeout"] = timeout
        if self.device_name == "cpu":
            wg_kwargs["worker_env"] = {"VERL_DEVICE": "cpu"}  # CPU run on a machine that may have GPUs
        all_wg: dict[str, RayWorkerGroup] = {}
        for pool, class_dict in pool_to_cls.items():
            if not class_dict:
                continue
            fused_cls = create_colocated_worker_cls(class_dict=class_dict)
            wg_dict = self.ray_worker_group_cls(resource_pool=pool, ray_cls_with_init=fused_cls, **wg_kwargs)
            self._worker_groups.append(wg_dict)
            all_wg.update(wg_dict.spawn(prefix_set=class_dict.keys()))

        if self.use_critic:
            self.critic_wg = all_wg[str(Role.Critic)]
            self.critic_wg.init_model()
        if self.use_reference_policy and not self.ref_in_actor:
            self.ref_policy_wg = all_wg[str(Role.RefPolicy)]
            self.ref_policy_wg.init_model()
        if self.use_rm:
            self.rm_wg = all_wg[str(Role.RewardModel)]
            self.rm_wg.init_model()
        self.actor_rollout_wg = all_wg[str(Role.ActorRollout)]
        self.actor_rollout_wg.init_model()
        self._init_async_rollout()

    def _init_async_rollout(self) -> None:
        """``rollout.mode=async``: an agent-loop manager over the servers the actor workers launched; the actor's
        weights are pushed to them before the next generation whenever they changed (start, resume, update)."""
        self.async_rollout_manager = None
        self._rollout_weights_stale = False
        self._rollout_weight_version = -1
        if str(cfg_select(self.config, "actor_rollout_ref.rollout.mode", "sync")) != "async":
            return
        from verl.experimental.agent_loop import AgentLoopManager

        self.async_rollout_manager = AgentLoopManager(self.config,
                                                      tokenizer=self.tokenizer,
                                                      worker_group=self.actor_rollout_wg)
        self._rollout_weights_stale = True

    def shutdown(self) -> None:
        """Stop the worker processes and release their resource pools (for drivers that run several trainers in
        one Ray cluster; a finished driver process releases them anyway)."""
        for wg in self._worker_groups:
            wg.shutdown()
        self._worker_groups = []
        self.resource_pool_manager.shutdown()

    # ---------------------------------------------------------------------------------------------- pieces -----
    def _get_gen_batch(self, batch: DataProto) -> DataProto:
        """Move what the rollout needs (prompt tensors, raw prompt ids, tool kwargs, ...) out of ``batch``."""
        tensor_keys = [k for k in _GEN_TENSOR_KEYS if k in batch.batch.keys()]
        non_tensor_keys = [k for k in _GEN_NON_TENSOR_KEYS if k in batch.non_tensor_batch]
        return batch.pop(batch_keys=tensor_keys, non_tensor_batch_keys=non_tensor_keys)

    def _generate(self, gen_batch: DataProto) -> DataProto:
        """``generate_sequences`` with the batch padded to a multiple of the rollout's world size (``rollout.mode=
        async``: the agent-loop manager, after pushing the actor's weights to the servers if they changed)."""
        if getattr(self, "async_rollout_manager", None) is not None:
            push_metrics: dict[str, float] = {}
            if self._rollout_weights_stale:
                stats = self.actor_rollout_wg.update_rollout_weights()[0]
                self._rollout_weights_stale = False
                self._rollout_weight_version = int(stats.get("weight_version", -1))
                push_metrics["timing_s/update_rollout_weights"] = float(stats.get("seconds", 0.0))
            output = self.async_rollout_manager.generate_sequences(gen_batch)
            release = getattr(self.actor_rollout_wg, "release_rollout_memory", None)
            if release is not None and any(release()):  # GPU, colocated: the server's memory goes to training
                self._rollout_weights_stale = True
            push_metrics["rollout/weight_version"] = float(self._rollout_weight_version)
            output.meta_info.setdefault("metrics", {}).update(push_metrics)
            return output
        padded, pad_size = pad_dataproto_to_divisor(gen_batch, self.actor_rollout_wg.world_size)
        output = self.actor_rollout_wg.generate_sequences(padded)
        return unpad_dataproto(output, pad_size)

    @staticmethod
    def _take_reports(output: DataProto,
                      metrics: Optional[dict[str, Any]] = None,
                      timing_raw: Optional[dict[str, float]] = None) -> DataProto:
        """Take ``metrics``/``timing`` out of a worker output's meta_info (into ``metrics`` / ``timing_raw``)."""
        reported = output.meta_info.pop("metrics", None)
        if reported and metrics is not None:
            metrics.update(reduce_metrics(reported))
        timing = output.meta_info.pop("timing", None)
        if timing and timing_raw is not None:
            for key, value in timing.items():
                timing_raw[key] = timing_raw.get(key, 0.0) + float(value)
        return output

    def _balance_batch(self, batch: DataProto, metrics: dict[str, Any], logging_prefix: str = "global_seqlen") -> None:
        """Reorder rows so every data-parallel rank gets about the same number of tokens (the worker group splits
        the batch into equal consecutive chunks)."""
        attention_mask = batch.batch["attention_mask"]
        batch_size = attention_mask.shape[0]
        world_size = self.actor_rollout_wg.world_size
        if batch_size % world_size:
            warnings.warn(
                f"_balance_batch: {batch_size} rows do not split evenly over {world_size} ranks; not "
                "balancing this batch",
                stacklevel=2)
            return
        seqlens = attention_mask.reshape(batch_size, -1).sum(-1).tolist()
        partitions = get_seqlen_balanced_partitions(seqlens, k_partitions=world_size, equal_size=True)
        order = torch.tensor([i for part in partitions for i in sorted(part)], dtype=torch.long)
        batch.reorder(order)
        metrics.update(log_seqlen_unbalance(seqlen_list=seqlens, partitions=partitions, prefix=logging_prefix))

    def _dump_generations(self, inputs: list[str], outputs: list[str], gts: list[Any], scores: list[float],
                          reward_extra_infos_dict: dict[str, list], dump_path: str) -> None:
        """Write ``{dump_path}/{global_steps}.jsonl``, one sample record per line (the format of
        :mod:`verl.utils.rollout_dump`): per-sample lists named like a sample field (``uid``, ``advantages``, ...)
        fill that field, the others are reward components."""
        fields = {k: v for k, v in reward_extra_infos_dict.items() if k in SAMPLE_FIELDS}
        extra = {k: v for k, v in reward_extra_infos_dict.items() if k not in SAMPLE_FIELDS}
        self._write_dump(make_sample_records(self.global_steps, inputs, outputs, gts, scores, extra, fields), dump_path)

    def _write_dump(self, records: list[dict], dump_path: str) -> None:
        filename = write_samples(dump_path, self.global_steps, records)
        print(f"[verl] dumped {len(records)} generations to {filename}", flush=True)

    def _log_rollout_data(self, batch: DataProto, reward_extra_infos_dict: dict[str, list],
                          timing_raw: dict[str, float], rollout_data_dir: str) -> None:
        """Dump this step's training rollouts (scores, reward components, advantages, log-prob statistics) to
        ``rollout_data_dir``; the step's metrics follow in its ``metrics.jsonl`` (:mod:`verl.utils.rollout_dump`)."""
        with marked_timer("dump_rollout_generations", timing_raw):
            records = batch_sample_records(batch,
                                           self.tokenizer,
                                           self.global_steps,
                                           reward_extra_info=reward_extra_infos_dict)
            self._write_dump(records, rollout_data_dir)

    def _maybe_log_val_generations(self, inputs: list[str], outputs: list[str], scores: list[float]) -> None:
        """Log ``trainer.log_val_generations`` samples (a fixed random choice) as a table to the trackers."""
        count = int(cfg_select(self.config, "trainer.log_val_generations", 0) or 0)
        if count <= 0:
            return
        samples = sorted(zip(inputs, outputs, scores), key=lambda s: s[0])
        rng = np.random.RandomState(42)
        rng.shuffle(samples)
        self.validation_generations_logger.log(cfg_select(self.config, "trainer.logger", ["console"]), samples[:count],
                                               self.global_steps)

    # ------------------------------------------------------------------------------------------ validation -----
    def _validate(self) -> dict[str, float]:
        """Generate for the whole validation set with ``rollout.val_kwargs`` (greedy by default), score with
        ``val_reward_fn`` and return ``val-core/<data_source>/<var>/mean@N`` and related metrics."""
        if self.val_dataloader is None or self.val_reward_fn is None:
            return {}
        val_kwargs = self.config.actor_rollout_ref.rollout.val_kwargs
        n = int(cfg_select(val_kwargs, "n", 1) or 1)
        data_sources: list[np.ndarray] = []
        sample_inputs: list[str] = []
        sample_outputs: list[str] = []
        sample_scores: list[float] = []
        sample_uids: list[str] = []
        extra_infos: dict[str, list] = defaultdict(list)
        val_data_dir = cfg_select(self.config, "trainer.validation_data_dir")
        dump_records: list[dict] = []

        for test_data in self.val_dataloader:
            test_batch = DataProto.from_single_dict(test_data)
            if "uid" not in test_batch.non_tensor_batch:
                test_batch.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(test_batch))],
                                                              dtype=object)
            test_batch = test_batch.repeat(repeat_times=n, interleave=True)
            reward_styles = test_batch.non_tensor_batch.get("reward_model")
            if reward_styles is not None and len(reward_styles) and isinstance(reward_styles[0], dict) and \
                    reward_styles[0].get("style") == "model":
                return {}  # model-based rewards are not validated (as upstream)
            sample_inputs.extend(self.tokenizer.batch_decode(test_batch.batch["input_ids"], skip_special_tokens=True))
            sample_uids.extend(test_batch.non_tensor_batch["uid"].tolist())

            test_gen_batch = self._get_gen_batch(test_batch)
            test_gen_batch.meta_info = {
                "eos_token_id": self.tokenizer.eos_token_id,
                "pad_token_id": self.tokenizer.pad_token_id,
                "recompute_log_prob": False,
                "do_sample": bool(cfg_select(val_kwargs, "do_sample", False)),
                "validate": True,
                "global_steps": self.global_steps,
            }
            output = self._take_reports(self._generate(test_gen_batch))
            sample_outputs.extend(self.tokenizer.batch_decode(output.batch["responses"], skip_special_tokens=True))
            test_batch = test_batch.union(output)
            test_batch.meta_info["validate"] = True
            reward_tensor, extra = compute_reward(test_batch, self.val_reward_fn)
            scores = reward_tensor.sum(-1).cpu().tolist()
            sample_scores.extend(scores)
            extra_infos["reward"].extend(scores)
            for key, values in extra.items():
                extra_infos[key].extend(values)
            if val_data_dir:
                dump_records.extend(batch_sample_records(test_batch, self.tokenizer, self.global_steps, scores, extra))
            sources = test_batch.non_tensor_batch.get("data_source")
            data_sources.append(sources if sources is not None else np.array(["unknown"] * len(scores), dtype=object))

        self._maybe_log_val_generations(sample_inputs, sample_outputs, sample_scores)
        total = len(sample_scores)
        extra_infos = {k: v for k, v in extra_infos.items() if len(v) == total}
        if val_data_dir:
            self._write_dump(dump_records, val_data_dir)
        if total == 0:
            return {}
        sources = np.concatenate(data_sources, axis=0).tolist()
        per_source = process_validation_metrics(sources, sample_uids, extra_infos)
        val_metrics = flatten_validation_metrics(per_source)
        if val_data_dir:
            write_metrics(val_data_dir, self.global_steps, val_metrics)
        return val_metrics

    # ------------------------------------------------------------------------------------------ checkpoints ----
    def _checkpoint_root(self) -> str:
        return os.path.abspath(os.path.expanduser(str(self.config.trainer.default_local_dir)))

    def _save_checkpoint(self) -> None:
        """``default_local_dir/global_step_N/{actor,critic,data.pt}``, then the tracker file (atomically, last)."""
        root = self._checkpoint_root()
        step_dir = os.path.join(root, f"global_step_{self.global_steps}")
        print(f"[verl] saving checkpoint of step {self.global_steps} to {step_dir}", flush=True)
        hdfs = cfg_select(self.config, "trainer.default_hdfs_dir")
        trainer_cfg = self.config.trainer
        max_actor = cfg_select(trainer_cfg, "max_actor_ckpt_to_keep")
        max_critic = cfg_select(trainer_cfg, "max_critic_ckpt_to_keep")
        if bool(cfg_select(trainer_cfg, "remove_previous_ckpt_in_save", False)):
            warnings.warn(
                "trainer.remove_previous_ckpt_in_save is deprecated; use trainer.max_actor_ckpt_to_keep=1 "
                "and trainer.max_critic_ckpt_to_keep=1",
                stacklevel=2)
            max_actor = max_critic = 1
        remote = (lambda name: None) if not hdfs else (
            lambda name: os.path.join(str(hdfs), f"global_step_{self.global_steps}", name))
        self.actor_rollout_wg.save_checkpoint(os.path.join(step_dir, "actor"),
                                              remote("actor"),
                                              self.global_steps,
                                              max_ckpt_to_keep=max_actor)
        if self.use_critic:
            self.critic_wg.save_checkpoint(os.path.join(step_dir, "critic"),
                                           remote("critic"),
                                           self.global_steps,
                                           max_ckpt_to_keep=max_critic)
        atomic_torch_save(self.train_dataloader.state_dict(), os.path.join(step_dir, "data.pt"))
        write_latest_checkpointed_iteration(root, self.global_steps)

    def _load_checkpoint(self) -> int:
        """Resume per ``trainer.resume_mode`` (``auto``: the latest checkpoint under ``default_local_dir``, if any;
        ``resume_path``: ``trainer.resume_from_path``; ``disable``: start fresh). Sets ``global_steps``; returns it."""
        mode = str(cfg_select(self.config, "trainer.resume_mode", "auto") or "auto")
        if mode == "disable":
            return 0
        if cfg_select(self.config, "trainer.default_hdfs_dir"):
            raise NotImplementedError("loading checkpoints from trainer.default_hdfs_dir is not implemented; copy the "
                                      "checkpoint locally and use trainer.resume_mode=resume_path")
        root = self._checkpoint_root()
        if mode == "auto":
            folder = find_latest_ckpt_path(root)
            if folder is None:
                print("[verl] no checkpoint found: training from scratch", flush=True)
                return 0
        elif mode == "resume_path":
            path = cfg_select(self.config, "trainer.resume_from_path")
            if not isinstance(path, str) or "global_step_" not in path:
                raise ValueError(f"trainer.resume_from_path must name a .../global_step_N directory when "
                                 f"trainer.resume_mode=resume_path, got {path!r}")
            folder = os.path.abspath(os.path.expanduser(path))
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"trainer.resume_from_path={path!r}: directory {folder} does not exist")
        else:
            raise ValueError(f"trainer.resume_mode={mode!r} is unknown; use auto, disable or resume_path")

        print(f"[verl] resuming from checkpoint {folder}", flush=True)
        self.global_steps = int(os.path.basename(folder.rstrip(os.sep)).split("global_step_")[-1])
        del_local = bool(cfg_select(self.config, "trainer.del_local_ckpt_after_load", False))
        self.actor_rollout_wg.load_checkpoint(os.path.join(folder, "actor"), del_local_after_load=del_local)
        if self.use_critic:
            self.critic_wg.load_checkpoint(os.path.join(folder, "critic"), del_local_after_load=del_local)
        data_path = os.path.join(folder, "data.pt")
        if os.path.isfile(data_path):
            state = torch.load(data_path, weights_only=False)
            self.train_dataloader.load_state_dict(state)
        else:
            warnings.warn(f"no dataloader state at {data_path}: the data order restarts from the beginning",
                          stacklevel=2)
        return self.global_steps

    # ------------------------------------------------------------------------------------------------ fit ------
    def _make_tracker(self) -> Any:
        from verl.utils.tracking import Tracking

        return Tracking(project_name=self.config.trainer.project_name,
                        experiment_name=self.config.trainer.experiment_name,
                        default_backend=cfg_select(self.config, "trainer.logger", ["console"]),
                        config=OmegaConf.to_container(self.config, resolve=True))

    def _old_log_prob_needed(self, batch: DataProto) -> bool:
        """False when the actor update is on-policy (one epoch over one mini-batch) and nothing else reads
        ``old_log_probs``: the policy ratio is then exactly 1 and the actor uses its own detached log-probs, so the
        pass would cost a full forward over the batch for nothing (``actor.skip_on_policy_old_log_prob``)."""
        actor = self.config.actor_rollout_ref.actor
        if not bool(cfg_select(actor, "skip_on_policy_old_log_prob", True)) or self.use_kl_in_reward:
            return True
        rows_per_mini_batch = int(cfg_select(actor, "ppo_mini_batch_size", 0)) * int(
            cfg_select(self.config, "actor_rollout_ref.rollout.n", 1))
        return int(cfg_select(actor, "ppo_epochs", 1)) != 1 or len(batch) > rows_per_mini_batch

    def _compute_old_log_prob(self, batch: DataProto, metrics: dict[str, Any]) -> None:
        if not self._old_log_prob_needed(batch):
            return
        old_log_prob = self.actor_rollout_wg.compute_log_prob(batch)
        self._take_reports(old_log_prob, metrics)
        if "entropys" in old_log_prob.batch.keys():
            entropys = old_log_prob.batch.pop("entropys")
            loss_agg_mode = str(cfg_select(self.config, "actor_rollout_ref.actor.loss_agg_mode", "token-mean"))
            metrics["actor/entropy"] = float(
                agg_loss(loss_mat=entropys, loss_mask=batch.batch["response_mask"], loss_agg_mode=loss_agg_mode).item())
        batch.union(old_log_prob)
        if "rollout_log_probs" in batch.batch.keys():
            mask = batch.batch["response_mask"].bool()
            diff = torch.abs(batch.batch["rollout_log_probs"] - batch.batch["old_log_probs"])[mask]
            if diff.numel():
                metrics["training/rollout_probs_diff_max"] = float(diff.max().item())
                metrics["training/rollout_probs_diff_mean"] = float(diff.mean().item())
                metrics["training/rollout_probs_diff_std"] = float(diff.std().item()) if diff.numel() > 1 else 0.0

    def _compute_remax_baseline(self, batch: DataProto, gen_batch: DataProto, timing_raw: dict[str, float]) -> None:
        """ReMax: reward of one greedy response per prompt, as ``batch['reward_baselines']``."""
        with marked_timer("gen_max", timing_raw):
            baseline_batch = deepcopy(gen_batch)
            baseline_batch.meta_info["do_sample"] = False
            baseline_out = self._take_reports(self._generate(baseline_batch))
            scored = batch.select()
            scored.union(baseline_out)
            if self.use_rm and "rm_scores" not in scored.batch.keys():
                scored.union(self._take_reports(self.rm_wg.compute_rm_score(scored)))
            reward_tensor, _ = compute_reward(scored, self.reward_fn)
            batch.batch["reward_baselines"] = reward_tensor.sum(dim=-1)

    def fit(self) -> None:
        """The training loop: validation before training, then ``total_training_steps`` steps, each logged to the
        trackers; checkpoints every ``save_freq`` steps and at the end; validation every ``test_freq`` steps and at
        the end."""
        trainer_cfg = self.config.trainer
        self.logger = self._make_tracker()
        self.global_steps = 0
        self._load_checkpoint()

        if self.val_reward_fn is not None and bool(cfg_select(trainer_cfg, "val_before_train", True)):
            val_metrics = self._validate()
            if val_metrics:
                print(f"[verl] initial validation metrics: {val_metrics}", flush=True)
                self.logger.log(data=val_metrics, step=self.global_steps)
            if bool(cfg_select(trainer_cfg, "val_only", False)):
                return

        if self.global_steps >= self.total_training_steps:
            print(f"[verl] already at step {self.global_steps} of {self.total_training_steps}: nothing to train",
                  flush=True)
            return

        progress_bar = tqdm(total=self.total_training_steps, initial=self.global_steps, desc="Training Progress")
        self.global_steps += 1
        last_val_metrics = None
        rollout_cfg = self.config.actor_rollout_ref.rollout
        n = int(cfg_select(rollout_cfg, "n", 1) or 1)
        algo = self.config.algorithm
        adv_estimator = str(cfg_select(algo, "adv_estimator", "gae"))
        test_freq = int(cfg_select(trainer_cfg, "test_freq", -1) or -1)
        save_freq = int(cfg_select(trainer_cfg, "save_freq", -1) or -1)
        critic_warmup = int(cfg_select(trainer_cfg, "critic_warmup", 0) or 0)
        total_epochs = int(cfg_select(trainer_cfg, "total_epochs", 1) or 1)
        esi_redundant_time = float(cfg_select(trainer_cfg, "esi_redundant_time", 0) or 0)
        rollout_data_dir = cfg_select(trainer_cfg, "rollout_data_dir")
        current_epoch = (self.global_steps - 1) // len(self.train_dataloader)
        # with total_training_steps beyond total_epochs worth of data, keep cycling the data
        total_epochs = max(total_epochs, -(-self.total_training_steps // len(self.train_dataloader)))

        epoch, empty_passes = current_epoch, 0
        while epoch < total_epochs:
            yielded = False
            for batch_dict in self.train_dataloader:
                yielded = True
                metrics: dict[str, Any] = {}
                timing_raw: dict[str, float] = {}
                batch = DataProto.from_single_dict(batch_dict)
                batch.meta_info["temperature"] = float(cfg_select(rollout_cfg, "temperature", 1.0))
                batch.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(batch))], dtype=object)
                gen_batch = self._get_gen_batch(batch)
                gen_batch.meta_info["global_steps"] = self.global_steps
                is_last_step = self.global_steps >= self.total_training_steps

                with marked_timer("step", timing_raw):
                    # generate n responses per prompt
                    with marked_timer("gen", timing_raw):
                        gen_out = self._generate(gen_batch.repeat(repeat_times=n, interleave=True))
                        self._take_reports(gen_out, metrics, timing_raw)
                    if adv_estimator == AdvantageEstimator.REMAX.value:
                        self._compute_remax_baseline(batch, gen_batch, timing_raw)

                    batch = batch.repeat(repeat_times=n, interleave=True)
                    popped = gen_batch.repeat(repeat_times=n, interleave=True)
                    batch.union(gen_out)
                    for key in popped.non_tensor_batch:  # keep prompt columns the rollout did not return
                        if key not in batch.non_tensor_batch:
                            batch.non_tensor_batch[key] = popped.non_tensor_batch[key]
                    if "response_mask" not in batch.batch.keys():
                        batch.batch["response_mask"] = compute_response_mask(batch)
                    if bool(cfg_select(trainer_cfg, "balance_batch", True)):
                        self._balance_batch(batch, metrics=metrics)
                    batch.meta_info["global_token_num"] = torch.sum(batch.batch["attention_mask"], dim=-1).tolist()

                    # rewards
                    future_reward = None
                    reward_extra_infos_dict: dict[str, list] = {}
                    with marked_timer("reward", timing_raw):
                        if self.use_rm and "rm_scores" not in batch.batch.keys():
                            batch.union(self._take_reports(self.rm_wg.compute_rm_score(batch), metrics))
                        if bool(cfg_select(self.config, "reward_model.launch_reward_fn_async", False)):
                            future_reward = compute_reward_async.remote(data=batch, reward_fn=self.reward_fn)
                        else:
                            reward_tensor, reward_extra_infos_dict = compute_reward(batch, self.reward_fn)

                    with marked_timer("old_log_prob", timing_raw):
                        self._compute_old_log_prob(batch, metrics)

                    if self.use_reference_policy:
                        with marked_timer("ref", timing_raw):
                            wg = self.actor_rollout_wg if self.ref_in_actor else self.ref_policy_wg
                            batch.union(self._take_reports(wg.compute_ref_log_prob(batch), metrics))

                    if self.use_critic:
                        with marked_timer("values", timing_raw):
                            batch.union(self._take_reports(self.critic_wg.compute_values(batch), metrics))

                    with marked_timer("adv", timing_raw):
                        if future_reward is not None:
                            reward_tensor, reward_extra_infos_dict = ray.get(future_reward)
                        batch.batch["token_level_scores"] = reward_tensor
                        if reward_extra_infos_dict:
                            batch.non_tensor_batch.update({
                                k: np.array(v, dtype=object)
                                for k, v in reward_extra_infos_dict.items()
                                if len(v) == len(batch)
                            })
                        if self.use_kl_in_reward:
                            batch, kl_metrics = apply_kl_penalty(batch,
                                                                 kl_ctrl=self.kl_ctrl_in_reward,
                                                                 kl_penalty=str(cfg_select(algo, "kl_penalty", "kl")))
                            metrics.update(kl_metrics)
                        else:
                            batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
                        batch = compute_advantage(batch,
                                                  adv_estimator=adv_estimator,
                                                  gamma=float(cfg_select(algo, "gamma", 1.0)),
                                                  lam=float(cfg_select(algo, "lam", 1.0)),
                                                  num_repeat=n,
                                                  norm_adv_by_std_in_grpo=bool(
                                                      cfg_select(algo, "norm_adv_by_std_in_grpo", True)),
                                                  config=algo)

                    if self.use_critic:
                        with marked_timer("update_critic", timing_raw):
                            critic_out = self.critic_wg.update_critic(batch)
                            self._take_reports(critic_out, metrics)

                    if critic_warmup <= self.global_steps:
                        with marked_timer("update_actor", timing_raw):
                            batch.meta_info["multi_turn"] = bool(cfg_select(rollout_cfg, "multi_turn.enable", False))
                            actor_out = self.actor_rollout_wg.update_actor(batch)
                            self._rollout_weights_stale = True  # async rollout servers get the new weights
                            self._take_reports(actor_out, metrics)

                    if rollout_data_dir:
                        self._log_rollout_data(batch, reward_extra_infos_dict, timing_raw, str(rollout_data_dir))

                    if self.val_reward_fn is not None and test_freq > 0 and (is_last_step or
                                                                             self.global_steps % test_freq == 0):
                        with marked_timer("testing", timing_raw):
                            val_metrics = self._validate()
                            if is_last_step:
                                last_val_metrics = val_metrics
                        metrics.update(val_metrics)

                    esi_close = should_save_ckpt_esi(max_steps_duration=self.max_steps_duration,
                                                     redundant_time=esi_redundant_time)
                    if save_freq > 0 and (is_last_step or self.global_steps % save_freq == 0 or esi_close):
                        if esi_close:
                            print("[verl] the capacity block expires soon: saving a checkpoint", flush=True)
                        with marked_timer("save_checkpoint", timing_raw):
                            self._save_checkpoint()

                self.max_steps_duration = max(self.max_steps_duration, timing_raw.get("step", 0.0))
                metrics["training/global_step"] = self.global_steps
                metrics["training/epoch"] = epoch
                metrics.update(compute_data_metrics(batch=batch, use_critic=self.use_critic))
                metrics.update(compute_timing_metrics(batch=batch, timing_raw=timing_raw))
                metrics.update(
                    compute_throughout_metrics(batch=batch,
                                               timing_raw=timing_raw,
                                               n_gpus=self.resource_pool_manager.get_n_gpus()))

                sampler = self.train_dataloader.sampler
                if hasattr(sampler, "update") and callable(sampler.update):
                    sampler.update(batch=batch)  # curriculum samplers reorder the data from what was learned

                if rollout_data_dir:
                    write_metrics(str(rollout_data_dir), self.global_steps, metrics)
                self.logger.log(data=metrics, step=self.global_steps)
                progress_bar.update(1)
                self.global_steps += 1
                if is_last_step:
                    if last_val_metrics:
                        print(f"[verl] final validation metrics: {last_val_metrics}", flush=True)
                    progress_bar.close()
                    return
            if yielded:
                epoch += 1
                empty_passes = 0
            else:
                # a dataloader restored from a checkpoint taken at the end of an epoch first finishes that epoch
                # with an empty pass; it does not count as an epoch
                empty_passes += 1
                if empty_passes > 1:
                    break
        progress_bar.close()
