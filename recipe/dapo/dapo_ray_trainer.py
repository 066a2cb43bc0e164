"""``RayDAPOTrainer``: the PPO driver with DAPO's dynamic sampling.

A training step (:meth:`RayDAPOTrainer.fit`)::

    repeat (a generation round, at most algorithm.filter_groups.max_num_gen_batches times):
        prompts   <- next data.gen_batch_size prompts, one uid each
        responses <- rollout.n responses per prompt
        scores    <- reward model / reward manager (the ``dapo`` manager adds the overlong penalty)
        keep the prompts whose responses differ in algorithm.filter_groups.metric (all-equal groups have zero
        advantage under GRPO: they cost compute and teach nothing)
    until data.train_batch_size prompts are kept; train on the first train_batch_size of them
    then as in RayPPOTrainer: old / reference log-probs, values, advantages, critic and actor updates

Filtering happens before any log-prob pass, so dropped groups cost only generation and scoring. With
``filter_groups.enable=False`` every generated prompt is trained on (one round per step).

The filtering pieces are plain functions (:func:`compute_filter_metric`, :func:`select_informative_groups`) and a
small accumulator (:class:`DynamicSamplingBuffer`), tested without Ray.
"""
from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from verl.protocol import DataProto
from verl.trainer.ppo.core_algos import AdvantageEstimator
from verl.trainer.ppo.metric_utils import compute_data_metrics, compute_throughout_metrics, compute_timing_metrics
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, apply_kl_penalty, compute_advantage, compute_response_mask
from verl.trainer.ppo.reward import compute_reward
from verl.utils.checkpoint import should_save_ckpt_esi
from verl.utils.config import ConfigError, cfg_select
from verl.utils.rollout_dump import write_metrics
from verl.utils.timer import marked_timer

__all__ = [
    "FILTER_METRICS_FROM_TENSORS",
    "DynamicSamplingError",
    "DynamicSamplingBuffer",
    "RayDAPOTrainer",
    "compute_filter_metric",
    "overlong_buffer_config",
    "select_informative_groups",
    "validate_dapo_config",
]

#: filter metrics computed from the batch's tensors; any other name is read from the per-sample reward info
FILTER_METRICS_FROM_TENSORS = ("seq_reward", "seq_final_reward")


class DynamicSamplingError(ValueError):
    """Dynamic sampling used up ``max_num_gen_batches`` generation rounds without filling a training batch."""


# ----------------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------------


