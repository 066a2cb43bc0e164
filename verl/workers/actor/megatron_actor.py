"""The Megatron-core PPO actor: a ``GPTModel`` split over tensor (TP), pipeline (PP, optionally virtual) and data
(DP) parallel ranks, driven by megatron's micro-batch schedule.

``compute_log_prob`` runs forward-only; ``update_policy`` runs the PPO update (mini-batches x ``ppo_epochs``; each
mini-batch is one call of megatron's ``forward_backward_func``, whose 1F1B schedule pipelines its micro-batches over
the stages), then one step of megatron's (distributed) optimizer, skipped when a gradient is not finite.

Every rank of a DP group (all its TP and PP ranks) receives the same rows. The first stage reads ``input_ids``; the
last stage computes the logits of its vocabulary slice and, with the other TP ranks, the log-probs
(:func:`verl.utils.megatron_utils.vocab_parallel_log_probs`); results are broadcast from the last stage to the others
so every rank returns the same tensors (the driver keeps TP rank 0 of the last stage).

Sequences are processed padded (left-padded prompt, right-padded response) with a causal + padding mask; RoPE sees
positions offset by the left padding, which leaves attention unchanged (RoPE depends on relative positions). Losses
are weighted exactly as in :class:`~verl.workers.actor.dp_actor.DataParallelPPOActor` (:mod:`verl.utils.dp_update`),
so both backends compute the same gradients.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from verl.protocol import DataProto
from verl.utils.dp_update import (DPInfo, append_to_dict, cfg_get, loss_weight_context, micro_batch_weight,
                                  split_micro_batches, to_float)
from verl.utils.megatron_cpu import device_scope
from verl.utils.megatron_utils import (broadcast_from_last_pp_stage, causal_padding_mask, get_parallel_info,
                                       grads_are_finite, run_forward_backward, unwrap_model, vocab_parallel_log_probs)
from verl.utils.seqlen_balancing import restore_dynamic_batch
from verl.workers.actor.base import BasePPOActor

__all__ = ["MegatronPPOActor", "megatron_forward"]

logger = logging.getLogger(__name__)

_FORWARD_KEYS = ("responses", "input_ids", "attention_mask", "position_ids")


def megatron_forward(model: torch.nn.Module, mb: Any) -> torch.Tensor:
    """One chunk's forward on a padded micro-batch: the sequence is right-padded to a multiple of the TP size under
    sequence parallelism (and the padding dropped from the last stage's output)."""
    input_ids, attention_mask = mb["input_ids"], mb["attention_mask"]
    position_ids = mb["position_ids"]
    config = unwrap_model(model).config
    seq = input_ids.shape[-1]
    multiple = int(config.tensor_model_parallel_size) if config.sequence_parallel else 1
    pad = (-seq) % multiple
    if pad:
        input_ids = torch.nn.functional.pad(input_ids, (0, pad))
        attention_mask = torch.nn.functional.pad(attention_mask, (0, pad))
        position_ids = torch.nn.functional.pad(position_ids, (0, pad))
    output = model(input_ids, position_ids, causal_padding_mask(attention_mask))
    inner = unwrap_model(model)
    if pad and getattr(inner, "post_process", False):
        output = output[:, :seq]
    return output


def _split(data: DataProto, use_dynamic: bool, micro: Optional[int], max_token_len: Optional[int], dp: DPInfo):
    """Micro-batches (TensorDicts) and, with dynamic batching, the index to restore the input order."""
    if use_dynamic:
        from verl.utils.seqlen_balancing import prepare_dynamic_batch

        mbs, idx = prepare_dynamic_batch(data,
                                         max_token_len=int(max_token_len),
                                         dp_group=dp.group,
                                         same_micro_num_in_dp=dp.size > 1)
        return [m.batch for m in mbs], idx
    return [m.batch for m in data.split(int(micro))], None


class MegatronPPOActor(BasePPOActor):
    """PPO actor over this rank's megatron model chunks.

    Args:
        config: ``actor_rollout_ref.actor`` (or ``ref``) config; ``ppo_mini_batch_size`` already in rows per DP rank.
        hf_config: the Hugging Face config (vocabulary size).
        tf_config: megatron's ``TransformerConfig`` of the chunks.
        actor_module: this rank's model chunks (one per virtual pipeline stage; DDP-wrapped when trained).
        actor_optimizer: megatron's optimizer (None for a forward-only reference policy).
    """

    def __init__(self,
                 config: Any,
                 hf_config: Any,
                 tf_config: Any,
                 actor_module: list,
                 actor_optimizer: Any = None) -> None:
        super().__init__(config)
        self.hf_config = hf_config
        self.tf_config = tf_config
        self.actor_module = list(actor_module)
        self.actor_optimizer = actor_optimizer
        self.vocab_size = int(hf_config.vocab_size)
        self.num_skipped_steps = 0
        self._shuffle_generator = torch.Generator()
        self._shuffle_generator.manual_seed(int(cfg_get(config, "data_loader_seed", 0) or 0))

    # --------------------------------------------------------------------------------------------- helpers ----
    def _dp(self) -> DPInfo:
        from megatron.core import parallel_state as mpu

        return DPInfo(mpu.get_data_parallel_world_size(), mpu.get_data_parallel_group())

    def _log_probs(self, logits: torch.Tensor, mb: Any, temperature: float,
                   calculate_entropy: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Log-probs (and entropy) ``(b, response_length)`` of ``responses`` from the last stage's logits."""
        from megatron.core import parallel_state as mpu

        responses = mb["responses"]
        length = responses.shape[-1]
        logits = logits[:, -length - 1:-1]
        if temperature != 1.0:
            logits = logits / temperature
        return vocab_parallel_log_probs(logits,
                                        responses,
                                        self.vocab_size,
                                        calculate_entropy=calculate_entropy,
                                        tp_group=mpu.get_tensor_model_parallel_group(),
                                        tp_rank=mpu.get_tensor_model_parallel_rank(),
                                        tp_size=mpu.get_tensor_model_parallel_world_size())

    @staticmethod
    def _require_keys(data: DataProto, keys: list[str], where: str) -> None:
        missing = [k for k in keys if data.batch is None or k not in data.batch.keys()]
        if missing:
            raise KeyError(f"{where} needs batch columns {missing}; the batch has "
                           f"{[] if data.batch is None else sorted(data.batch.keys())}")

    def _train(self, mode: bool) -> None:
        for chunk in self.actor_module:
            chunk.train(mode)

    # ------------------------------------------------------------------------------------------- log-probs ----
    def compute_log_prob(self,
                         data: DataProto,
                         calculate_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Log-probs (and entropies) of ``responses``, ``(batch, response_length)``, in the rows' order, on every
        rank. ``meta_info``: ``micro_batch_size`` or ``use_dynamic_bsz`` + ``max_token_len``; ``temperature``."""
        self._require_keys(data, list(_FORWARD_KEYS), "compute_log_prob")
        temperature = float(data.meta_info.get("temperature", 1.0))
        use_dynamic = bool(data.meta_info.get("use_dynamic_bsz", False))
        micro = data.meta_info.get("micro_batch_size")
        if use_dynamic and data.meta_info.get("max_token_len") is None:
            raise KeyError("compute_log_prob with use_dynamic_bsz needs meta_info['max_token_len'] (set "
                           "log_prob_max_token_len_per_gpu)")
        if not use_dynamic and (micro is None or int(micro) <= 0):
            raise KeyError("compute_log_prob needs meta_info['micro_batch_size'] (set "
                           "log_prob_micro_batch_size_per_gpu) or meta_info['use_dynamic_bsz']=True")
        selected = data.select(batch_keys=list(_FORWARD_KEYS), non_tensor_batch_keys=[])
        rows, length = len(data), data.batch["responses"].shape[-1]
        with device_scope():
            micro_batches, batch_idx = _split(selected, use_dynamic, micro, data.meta_info.get("max_token_len"),
                                              self._dp())

            def loss_fn(logits: torch.Tensor, mb: Any) -> tuple:
                lp, ent = self._log_probs(logits, mb, temperature, calculate_entropy)
                out = {"log_probs": lp.detach().cpu()}
                if ent is not None:
                    out["entropys"] = ent.detach().cpu()
                return logits.new_zeros(()), out

            self._train(False)
            try:
                with torch.no_grad():
                    outputs = run_forward_backward(self.actor_module, micro_batches, megatron_forward, loss_fn, True)
            finally:
                self._train(True)
            info = get_parallel_info()
            log_probs = entropys = None
            if info.is_last_stage:
                log_probs = torch.cat([o["log_probs"] for o in outputs], dim=0)
                if calculate_entropy:
                    entropys = torch.cat([o["entropys"] for o in outputs], dim=0)
            log_probs = broadcast_from_last_pp_stage(log_probs, (rows, length), torch.float32)
            if calculate_entropy:
                entropys = broadcast_from_last_pp_stage(entropys, (rows, length), torch.float32)
        if batch_idx is not None:
            log_probs = restore_dynamic_batch(log_probs, batch_idx)
            if entropys is not None:
                entropys = restore_dynamic_batch(entropys, batch_idx)
        return log_probs, entropys

    # ---------------------------------------------------------------------------------------------- update ----
    def update_policy(self, data: DataProto) -> dict[str, list[float]]:
        """PPO update on ``data`` (this DP rank's rows). Returns metric lists (loss metrics per micro-batch on the
        last stage, ``actor/grad_norm`` per mini-batch, ``actor/skipped_steps``)."""
        from verl.trainer.ppo import core_algos

        if self.actor_optimizer is None:
            raise ValueError("update_policy needs an optimizer: build MegatronPPOActor(..., actor_optimizer=...)")
        c = self.config
        mini = cfg_get(c, "ppo_mini_batch_size")
        if mini is None or int(mini) <= 0:
            raise ValueError(f"actor.ppo_mini_batch_size must be a positive int (rows per DP rank after the worker's "
                             f"normalisation), got {mini!r}")
        use_dynamic = bool(cfg_get(c, "use_dynamic_bsz", False))
        max_token_len = cfg_get(c, "ppo_max_token_len_per_gpu")
        if use_dynamic and not max_token_len:
            raise ValueError("actor.use_dynamic_bsz=True needs actor.ppo_max_token_len_per_gpu")
        micro = cfg_get(c, "ppo_micro_batch_size_per_gpu")
        epochs = int(cfg_get(c, "ppo_epochs", 1))
        entropy_coeff = float(cfg_get(c, "entropy_coeff", 0.0))
        use_kl_loss = bool(cfg_get(c, "use_kl_loss", False))
        kl_coef = float(cfg_get(c, "kl_loss_coef", 0.001))
        kl_type = str(cfg_get(c, "kl_loss_type", "low_var_kl"))
        mode = str(cfg_get(c, "loss_agg_mode", "token-mean"))
        policy_loss_fn = core_algos.get_policy_loss_fn(str(cfg_get(c, "policy_loss.loss_mode", "vanilla")))

        self._require_keys(data, list(_FORWARD_KEYS) + ["advantages"], "update_policy")
        available = set(data.batch.keys())
        on_policy = -(-len(data) // int(mini)) == 1 and epochs == 1
        if "old_log_probs" not in available and not on_policy:
            raise KeyError("update_policy needs 'old_log_probs' (from compute_log_prob) unless the update is one "
                           "mini-batch for one epoch")
        if use_kl_loss and "ref_log_prob" not in available:
            raise KeyError("actor.use_kl_loss=True needs 'ref_log_prob' in the batch: enable the reference policy, or "
                           "set actor_rollout_ref.actor.use_kl_loss=False")
        optional = ["response_mask", "old_log_probs", "rollout_is_weights"] + (["ref_log_prob"] if use_kl_loss else [])
        keys = list(_FORWARD_KEYS) + ["advantages"] + [k for k in optional if k in available]
        work = data.select(batch_keys=keys, non_tensor_batch_keys=[])
        if "response_mask" not in available:
            work.batch["response_mask"] = data.batch["attention_mask"][:, -data.batch["responses"].shape[-1]:]
        has_is_weights = "rollout_is_weights" in available
        temperature = float(data.meta_info.get("temperature", 1.0))

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

                    def loss_fn(logits: torch.Tensor, mb: Any) -> tuple:
                        response_mask = mb["response_mask"].to(torch.float32)
                        log_prob, entropy = self._log_probs(logits, mb, temperature, True)
                        if entropy_coeff == 0:
                            entropy = entropy.detach()
                        old = log_prob.detach() if on_policy else mb["old_log_probs"]
                        pg_loss, pg_metrics = policy_loss_fn(
                            old_log_prob=old,
                            log_prob=log_prob,
                            advantages=mb["advantages"],
                            response_mask=response_mask,
                            loss_agg_mode=mode,
                            config=c,
                            rollout_is_weights=mb["rollout_is_weights"] if has_is_weights else None)
                        entropy_agg = core_algos.agg_loss(loss_mat=entropy, loss_mask=response_mask, loss_agg_mode=mode)
                        loss = pg_loss - entropy_coeff * entropy_agg if entropy_coeff != 0 else pg_loss
                        out = {"actor/pg_loss": to_float(pg_loss), "actor/entropy": to_float(entropy_agg)}
                        if use_kl_loss:
                            kld = core_algos.kl_penalty(logprob=log_prob,
                                                        ref_logprob=mb["ref_log_prob"],
                                                        kl_penalty=kl_type)
                            kl_loss = core_algos.agg_loss(loss_mat=kld, loss_mask=response_mask, loss_agg_mode=mode)
                            loss = loss + kl_coef * kl_loss
                            out["actor/kl_loss"] = to_float(kl_loss)
                            out["actor/kl_coef"] = kl_coef
                        for key, value in (pg_metrics or {}).items():
                            out[key if key.startswith("actor/") else f"actor/{key}"] = to_float(value)
                        weight = micro_batch_weight(response_mask, mode, global_units, dp)
                        # megatron divides by the number of micro-batches; DDP averages over DP ranks
                        return loss * (weight * n_micro), out

                    for chunk in self.actor_module:
                        chunk.zero_grad_buffer()
                    self.actor_optimizer.zero_grad()
                    outputs = run_forward_backward(self.actor_module, micro_batches, megatron_forward, loss_fn, False)
                    for out in outputs:
                        append_to_dict(metrics, out)
                    grad_norm, stepped = self._optimizer_step()
                    if not stepped:
                        skipped += 1
                        self.num_skipped_steps += 1
                        logger.warning("actor: gradient norm is %s, skipping this optimizer step", grad_norm)
                    append_to_dict(metrics, {"actor/grad_norm": grad_norm})
            for chunk in self.actor_module:
                chunk.zero_grad_buffer()
            self.actor_optimizer.zero_grad()
        metrics["actor/skipped_steps"] = [float(skipped)]
        return metrics

    def _optimizer_step(self) -> tuple[float, bool]:
        return megatron_optimizer_step(self.actor_module, self.actor_optimizer)


def megatron_optimizer_step(chunks: list, optimizer: Any) -> tuple[float, bool]:
    """Step megatron's optimizer (it clips to ``clip_grad``) unless a gradient is not finite on some rank; returns
    ``(grad_norm, stepped)``, the same on every rank."""
    if not grads_are_finite(chunks):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        return float("nan"), False
    ok, grad_norm, _ = optimizer.step()
    norm = float(grad_norm) if grad_norm is not None else float("nan")
    return norm, bool(ok)
