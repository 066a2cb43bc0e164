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
from verl.utils.dp_update import (DPInfo, append_to_dict, cfg_get, loss_weight_context, micro_batch_weight,
                                  split_micro_batches, to_float)
from verl.utils.megatron_cpu import device_scope
from verl.utils.megatron_utils import broadcast_from_last_pp_stage, get_parallel_info, run_forward_backward
from verl.utils.seqlen_balancing import restore_dynamic_batch
from verl.workers.actor.megatron_actor import _split, megatron_forward, megatron_optimizer_step
from verl.workers.critic.base import BasePPOCritic

__all__ = ["MegatronPPOCritic"]

logger = logging.getLogger(__name__)

_FORWARD_KEYS = ("responses", "input_ids", "attention_mask", "position_ids")


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

    @staticmethod
    def _values(output: torch.Tensor, mb: Any) -> torch.Tensor:
        length = mb["responses"].shape[-1]
        return output[:, -length - 1:-1, 0].float()

    def compute_values(self, data: DataProto) -> torch.Tensor:
        """Values ``(batch, response_length)`` (zero on padding), on every rank."""
        missing = [k for k in _FORWARD_KEYS if k not in data.batch.keys()]
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
        keys = list(_FORWARD_KEYS) + (["response_mask"] if "response_mask" in data.batch.keys() else [])
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
        from verl.trainer.ppo import core_algos

        c = self.config
        mini = cfg_get(c, "ppo_mini_batch_size")
        if mini is None or int(mini) <= 0:
            raise ValueError(f"critic.ppo_mini_batch_size must be a positive int (rows per DP rank after the worker's "
                             f"normalisation), got {mini!r}")
        use_dynamic = bool(cfg_get(c, "use_dynamic_bsz", False))
        max_token_len = cfg_get(c, "ppo_max_token_len_per_gpu")
        if use_dynamic and not max_token_len:
            raise ValueError("critic.use_dynamic_bsz=True needs critic.ppo_max_token_len_per_gpu")
        micro = cfg_get(c, "ppo_micro_batch_size_per_gpu")
        epochs = int(cfg_get(c, "ppo_epochs", 1))
        cliprange_value = float(cfg_get(c, "cliprange_value", 0.5))
        mode = str(cfg_get(c, "loss_agg_mode", "token-mean"))
        needed = list(_FORWARD_KEYS) + ["values", "returns"]
        missing = [k for k in needed if k not in data.batch.keys()]
        if missing:
            raise KeyError(f"update_critic needs batch columns {missing} ('values' from compute_values, 'returns' from "
                           "the advantage estimator)")
        work = data.select(batch_keys=needed + (["response_mask"] if "response_mask" in data.batch.keys() else []),
                           non_tensor_batch_keys=[])
        if "response_mask" not in data.batch.keys():
            work.batch["response_mask"] = _response_mask(data.batch)

        metrics: dict[str, list] = {}
        skipped = 0
        with device_scope():
            dp = self._dp()
            self._train(True)
            for _epoch in range(epochs):
                epoch_data = work
                if bool(cfg_get(c, "shuffle", False)) and len(work) > 1:
                    epoch_data = work.select_idxs(torch.randperm(len(work), generator=self._shuffle_generator))
                for mini_batch in epoch_data.split(int(mini)):
                    global_units = loss_weight_context(mini_batch.batch["response_mask"], mode, dp)
                    micro_batches = [
                        m.batch for m in split_micro_batches(mini_batch, use_dynamic, micro,
                                                             int(max_token_len) if use_dynamic else None, dp)
                    ]
                    n_micro = len(micro_batches)

                    def loss_fn(output: torch.Tensor, mb: Any) -> tuple:
                        response_mask = mb["response_mask"].to(torch.float32)
                        vpreds = self._values(output, mb)
                        vf_loss, vf_clipfrac = core_algos.compute_value_loss(vpreds=vpreds,
                                                                             returns=mb["returns"],
                                                                             values=mb["values"],
                                                                             response_mask=response_mask,
                                                                             cliprange_value=cliprange_value,
                                                                             loss_agg_mode=mode)
                        weight = micro_batch_weight(response_mask, mode, global_units, dp)
                        denom = response_mask.sum().clamp(min=1.0)
                        out = {
                            "critic/vf_loss": to_float(vf_loss),
                            "critic/vf_clipfrac": to_float(vf_clipfrac),
                            "critic/vpred_mean": to_float((vpreds.detach() * response_mask).sum() / denom),
                        }
                        return vf_loss * (weight * n_micro), out

                    for chunk in self.critic_module:
                        chunk.zero_grad_buffer()
                    self.critic_optimizer.zero_grad()
                    for out in run_forward_backward(self.critic_module, micro_batches, megatron_forward, loss_fn,
                                                    False):
                        append_to_dict(metrics, out)
                    grad_norm, stepped = megatron_optimizer_step(self.critic_module, self.critic_optimizer)
                    if not stepped:
                        skipped += 1
                        self.num_skipped_steps += 1
                        logger.warning("critic: gradient norm is %s, skipping this optimizer step", grad_norm)
                    append_to_dict(metrics, {"critic/grad_norm": grad_norm})
            for chunk in self.critic_module:
                chunk.zero_grad_buffer()
            self.critic_optimizer.zero_grad()
        metrics["critic/skipped_steps"] = [float(skipped)]
        return metrics