def _fail(key: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{key}: {problem}. Fix: {fix}")


def overlong_buffer_config(config: Any) -> dict[str, Any]:
    """``reward_model.overlong_buffer`` with ``reward_model.reward_kwargs.overlong_buffer_cfg`` (the way newer
    upstream scripts set it: ``+reward_model.reward_kwargs.overlong_buffer_cfg.len=...``) laid over it."""
    merged: dict[str, Any] = {}
    for key in ("reward_model.overlong_buffer", "reward_model.reward_kwargs.overlong_buffer_cfg"):
        section = cfg_select(config, key)
        if OmegaConf.is_config(section):
            section = OmegaConf.to_container(section, resolve=True)
        merged.update(section or {})
    return merged


def validate_dapo_config(config: Any) -> None:
    """Checks of the DAPO keys (on the driver, before any worker starts); raises :class:`ConfigError`."""
    fg = "algorithm.filter_groups"
    enable = bool(cfg_select(config, f"{fg}.enable", False))
    train_bsz = cfg_select(config, "data.train_batch_size")
    if isinstance(train_bsz, bool) or not isinstance(train_bsz, int) or train_bsz < 1:
        _fail("data.train_batch_size", f"must be a positive integer, got {train_bsz!r}",
              "set data.train_batch_size=N (prompts per training step)")
    gen_bsz = cfg_select(config, "data.gen_batch_size")
    gen_bsz = train_bsz if gen_bsz is None else gen_bsz
    if isinstance(gen_bsz, bool) or not isinstance(gen_bsz, int) or gen_bsz < 1:
        _fail("data.gen_batch_size", f"must be a positive integer, got {gen_bsz!r}",
              "set data.gen_batch_size=N (prompts per generation round), e.g. 3x data.train_batch_size")
    if enable:
        metric = cfg_select(config, f"{fg}.metric")
        if not metric:
            _fail(
                f"{fg}.metric", "is not set but dynamic sampling is on",
                f"set {fg}.metric=acc (a reward function returning {{'score', 'acc'}}, e.g. math_dapo), or "
                f"{fg}.metric=seq_reward (the summed score)")
        if str(metric) == "seq_final_reward" and bool(cfg_select(config, "algorithm.use_kl_in_reward", False)):
            _fail(
                f"{fg}.metric", "=seq_final_reward with algorithm.use_kl_in_reward=True: groups are filtered before "
                "the log-prob passes, so the KL-penalised reward is not known yet", f"set {fg}.metric=seq_reward")
        max_gen = cfg_select(config, f"{fg}.max_num_gen_batches", 0)
        if isinstance(max_gen, bool) or not isinstance(max_gen, int):
            _fail(f"{fg}.max_num_gen_batches", f"must be an integer, got {max_gen!r}",
                  f"set {fg}.max_num_gen_batches=10 (or 0 for no limit)")
        if max_gen > 0 and max_gen * gen_bsz < train_bsz:
            _fail(
                f"{fg}.max_num_gen_batches", f"={max_gen} rounds of data.gen_batch_size={gen_bsz} prompts can never "
                f"fill data.train_batch_size={train_bsz}", f"raise {fg}.max_num_gen_batches to at least "
                f"{-(-train_bsz // gen_bsz)} or data.gen_batch_size to {train_bsz}")
    elif gen_bsz != train_bsz:
        _fail(
            "data.gen_batch_size", f"={gen_bsz} differs from data.train_batch_size={train_bsz} while {fg}.enable="
            "False: without filtering every generated prompt is trained on", f"set data.gen_batch_size="
            f"{train_bsz}, or turn dynamic sampling on with {fg}.enable=True")

    ob = "reward_model.overlong_buffer"
    buffer = overlong_buffer_config(config)
    if bool(buffer.get("enable", False)):
        manager = str(cfg_select(config, "reward_model.reward_manager", "naive"))
        from verl.workers.reward_manager import DAPORewardManager, get_reward_manager_cls

        try:
            manager_cls = get_reward_manager_cls(manager)
        except ValueError as exc:
            raise ConfigError(f"reward_model.reward_manager: {exc}") from None
        if not issubclass(manager_cls, DAPORewardManager):
            _fail(f"{ob}.enable", f"=True but reward_model.reward_manager={manager} does not apply the overlong "
                  "penalty", "set reward_model.reward_manager=dapo")
        max_resp = int(cfg_select(config, "data.max_response_length"))
        buffer_len = buffer.get("len")
        if isinstance(buffer_len, bool) or not isinstance(buffer_len, int) or not 0 < buffer_len <= max_resp:
            _fail(f"{ob}.len", f"must be an integer in (0, data.max_response_length={max_resp}], got {buffer_len!r}",
                  f"set {ob}.len to about a quarter of data.max_response_length, e.g. {max(1, max_resp // 4)}")
        factor = buffer.get("penalty_factor", 1.0)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
            _fail(f"{ob}.penalty_factor", f"must be a number >= 0, got {factor!r}", f"set {ob}.penalty_factor=1.0")


# ----------------------------------------------------------------------------------------------------------------------
# dynamic sampling
# ----------------------------------------------------------------------------------------------------------------------


def compute_filter_metric(batch: DataProto, metric: str) -> np.ndarray:
    """One float per row: ``seq_reward`` (summed ``token_level_scores``), ``seq_final_reward`` (summed
    ``token_level_rewards``, the scores where those are not set yet) or the per-sample reward info column
    ``metric`` (``acc``, ``score``, ...)."""
    if metric in FILTER_METRICS_FROM_TENSORS:
        key = "token_level_rewards" if metric == "seq_final_reward" else "token_level_scores"
        if key not in batch.batch.keys():
            key = "token_level_scores"
        if key not in batch.batch.keys():
            raise KeyError(f"filter metric {metric!r} needs batch['token_level_scores']; score the batch first")
        return batch.batch[key].sum(dim=-1).detach().cpu().to(torch.float64).numpy()
    if metric not in batch.non_tensor_batch:
        available = sorted(k for k in batch.non_tensor_batch if k not in ("uid", "raw_prompt_ids"))
        raise KeyError(f"algorithm.filter_groups.metric={metric!r}: the reward function reported no {metric!r} per "
                       f"sample (non-tensor columns: {available}). Fix: use algorithm.filter_groups.metric="
                       f"seq_reward (the summed score), or return {{'score': ..., {metric!r}: ...}} from the reward "
                       "function (as math_dapo does)")
    values = batch.non_tensor_batch[metric]
    try:
        return np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"algorithm.filter_groups.metric={metric!r}: values must be numbers, got e.g. "
                        f"{values[0]!r}") from exc


