"""The data-parallel PPO critic: an FSDP2-sharded (or plain) HF token-classification model with one label, whose
output at each position is the value of the state before the next token.

``compute_values`` runs forward-only over micro-batches; ``update_critic`` regresses values onto ``returns`` with PPO
value clipping (``cliprange_value``) over mini-batches x ``ppo_epochs`` and micro-batches, with the same loss
weighting, gradient clipping and skipped-step rule as the actor (:mod:`verl.utils.dp_update`).

Config: verl's ``critic.*`` key names (``ppo_mini_batch_size`` already per GPU, ``ppo_micro_batch_size_per_gpu``,
``use_dynamic_bsz``, ``ppo_max_token_len_per_gpu``, ``ppo_epochs``, ``shuffle``, ``grad_clip``,
``cliprange_value``, ``loss_agg_mode``, ``use_remove_padding`` (upstream under ``critic.model``),
``ulysses_sequence_parallel_size`` (> 1 needs remove-padding and the worker's Ulysses context, see
:mod:`verl.utils.ulysses`)).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from verl.protocol import DataProto
from verl.utils.dp_update import (FORWARD_KEYS, PPOSchedule, cfg_get, defer_gradient_reduction, device_of, get_dp_info,
                                  guarded_optimizer_step, micro_batch_weight, run_ppo_epochs)
from verl.utils.remove_padding import forward_response_positions, scatter_to_response
from verl.utils.seqlen_balancing import prepare_dynamic_batch, restore_dynamic_batch
from verl.utils.ulysses import check_ulysses_config, check_ulysses_group, ulysses_forward_response_positions
from verl.workers.critic.base import BasePPOCritic, ppo_value_loss

__all__ = ["DataParallelPPOCritic"]

logger = logging.getLogger(__name__)


def _response_mask(batch: Any) -> torch.Tensor:
    if "response_mask" in batch.keys():
        return batch["response_mask"]
    return batch["attention_mask"][:, -batch["responses"].shape[-1]:]


def _one_value(values: torch.Tensor) -> torch.Tensor:
    """``(n,)`` values from the model's ``(n, 1)`` (or ``(n,)``) per-position outputs."""
    if values.dim() == 2:
        if values.shape[-1] != 1:
            raise ValueError(f"the critic model outputs {values.shape[-1]} labels per token; a value model needs "
                             "num_labels=1 (AutoModelForTokenClassification with num_labels=1)")
        values = values.squeeze(-1)
    return values


