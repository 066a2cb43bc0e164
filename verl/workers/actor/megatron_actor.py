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
from typing import Any, Callable, Optional

import torch

from verl.protocol import DataProto
from verl.utils.dp_update import (FORWARD_KEYS, DPInfo, PPOSchedule, cfg_get, micro_batch_weight, require_batch_keys,
                                  run_ppo_epochs)
from verl.utils.megatron_cpu import device_scope
from verl.utils.megatron_utils import (broadcast_from_last_pp_stage, causal_padding_mask, get_parallel_info,
                                       grads_are_finite, run_forward_backward, unwrap_model, vocab_parallel_log_probs)
from verl.utils.seqlen_balancing import restore_dynamic_batch
from verl.workers.actor.base import BasePPOActor, PPOPolicyLoss

__all__ = ["MegatronPPOActor", "megatron_forward", "gather_cp_tokens"]

logger = logging.getLogger(__name__)


def _cp(config: Any) -> tuple[int, int]:
    """(context-parallel size, this rank's CP rank)."""
    size = int(getattr(config, "context_parallel_size", 1) or 1)
    if size == 1:
        return 1, 0
    from megatron.core import parallel_state as mpu

    return size, mpu.get_context_parallel_rank()


def _padded_length(config: Any, seq: int) -> int:
    """The micro-batch length the model sees: a multiple of the TP size under sequence parallelism, and of
    ``2 * CP`` (x TP) with context parallelism (:func:`verl.models.mcore.cp_attention.cp_padded_length`)."""
    from verl.models.mcore.cp_attention import cp_padded_length

    multiple = int(config.tensor_model_parallel_size) if config.sequence_parallel else 1
    cp_size, _ = _cp(config)
    return cp_padded_length(seq, cp_size, multiple) if cp_size > 1 else -(-seq // multiple) * multiple


def megatron_forward(model: torch.nn.Module, mb: Any) -> torch.Tensor:
    """One chunk's forward on a padded micro-batch: the sequence is right-padded to a multiple of the TP size under
    sequence parallelism (and the padding dropped from the last stage's output). With context parallelism the rank
    feeds only its tokens (chunks ``r`` and ``2 CP - 1 - r``, megatron's rotary layout) with the mask rows of their
    global positions; the last stage then returns its *local* tokens' output, which :func:`gather_cp_tokens` (or
    :meth:`MegatronPPOActor._log_probs`) puts back in sequence order."""
    input_ids, attention_mask = mb["input_ids"], mb["attention_mask"]
    position_ids = mb["position_ids"]
    config = unwrap_model(model).config
    seq = input_ids.shape[-1]
    pad = _padded_length(config, seq) - seq
    if pad:
        input_ids = torch.nn.functional.pad(input_ids, (0, pad))
        attention_mask = torch.nn.functional.pad(attention_mask, (0, pad))
        position_ids = torch.nn.functional.pad(position_ids, (0, pad))
    cp_size, cp_rank = _cp(config)
    if cp_size > 1:
        from verl.models.mcore.cp_attention import cp_causal_padding_mask, cp_local_index

        index = cp_local_index(seq + pad, cp_size, cp_rank, input_ids.device)
        return model(input_ids[:, index], position_ids[:, index], cp_causal_padding_mask(attention_mask, index))
    output = model(input_ids, position_ids, causal_padding_mask(attention_mask))
    inner = unwrap_model(model)
    if pad and getattr(inner, "post_process", False):
        output = output[:, :seq]
    return output


def gather_cp_tokens(local: torch.Tensor, config: Any, seq: int) -> torch.Tensor:
    """Per-token outputs ``(b, s_local, ...)`` of this CP rank -> ``(b, seq, ...)`` in sequence order (identity without
    CP). The backward keeps this rank's slice of the gradient: every CP rank computes the same loss from the gathered
    tensor (megatron's schedule multiplies the loss by CP and DDP averages over DP x CP, so the summed gradient is
    the CP=1 gradient)."""
    cp_size, _ = _cp(config)
    if cp_size == 1:
        return local
    from verl.models.mcore.cp_attention import gather_from_cp

    return gather_from_cp(local, 1, sum_grads=False)[:, :seq]


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

    def _log_probs(self,
                   logits: torch.Tensor,
                   mb: Any,
                   temperature: float,
                   calculate_entropy: bool,
                   entropy_grad: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Log-probs (and entropy) ``(b, response_length)`` of ``responses`` from the last stage's logits
        (``entropy_grad=False``: the entropy for metrics only, see :func:`vocab_parallel_log_probs`)."""
        from megatron.core import parallel_state as mpu

        responses = mb["responses"]
        length = responses.shape[-1]
        cp_size, cp_rank = _cp(self.tf_config)
        seq = mb["input_ids"].shape[-1]
        if cp_size > 1:
            # this rank's logits are those of its tokens (layout of cp_local_index): label each with the next token
            # of the sequence, then gather the per-token log-probs (not the logits) over the CP group
            from verl.models.mcore.cp_attention import cp_local_index

            input_ids = mb["input_ids"]
            padded = _padded_length(self.tf_config, seq)
            next_ids = torch.nn.functional.pad(input_ids[:, 1:], (0, padded - seq + 1))
            labels = next_ids[:, cp_local_index(padded, cp_size, cp_rank, input_ids.device)]
        else:
            logits = logits[:, -length - 1:-1]
            labels = responses
        if temperature != 1.0:
            logits = logits / temperature
        log_probs, entropy = vocab_parallel_log_probs(logits,
                                                      labels,
                                                      self.vocab_size,
                                                      calculate_entropy=calculate_entropy,
                                                      tp_group=mpu.get_tensor_model_parallel_group(),
                                                      tp_rank=mpu.get_tensor_model_parallel_rank(),
                                                      tp_size=mpu.get_tensor_model_parallel_world_size(),
                                                      entropy_grad=entropy_grad)
        if cp_size > 1:
            log_probs = gather_cp_tokens(log_probs, self.tf_config, seq)[:, -length - 1:-1]
            if entropy is not None:
                entropy = gather_cp_tokens(entropy, self.tf_config, seq)[:, -length - 1:-1]
        return log_probs, entropy

    def _train(self, mode: bool) -> None:
        for chunk in self.actor_module:
            chunk.train(mode)

    # ------------------------------------------------------------------------------------------- log-probs ----
    def compute_log_prob(self,
                         data: DataProto,
                         calculate_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Log-probs (and entropies) of ``responses``, ``(batch, response_length)``, in the rows' order, on every
        rank. ``meta_info``: ``micro_batch_size`` or ``use_dynamic_bsz`` + ``max_token_len``; ``temperature``."""
        require_batch_keys(data, list(FORWARD_KEYS), "compute_log_prob")
        temperature = float(data.meta_info.get("temperature", 1.0))
        use_dynamic = bool(data.meta_info.get("use_dynamic_bsz", False))
        micro = data.meta_info.get("micro_batch_size")
        if use_dynamic and data.meta_info.get("max_token_len") is None:
            raise KeyError("compute_log_prob with use_dynamic_bsz needs meta_info['max_token_len'] (set "
                           "log_prob_max_token_len_per_gpu)")
        if not use_dynamic and (micro is None or int(micro) <= 0):
            raise KeyError("compute_log_prob needs meta_info['micro_batch_size'] (set "
                           "log_prob_micro_batch_size_per_gpu) or meta_info['use_dynamic_bsz']=True")
        selected = data.select(batch_keys=list(FORWARD_KEYS), non_tensor_batch_keys=[])
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
        if self.actor_optimizer is None:
            raise ValueError("update_policy needs an optimizer: build MegatronPPOActor(..., actor_optimizer=...)")
        c = self.config
        schedule = PPOSchedule.from_config(c, "actor", rows_per="DP rank")
        policy_loss = PPOPolicyLoss(c, schedule.loss_agg_mode)

        work, on_policy = policy_loss.select_update_inputs(data, schedule.mini_batch_size, schedule.epochs)
        temperature = float(data.meta_info.get("temperature", 1.0))

        with device_scope():
            dp = self._dp()

            def accumulate_grads(micro_batches: list, global_units: float) -> list[dict[str, Any]]:
                n_micro = len(micro_batches)

                def loss_fn(logits: torch.Tensor, mb: Any) -> tuple:
                    log_prob, entropy = self._log_probs(logits,
                                                        mb,
                                                        temperature,
                                                        True,
                                                        entropy_grad=policy_loss.entropy_coeff != 0)
                    loss, out = policy_loss(log_prob, entropy, mb, on_policy)
                    weight = micro_batch_weight(mb["response_mask"], schedule.loss_agg_mode, global_units, dp)
                    # megatron divides by the number of micro-batches; DDP averages over DP ranks
                    return loss * (weight * n_micro), out

                return megatron_accumulate_grads(self.actor_module, self.actor_optimizer, micro_batches, loss_fn)

            self._train(True)
            metrics, skipped = run_ppo_epochs(work,
                                              schedule,
                                              accumulate_grads,
                                              self._optimizer_step,
                                              role="actor",
                                              dp=dp,
                                              generator=self._shuffle_generator,
                                              log=logger)
            self.num_skipped_steps += skipped
            zero_megatron_grads(self.actor_module, self.actor_optimizer)
        return metrics

    def _optimizer_step(self) -> tuple[float, bool]:
        return megatron_optimizer_step(self.actor_module, self.actor_optimizer)


def zero_megatron_grads(chunks: list, optimizer: Any) -> None:
    """Zero the DDP gradient buffers of ``chunks`` and ``optimizer``'s gradients."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


def megatron_accumulate_grads(chunks: list, optimizer: Any, micro_batches: list,
                              loss_fn: Callable[[torch.Tensor, Any], tuple]) -> list[dict[str, Any]]:
    """One mini-batch's gradients for a Megatron actor or critic (the ``accumulate_grads`` of
    :func:`verl.utils.dp_update.run_ppo_epochs`): zero them, then run megatron's schedule forward and backward over
    the micro-batches (DataProtos) with ``loss_fn(output, micro_batch) -> (loss, metrics)``; returns the metrics."""
    zero_megatron_grads(chunks, optimizer)
    return run_forward_backward(chunks, [m.batch for m in micro_batches], megatron_forward, loss_fn, False)


def megatron_optimizer_step(chunks: list, optimizer: Any) -> tuple[float, bool]:
    """Step megatron's optimizer (it clips to ``clip_grad``) unless a gradient is not finite on some rank; returns
    ``(grad_norm, stepped)``, the same on every rank."""
    if not grads_are_finite(chunks):
        zero_megatron_grads(chunks, optimizer)
        return float("nan"), False
    ok, grad_norm, _ = optimizer.step()
    norm = float(grad_norm) if grad_norm is not None else float("nan")
    return norm, bool(ok)