def select_informative_groups(uids: Sequence[Any], values: Sequence[float]) -> tuple[list[int], list[Any]]:
    """Rows of the groups (rows sharing a uid) whose ``values`` are not all equal, and those groups' uids, both in
    first-seen order. A group of one response is kept (nothing to compare it with), as upstream does. Non-finite
    values (a sample whose reward function failed reports None) are left out of the comparison."""
    groups: OrderedDict[Any, list[int]] = OrderedDict()
    for row, uid in enumerate(uids):
        groups.setdefault(uid, []).append(row)
    values = np.asarray(values, dtype=np.float64)
    if len(values) != len(uids):
        raise ValueError(f"select_informative_groups: {len(uids)} uids but {len(values)} values")
    kept_rows: list[int] = []
    kept_uids: list[Any] = []
    for uid, rows in groups.items():
        finite = values[rows][np.isfinite(values[rows])]
        if len(rows) == 1 or (len(finite) > 1 and float(np.std(finite)) > 0):
            kept_uids.append(uid)
            kept_rows.extend(rows)
    return kept_rows, kept_uids


def _concat_aligned(parts: list[DataProto]) -> DataProto:
    """``DataProto.concat`` of generation rounds whose non-tensor columns may differ (a reward info key missing from
    one round is filled with None) and whose meta_info may differ (the last round's wins; ``reward_extra_keys``
    are joined)."""
    if len(parts) == 1:
        return parts[0]
    keys: list[str] = []
    for part in parts:
        keys.extend(k for k in part.non_tensor_batch if k not in keys)
    meta: dict[str, Any] = {}
    extra_keys: list[str] = []
    for part in parts:
        meta.update(part.meta_info)
        extra_keys.extend(k for k in part.meta_info.get("reward_extra_keys", []) if k not in extra_keys)
    if extra_keys:
        meta["reward_extra_keys"] = extra_keys
    aligned = []
    for part in parts:
        non_tensor = dict(part.non_tensor_batch)
        for key in keys:
            if key not in non_tensor:
                non_tensor[key] = np.array([None] * len(part), dtype=object)
        aligned.append(DataProto(batch=part.batch, non_tensor_batch=non_tensor, meta_info={}))
    joined = DataProto.concat(aligned)
    joined.meta_info = meta
    return joined