class DataParallelPPOCritic(BasePPOCritic):
    """PPO critic over a (possibly FSDP2-wrapped) value model, one instance per data-parallel rank."""

    def __init__(self,
                 config: Any,
                 critic_module: torch.nn.Module,
                 critic_optimizer: torch.optim.Optimizer | None = None) -> None:
        super().__init__(config)
        self.critic_module = critic_module
        self.critic_optimizer = critic_optimizer
        self.use_remove_padding = bool(
            cfg_get(config, "use_remove_padding", False) or cfg_get(config, "model.use_remove_padding", False))
        self.ulysses_sequence_parallel_size = int(cfg_get(config, "ulysses_sequence_parallel_size", 1))
        check_ulysses_config(self.ulysses_sequence_parallel_size, self.use_remove_padding,
                             "critic.ulysses_sequence_parallel_size", "critic.model.use_remove_padding")
        self.num_skipped_steps = 0
        self._shuffle_generator = torch.Generator()
        self._shuffle_generator.manual_seed(int(cfg_get(config, "data_loader_seed", 0) or 0))

    def _forward_micro_batch(self, micro_batch: Any) -> torch.Tensor:
        """Values at the positions predicting each response token, ``(batch, response_length)``, 0 at padding."""
        device = device_of(self.critic_module)
        response_length = micro_batch["responses"].shape[-1]
        inputs = (micro_batch["input_ids"].to(device), micro_batch["attention_mask"].to(device),
                  micro_batch["position_ids"].to(device))
        if self.ulysses_sequence_parallel_size > 1:
            # this rank's slice of the packed tokens; the values are all-gathered over the sp group
            check_ulysses_group(self.ulysses_sequence_parallel_size)
            values, selected = ulysses_forward_response_positions(self.critic_module,
                                                                  *inputs,
                                                                  response_length=response_length,
                                                                  head_fn=lambda out, _labels: _one_value(out))
            return scatter_to_response(values[:, 0].float(), selected)
        values, selected = forward_response_positions(self.critic_module,
                                                      *inputs,
                                                      response_length=response_length,
                                                      use_remove_padding=self.use_remove_padding)
        return scatter_to_response(_one_value(values).float(), selected)

    def compute_values(self, data: DataProto) -> torch.Tensor:
        """Values ``(batch, response_length)`` in the rows' order, zero outside ``response_mask``.

        ``meta_info``: ``micro_batch_size``, or ``use_dynamic_bsz`` with ``max_token_len``.
        """
        missing = [k for k in FORWARD_KEYS if k not in data.batch.keys()]
        if missing:
            raise KeyError(f"compute_values needs batch columns {missing}")
        keys = list(FORWARD_KEYS) + (["response_mask"] if "response_mask" in data.batch.keys() else [])
        selected = data.select(batch_keys=keys, non_tensor_batch_keys=[])
        batch_idx = None
        if data.meta_info.get("use_dynamic_bsz", False):
            max_token_len = data.meta_info.get("max_token_len")
            if max_token_len is None:
                raise KeyError("compute_values with use_dynamic_bsz needs meta_info['max_token_len'] (set "
                               "critic.forward_max_token_len_per_gpu)")
            dp = get_dp_info(self.critic_module)
            micro_batches, batch_idx = prepare_dynamic_batch(selected,
                                                             max_token_len=int(max_token_len) *
                                                             self.ulysses_sequence_parallel_size,
                                                             dp_group=dp.group,
                                                             same_micro_num_in_dp=dp.size > 1)
        else:
            micro_batch_size = data.meta_info.get("micro_batch_size")
            if micro_batch_size is None or int(micro_batch_size) <= 0:
                raise KeyError("compute_values needs meta_info['micro_batch_size'] (set "
                               "critic.forward_micro_batch_size_per_gpu) or meta_info['use_dynamic_bsz']=True")
            micro_batches = selected.split(int(micro_batch_size))
        was_training = self.critic_module.training
        self.critic_module.eval()
        outputs = []
        try:
            with torch.no_grad():
                for micro in micro_batches:
                    values = self._forward_micro_batch(micro.batch)
                    outputs.append(values * _response_mask(micro.batch).to(values.device, values.dtype))
        finally:
            self.critic_module.train(was_training)
        values = torch.cat(outputs, dim=0)
        if batch_idx is not None:
            values = restore_dynamic_batch(values, batch_idx)
        return values

    def update_critic(self, data: DataProto) -> dict[str, list[float]]:
        """Value regression on ``data`` (needs ``values`` from :meth:`compute_values` and ``returns``). Returns
        metric lists: ``critic/vf_loss``, ``critic/vf_clipfrac``, ``critic/vpred_mean`` per micro-batch,
        ``critic/grad_norm`` per mini-batch, ``critic/skipped_steps``."""
        if self.critic_optimizer is None:
            raise ValueError("update_critic needs an optimizer: build DataParallelPPOCritic(config, module, optimizer)")
        c = self.config
        # with use_dynamic_bsz each sp rank holds 1/sp of a micro-batch's tokens
        schedule = PPOSchedule.from_config(c, "critic", token_scale=self.ulysses_sequence_parallel_size)
        cliprange_value = float(cfg_get(c, "cliprange_value", 0.5))
        grad_clip = cfg_get(c, "grad_clip", 1.0)

        needed = list(FORWARD_KEYS) + ["values", "returns"]
        missing = [k for k in needed if k not in data.batch.keys()]
        if missing:
            raise KeyError(f"update_critic needs batch columns {missing} ('values' from compute_values, 'returns' from "
                           "the advantage estimator)")
        keys = needed + (["response_mask"] if "response_mask" in data.batch.keys() else [])
        work = data.select(batch_keys=keys, non_tensor_batch_keys=[])
        if "response_mask" not in data.batch.keys():
            work.batch["response_mask"] = _response_mask(data.batch)

        dp = get_dp_info(self.critic_module)

        def accumulate_grads(micro_batches: list, global_units: float) -> list[dict[str, Any]]:
            self.critic_optimizer.zero_grad(set_to_none=True)
            micro_metrics = []
            for index, micro in enumerate(micro_batches):
                defer_gradient_reduction(self.critic_module, index == len(micro_batches) - 1, dp)
                mb = micro.batch.to(device_of(self.critic_module))
                vf_loss, metrics = ppo_value_loss(self._forward_micro_batch(mb), mb, cliprange_value,
                                                  schedule.loss_agg_mode)
                weight = micro_batch_weight(mb["response_mask"], schedule.loss_agg_mode, global_units, dp)
                (vf_loss * weight).backward()
                micro_metrics.append(metrics)
            return micro_metrics

        self.critic_module.train()
        metrics, skipped = run_ppo_epochs(
            work,
            schedule,
            accumulate_grads,
            lambda: guarded_optimizer_step(self.critic_module, self.critic_optimizer, grad_clip),
            role="critic",
            dp=dp,
            generator=self._shuffle_generator,
            log=logger)
        self.num_skipped_steps += skipped
        self.critic_optimizer.zero_grad(set_to_none=True)
        return metrics
