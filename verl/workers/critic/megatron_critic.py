"""The Megatron-core PPO critic: a ``GPTModel`` whose output layer is a one-output value head
(:class:`verl.utils.megatron_utils.ValueHead`), split over TP / PP / DP like :mod:`verl.workers.actor.megatron_actor`
and trained with megatron's micro-batch schedule and (distributed) optimizer. Values are those of the states before
each response token (positions ``[-R-1:-1]``), as :class:`~verl.workers.critic.dp_critic.DataParallelPPOCritic`.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from verl.protocol import DataProto
from verl.utils.dp_update import FORWARD_KEYS, DPInfo, PPOSchedule, cfg_get, micro_batch_weight, run_ppo_epochs
from verl.utils.megatron_cpu import device_scope
from verl.utils.megatron_utils import broadcast_from_last_pp_stage, get_parallel_info, run_forward_backward
from verl.utils.seqlen_balancing import restore_dynamic_batch
from verl.workers.actor.megatron_actor import (_split, gather_cp_tokens, megatron_accumulate_grads, megatron_forward,
                                               megatron_optimizer_step, zero_megatron_grads)
from verl.workers.critic.base import BasePPOCritic, ppo_value_loss

__all__ = ["MegatronPPOCritic"]

logger = logging.getLogger(__name__)


def _response_mask(batch: Any) -> torch.Tensor:
    if "response_mask" in batch.keys():
        return batch["response_mask"]
    return batch["attention_mask"][:, -batch["responses"].shape[-1]:]


class MegatronPPOCritic(BasePPOCritic):
    """Value model over this rank's megatron chunks.

    Args:
        config: the ``critic`` config; ``ppo_mini_batch_size`` already in rows per DP rank.
        hf_config / tf_config: the model's HF and megatron configs.
        critic_module: this rank's model chunks (DDP-wrapped), the last with a value head.
        critic_optimizer: megatron's optimizer.
    """

    def __init__(self, config: Any, hf_config: Any, tf_config: Any, critic_module: list, critic_optimizer: Any) -> None:
        super().__init__(config)
        self.hf_config = hf_config
        self.tf_config = tf_config
        self.critic_module = list(critic_module)
        self.critic_optimizer = critic_optimizer
        self.num_skipped_steps = 0
        self._shuffle_generator = torch.Generator()
        self._shuffle_generator.manual_seed(int(cfg_get(config, "data_loader_seed", 0) or 0))

    def _dp(self) -> DPInfo:
        from megatron.core import parallel_state as mpu

        return DPInfo(mpu.get_data_parallel_world_size(), mpu.get_data_parallel_group())

    def _train(self, mode: bool) -> None:
        for chunk in self.critic_module:
            chunk.train(mode)

    def _values(self, output: torch.Tensor, mb: Any) -> torch.Tensor:
        length = mb["responses"].shape[-1]
        values = gather_cp_tokens(output[..., 0], self.tf_config, mb["input_ids"].shape[-1])  # identity without CP
        return values[:, -length - 1:-1].float()

    def compute_values(self, data: DataProto) -> torch.Tensor:
        """Values ``(batch, response_length)`` (zero on padding), on every rank."""
        missing = [k for k in FORWARD_KEYS if k not in data.batch.keys()]
        if missing:
            raise KeyError(f"compute_values needs batch columns {missing}")
        use_dynamic = bool(data.meta_info.get("use_dynamic_bsz", False))
        micro = data.meta_info.get("micro_batch_size")
        if use_dynamic and data.meta_info.get("max_token_len") is None:
            raise KeyError("compute_values with use_dynamic_bsz needs meta_info['max_token_len'] (set "
                           "critic.forward_max_token_len_per_gpu)")
        if not use_dynamic and (micro is None or int(micro) <= 0):
            raise KeyError("compute_values needs meta_info['micro_batch_size'] (set "
                           "critic.forward_micro_batch_size_per_gpu) or meta_info['use_dynamic_bsz']=True")
        keys = list(FORWARD_KEYS) + (["response_mask"] if "response_mask" in data.batch.keys() else [])
        selected = data.select(batch_keys=keys, non_tensor_batch_keys=[])
        rows, length = len(data), data.batch["responses"].shape[-1]
        with device_scope():
            micro_batches, batch_idx = _split(selected, use_dynamic, micro, data.meta_info.get("max_token_len"),
                                              self._dp())

            def loss_fn(output: torch.Tensor, mb: Any) -> tuple:
                values = self._values(output, mb) * _response_mask(mb).to(torch.float32)
                return output.new_zeros(()), {"values": values.detach().cpu()}

            self._train(False)
            try:
                with torch.no_grad():
                    outputs = run_forward_backward(self.critic_module, micro_batches, megatron_forward, loss_fn, True)
            finally:
                self._train(True)
            values = torch.cat([o["values"] for o in outputs], dim=0) if get_parallel_info().is_last_stage else None
            values = broadcast_from_last_pp_stage(values, (rows, length), torch.float32)
        if batch_idx is not None:
            values = restore_dynamic_batch(values, batch_idx)
        return values

    def update_critic(self, data: DataProto) -> dict[str, list[float]]:
        """Value regression on ``data`` (needs ``values`` and ``returns``); metric lists as the FSDP critic."""
        c = self.config
        schedule = PPOSchedule.from_config(c, "critic", rows_per="DP rank")
        cliprange_value = float(cfg_get(c, "cliprange_value", 0.5))
        needed = list(FORWARD_KEYS) + ["values", "returns"]
        missing = [k for k in needed if k not in data.batch.keys()]
        if missing:
            raise KeyError(f"update_critic needs batch columns {missing} ('values' from compute_values, 'returns' from "
                           "the advantage estimator)")
        work = data.select(batch_keys=needed + (["response_mask"] if "response_mask" in data.batch.keys() else []),
                           non_tensor_batch_keys=[])
        if "response_mask" not in data.batch.keys():
            work.batch["response_mask"] = _response_mask(data.batch)

        with device_scope():
            dp = self._dp()

            def accumulate_grads(micro_batches: list, global_units: float) -> list[dict[str, Any]]:
                n_micro = len(micro_batches)

                def loss_fn(output: torch.Tensor, mb: Any) -> tuple:
                    vf_loss, out = ppo_value_loss(self._values(output, mb), mb, cliprange_value, schedule.loss_agg_mode)
                    weight = micro_batch_weight(mb["response_mask"], schedule.loss_agg_mode, global_units, dp)
                    return vf_loss * (weight * n_micro), out

                return megatron_accumulate_grads(self.critic_module, self.critic_optimizer, micro_batches, loss_fn)

            self._train(True)
            metrics, skipped = run_ppo_epochs(
                work,
                schedule,
                accumulate_grads,
                lambda: megatron_optimizer_step(self.critic_module, self.critic_optimizer),
                role="critic",
                dp=dp,
                generator=self._shuffle_generator,
                log=logger)
            self.num_skipped_steps += skipped
            zero_megatron_grads(self.critic_module, self.critic_optimizer)
        return metrics