class DynamicSamplingBuffer:
    """Collects the informative groups of successive generation rounds until ``train_batch_size`` prompts.

    ``add(round)`` filters a scored round (rows grouped by ``non_tensor_batch['uid']``) and keeps its informative
    groups; ``ready`` says whether enough prompts are kept; ``check_budget()`` raises :class:`DynamicSamplingError`
    once ``max_num_gen_batches`` rounds (> 0) did not suffice; ``pop()`` returns the first ``train_batch_size``
    prompts' rows and starts over. With ``enable=False`` nothing is filtered.
    """

    def __init__(self,
                 train_batch_size: int,
                 metric: Optional[str],
                 max_num_gen_batches: int = 0,
                 enable: bool = True) -> None:
        if train_batch_size < 1:
            raise ValueError(f"train_batch_size must be >= 1, got {train_batch_size}")
        if enable and not metric:
            raise ValueError("DynamicSamplingBuffer: a filter metric is needed when filtering is enabled "
                             "(algorithm.filter_groups.metric)")
        self.train_batch_size = int(train_batch_size)
        self.metric = metric
        self.max_num_gen_batches = int(max_num_gen_batches or 0)
        self.enable = bool(enable)
        self.reset()

    def reset(self) -> None:
        self._parts: list[DataProto] = []
        self.num_gen_batches = 0
        self.num_gen_prompts = 0
        self.num_kept_prompts = 0

    @property
    def ready(self) -> bool:
        if not self.enable:
            return self.num_gen_batches > 0
        return self.num_kept_prompts >= self.train_batch_size

    def add(self, scored: DataProto) -> dict[str, int]:
        """Filter one scored generation round and keep its informative groups; returns this round's counts."""
        if "uid" not in scored.non_tensor_batch:
            raise KeyError("dynamic sampling groups responses by non_tensor_batch['uid'] (one per prompt); the batch "
                           "has none")
        uids = scored.non_tensor_batch["uid"]
        num_prompts = len(dict.fromkeys(uids.tolist()))
        self.num_gen_batches += 1
        self.num_gen_prompts += num_prompts
        if self.enable:
            kept_rows, kept_uids = select_informative_groups(uids, compute_filter_metric(scored, str(self.metric)))
            kept = scored.select_idxs(np.asarray(kept_rows, dtype=np.int64)) if kept_rows else None
            num_kept = len(kept_uids)
        else:
            kept, num_kept = scored, num_prompts
        if kept is not None and len(kept):
            self._parts.append(kept)
        self.num_kept_prompts += num_kept
        return {"gen_prompts": num_prompts, "kept_prompts": num_kept}

    def check_budget(self) -> None:
        """Raise when ``max_num_gen_batches`` rounds are used up and the batch is still not full."""
        if self.ready or self.max_num_gen_batches <= 0 or self.num_gen_batches < self.max_num_gen_batches:
            return
        raise DynamicSamplingError(
            f"dynamic sampling: {self.num_gen_batches} generation rounds (algorithm.filter_groups."
            f"max_num_gen_batches={self.max_num_gen_batches}) kept only {self.num_kept_prompts} of the "
            f"data.train_batch_size={self.train_batch_size} prompts needed: the responses to almost every prompt "
            f"score the same ({self.num_gen_prompts} prompts generated). The data may be too hard or too easy for "
            "the model, or the filter metric constant. Fix: raise algorithm.filter_groups.max_num_gen_batches (0 "
            "for no limit) or data.gen_batch_size, check the reward function, or use easier/harder data")

    def pop(self) -> DataProto:
        """The rows of the first ``train_batch_size`` kept prompts (all kept rows with filtering off); resets."""
        if not self.ready or not self._parts:
            raise RuntimeError(f"DynamicSamplingBuffer.pop: only {self.num_kept_prompts} of {self.train_batch_size} "
                               "prompts collected")
        batch = _concat_aligned(self._parts)
        if self.enable:
            uids = batch.non_tensor_batch["uid"].tolist()
            keep = set(list(dict.fromkeys(uids))[:self.train_batch_size])
            rows = [i for i, uid in enumerate(uids) if uid in keep]
            if len(rows) != len(batch):
                batch = batch.select_idxs(np.asarray(rows, dtype=np.int64))
        self._parts = []
        return batch

    def metrics(self) -> dict[str, float]:
        """``train/num_gen_batches`` (upstream's name) and how many prompts were generated and kept."""
        return {
            "train/num_gen_batches": self.num_gen_batches,
            "train/num_gen_prompts": self.num_gen_prompts,
            "train/num_kept_prompts": self.num_kept_prompts,
            "train/kept_prompt_ratio": self.num_kept_prompts / max(self.num_gen_prompts, 1),
        }


# ----------------------------------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------------------------------


class RayDAPOTrainer(RayPPOTrainer):
    """:class:`~verl.trainer.ppo.ray_trainer.RayPPOTrainer` with DAPO's dynamic sampling in :meth:`fit`.

    Same constructor; the config adds ``algorithm.filter_groups``, ``data.gen_batch_size`` and
    ``reward_model.overlong_buffer`` (see ``recipe/dapo/config/dapo_trainer.yaml``). Clip-higher and the token-level
    loss are actor settings and need nothing here. Rewards are computed synchronously (the filter needs them before
    the log-prob passes): ``reward_model.launch_reward_fn_async`` is ignored.
    """

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        validate_dapo_config(config)
        super().__init__(config, *args, **kwargs)

    def _make_sampling_buffer(self) -> DynamicSamplingBuffer:
        fg = cfg_select(self.config, "algorithm.filter_groups") or OmegaConf.create({})
        return DynamicSamplingBuffer(train_batch_size=int(self.config.data.train_batch_size),
                                     metric=cfg_select(fg, "metric"),
                                     max_num_gen_batches=int(cfg_select(fg, "max_num_gen_batches", 0) or 0),
                                     enable=bool(cfg_select(fg, "enable", False)))

    def _generate_and_score(self, batch_dict: dict[str, Any], metrics: dict[str, Any],
                            timing_raw: dict[str, float]) -> DataProto:
        """One generation round: ``rollout.n`` responses per prompt, scored; reward info becomes non-tensor columns
        (``meta_info['reward_extra_keys']`` lists them)."""
        rollout_cfg = self.config.actor_rollout_ref.rollout
        n = int(cfg_select(rollout_cfg, "n", 1) or 1)
        batch = DataProto.from_single_dict(batch_dict)
        batch.meta_info["temperature"] = float(cfg_select(rollout_cfg, "temperature", 1.0))
        batch.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(batch))], dtype=object)
        gen_batch = self._get_gen_batch(batch)
        gen_batch.meta_info["global_steps"] = self.global_steps

        with marked_timer("gen", timing_raw):
            gen_out = self._generate(gen_batch.repeat(repeat_times=n, interleave=True))
            self._take_reports(gen_out, metrics, timing_raw)
        if str(cfg_select(self.config, "algorithm.adv_estimator", "gae")) == AdvantageEstimator.REMAX.value:
            self._compute_remax_baseline(batch, gen_batch, timing_raw)

        popped = gen_batch.repeat(repeat_times=n, interleave=True)
        batch = batch.repeat(repeat_times=n, interleave=True)
        batch.union(gen_out)
        for key in popped.non_tensor_batch:  # keep prompt columns the rollout did not return
            if key not in batch.non_tensor_batch:
                batch.non_tensor_batch[key] = popped.non_tensor_batch[key]
        if "response_mask" not in batch.batch.keys():
            batch.batch["response_mask"] = compute_response_mask(batch)

        with marked_timer("reward", timing_raw):
            if self.use_rm and "rm_scores" not in batch.batch.keys():
                batch.union(self._take_reports(self.rm_wg.compute_rm_score(batch), metrics))
            reward_tensor, extra = compute_reward(batch, self.reward_fn)
        batch.batch["token_level_scores"] = reward_tensor
        extra_keys = [k for k, v in extra.items() if len(v) == len(batch) and k not in batch.non_tensor_batch]
        for key in extra_keys:
            batch.non_tensor_batch[key] = np.array(extra[key], dtype=object)
        batch.meta_info["reward_extra_keys"] = extra_keys
        return batch

    def _train_step(self, batch: DataProto, metrics: dict[str, Any], timing_raw: dict[str, float]) -> DataProto:
        """Log-probs, values, advantages and updates of the filled batch (as in ``RayPPOTrainer.fit``)."""
        algo = self.config.algorithm
        trainer_cfg = self.config.trainer
        if bool(cfg_select(trainer_cfg, "balance_batch", True)):
            self._balance_batch(batch, metrics=metrics)
        batch.meta_info["global_token_num"] = torch.sum(batch.batch["attention_mask"], dim=-1).tolist()

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
            if self.use_kl_in_reward:
                batch, kl_metrics = apply_kl_penalty(batch,
                                                     kl_ctrl=self.kl_ctrl_in_reward,
                                                     kl_penalty=str(cfg_select(algo, "kl_penalty", "kl")))
                metrics.update(kl_metrics)
            else:
                batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
            batch = compute_advantage(batch,
                                      adv_estimator=str(cfg_select(algo, "adv_estimator", "gae")),
                                      gamma=float(cfg_select(algo, "gamma", 1.0)),
                                      lam=float(cfg_select(algo, "lam", 1.0)),
                                      num_repeat=int(cfg_select(self.config, "actor_rollout_ref.rollout.n", 1) or 1),
                                      norm_adv_by_std_in_grpo=bool(cfg_select(algo, "norm_adv_by_std_in_grpo", True)),
                                      config=algo)

        if self.use_critic:
            with marked_timer("update_critic", timing_raw):
                self._take_reports(self.critic_wg.update_critic(batch), metrics)
        if int(cfg_select(trainer_cfg, "critic_warmup", 0) or 0) <= self.global_steps:
            with marked_timer("update_actor", timing_raw):
                batch.meta_info["multi_turn"] = bool(
                    cfg_select(self.config, "actor_rollout_ref.rollout.multi_turn.enable", False))
                self._take_reports(self.actor_rollout_wg.update_actor(batch), metrics)
        return batch

    def fit(self) -> None:
        """Validation before training, then ``total_training_steps`` steps, each made of as many generation rounds
        as dynamic sampling needs; validation, checkpoints and dumps as in ``RayPPOTrainer.fit``."""
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

        test_freq = int(cfg_select(trainer_cfg, "test_freq", -1) or -1)
        save_freq = int(cfg_select(trainer_cfg, "save_freq", -1) or -1)
        esi_redundant_time = float(cfg_select(trainer_cfg, "esi_redundant_time", 0) or 0)
        rollout_data_dir = cfg_select(trainer_cfg, "rollout_data_dir")
        # an explicit total_training_steps is reached however many passes over the data dynamic sampling needs;
        # otherwise training ends after total_epochs passes (fewer steps than batches when groups are dropped)
        explicit_steps = cfg_select(trainer_cfg, "total_training_steps") is not None
        total_epochs = int(cfg_select(trainer_cfg, "total_epochs", 1) or 1)

        progress_bar = tqdm(total=self.total_training_steps, initial=self.global_steps, desc="Training Progress")
        self.global_steps += 1
        last_val_metrics = None
        buffer = self._make_sampling_buffer()
        metrics: dict[str, Any] = {}
        timing_raw: dict[str, float] = {}
        epoch = (self.global_steps - 1) // len(self.train_dataloader)
        empty_passes = 0
        while explicit_steps or epoch < total_epochs:
            yielded = False
            for batch_dict in self.train_dataloader:
                yielded = True
                is_last_step = self.global_steps >= self.total_training_steps
                with marked_timer("step", timing_raw):
                    scored = self._generate_and_score(batch_dict, metrics, timing_raw)
                    counts = buffer.add(scored)
                    if not buffer.ready:
                        print(
                            f"[verl] step {self.global_steps}: kept {buffer.num_kept_prompts}/"
                            f"{buffer.train_batch_size} prompts after {buffer.num_gen_batches} generation round(s) "
                            f"({counts['kept_prompts']}/{counts['gen_prompts']} in the last): generating more",
                            flush=True)
                        buffer.check_budget()
                        continue
                    metrics.update(buffer.metrics())
                    batch = buffer.pop()
                    extra_keys = [
                        k for k in batch.meta_info.pop("reward_extra_keys", []) if k in batch.non_tensor_batch
                    ]
                    batch = self._train_step(batch, metrics, timing_raw)

                    if rollout_data_dir:
                        extra = {k: batch.non_tensor_batch[k].tolist() for k in extra_keys}
                        self._log_rollout_data(batch, extra, timing_raw, str(rollout_data_dir))
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
                    sampler.update(batch=batch)
                if rollout_data_dir:  # the step's metrics next to its samples, as RayPPOTrainer.fit writes them
                    write_metrics(str(rollout_data_dir), self.global_steps, metrics)
                self.logger.log(data=metrics, step=self.global_steps)
                progress_bar.update(1)
                metrics, timing_raw = {}, {}
                buffer.reset()
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
                empty_passes += 1  # a dataloader restored at the end of an epoch first yields an empty pass
                if empty_passes > 1:
                    break
        if buffer.num_gen_batches:
            print(
                f"[verl] the data ran out while dynamic sampling had {buffer.num_kept_prompts} of "
                f"{buffer.train_batch_size} prompts: that partial batch is not trained on",
                flush=True)
        if not explicit_steps:
            print(
                f"[verl] training ended after trainer.total_epochs={total_epochs} pass(es) over the data at step "
                f"{self.global_steps - 1}: with dynamic sampling a step takes one or more generation rounds (set "
                "trainer.total_training_steps to train a given number of steps)",
                flush=True)
        progress_bar.close()
