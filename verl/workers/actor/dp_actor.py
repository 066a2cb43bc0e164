"""The data-parallel PPO actor: an FSDP2-sharded (or plain) HF causal LM that scores and learns from responses.

``compute_log_prob`` runs forward-only over micro-batches; ``update_policy`` runs the PPO update: mini-batches x
``ppo_epochs``, micro-batches with gradient accumulation, policy loss from the ``core_algos`` registry, entropy bonus,
KL loss against the reference policy, gradient clipping with a skipped step on a non-finite norm.

Config: an omegaconf DictConfig (or dict / dataclass) with verl's ``actor_rollout_ref.actor.*`` key names; the
worker has already turned ``ppo_mini_batch_size`` into rows per GPU. ``use_remove_padding`` (upstream under
``actor_rollout_ref.model``) is read from this config too. With ``ulysses_sequence_parallel_size`` > 1 (needs
``use_remove_padding``) the forward runs under the worker's Ulysses context: the ranks of an sp group get the same
rows, each runs the model on its slice of the packed tokens, and the log-probs are all-gathered
(:mod:`verl.utils.ulysses`); token budgets of dynamic batching are per rank, so a micro-batch holds ``sp`` times more.

Losses are weighted so that the gradient equals that of the loss aggregated over the whole mini-batch on all ranks,
whatever the micro-batching (see :mod:`verl.utils.dp_update`).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from verl.protocol import DataProto
from verl.utils import torch_functional as verl_F
from verl.utils.dp_update import (FORWARD_KEYS, PPOSchedule, require_batch_keys, cfg_get, device_of, get_dp_info,
                                  defer_gradient_reduction, guarded_optimizer_step, micro_batch_weight, run_ppo_epochs)
from verl.utils.remove_padding import forward_response_positions, scatter_to_response
from verl.utils.seqlen_balancing import prepare_dynamic_batch, restore_dynamic_batch
from verl.utils.ulysses import check_ulysses_config, check_ulysses_group, ulysses_forward_response_positions
from verl.workers.actor.base import BasePPOActor, PPOPolicyLoss

__all__ = ["DataParallelPPOActor", "logprobs_and_entropy_from_logits"]

logger = logging.getLogger(__name__)


def logprobs_and_entropy_from_logits(logits: torch.Tensor,
                                     labels: torch.Tensor,
                                     calculate_entropy: bool = False,
                                     entropy_grad: bool = True,
                                     chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of ``labels`` and (optionally) the entropy of ``softmax(logits)``, sharing one logsumexp.

    ``logits`` ``(N, vocab)``, ``labels`` ``(N,)``; results are float32 ``(N,)``. Without entropy this is
    :func:`verl.utils.torch_functional.logprobs_from_logits`. With entropy, ``log p = z - logsumexp(z)`` and
    ``H = logsumexp(z) - sum(softmax(z) * z)`` come from the same logsumexp. When the entropy needs no gradient
    (``entropy_grad=False``: the metrics-only entropy of an update with ``entropy_coeff=0``, or no autograd) both come
    from one chunked pass over the rows (``chunk_rows``, default ~64M logits per chunk) whose backward recomputes the
    softmax chunk by chunk, so no full float32 copy of the logits is ever kept. An entropy bonus in the loss
    (``entropy_grad=True`` under autograd) forms the softmax for the whole micro-batch, since its gradient needs it.
    """
    if not calculate_entropy:
        return verl_F.logprobs_from_logits(logits, labels, chunk_size=chunk_rows), None
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} must be (N, vocab) and labels {tuple(labels.shape)} (N,)")
    if not entropy_grad or not torch.is_grad_enabled():
        # one chunked pass gives both; the entropy carries no gradient
        log_probs, entropy = verl_F.logprobs_from_logits(logits, labels, chunk_size=chunk_rows, return_entropy=True)
        return log_probs.float(), entropy.float()
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    log_probs = z.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1) - lse
    entropy = lse - (torch.exp(z - lse.unsqueeze(-1)) * z).sum(dim=-1)
    return log_probs, entropy


class DataParallelPPOActor(BasePPOActor):
    """PPO actor over a (possibly FSDP2-wrapped) HF causal LM, one instance per data-parallel rank."""

    def __init__(self,
                 config: Any,
                 actor_module: torch.nn.Module,
                 actor_optimizer: torch.optim.Optimizer | None = None) -> None:
        super().__init__(config)
        self.actor_module = actor_module
        self.actor_optimizer = actor_optimizer
        self.use_remove_padding = bool(cfg_get(config, "use_remove_padding", False))
        self.ulysses_sequence_parallel_size = int(cfg_get(config, "ulysses_sequence_parallel_size", 1))
        check_ulysses_config(self.ulysses_sequence_parallel_size, self.use_remove_padding,
                             "actor_rollout_ref.actor.ulysses_sequence_parallel_size",
                             "actor_rollout_ref.model.use_remove_padding")
        self.num_skipped_steps = 0
        self._shuffle_generator = torch.Generator()
        self._shuffle_generator.manual_seed(int(cfg_get(config, "data_loader_seed", 0) or 0))

    # ----------------------------------------------------------------------------------------------- forward ----
    def _forward_micro_batch(self,
                             micro_batch: Any,
                             temperature: float,
                             calculate_entropy: bool = False,
                             entropy_grad: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(entropy or None, log_probs)`` of the micro-batch's responses, each ``(batch, response_length)``; zero
        at positions that are padding."""
        device = device_of(self.actor_module)
        responses = micro_batch["responses"].to(device)
        if self.ulysses_sequence_parallel_size > 1:
            return self._forward_micro_batch_ulysses(micro_batch, responses, temperature, calculate_entropy,
                                                     entropy_grad)
        logits, selected = forward_response_positions(self.actor_module,
                                                      micro_batch["input_ids"].to(device),
                                                      micro_batch["attention_mask"].to(device),
                                                      micro_batch["position_ids"].to(device),
                                                      response_length=responses.shape[-1],
                                                      use_remove_padding=self.use_remove_padding)
        if temperature != 1.0:
            logits = logits / temperature
        log_probs, entropy = logprobs_and_entropy_from_logits(logits,
                                                              responses[selected],
                                                              calculate_entropy=calculate_entropy,
                                                              entropy_grad=entropy_grad)
        log_probs = scatter_to_response(log_probs, selected)
        if entropy is not None:
            entropy = scatter_to_response(entropy, selected)
        return entropy, log_probs

    def _forward_micro_batch_ulysses(self, micro_batch: Any, responses: torch.Tensor, temperature: float,
                                     calculate_entropy: bool,
                                     entropy_grad: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """:meth:`_forward_micro_batch` with Ulysses: this rank runs the model on its slice of the packed tokens,
        computes log-probs (and entropies) there and all-gathers them over the sp group."""

        def head(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            if temperature != 1.0:
                logits = logits / temperature
            log_probs, entropy = logprobs_and_entropy_from_logits(logits,
                                                                  labels,
                                                                  calculate_entropy=calculate_entropy,
                                                                  entropy_grad=entropy_grad)
            return log_probs[:, None] if entropy is None else torch.stack([log_probs, entropy], dim=-1)

        check_ulysses_group(self.ulysses_sequence_parallel_size)
        device = responses.device
        results, selected = ulysses_forward_response_positions(self.actor_module,
                                                               micro_batch["input_ids"].to(device),
                                                               micro_batch["attention_mask"].to(device),
                                                               micro_batch["position_ids"].to(device),
                                                               response_length=responses.shape[-1],
                                                               head_fn=head,
                                                               responses=responses)
        log_probs = scatter_to_response(results[:, 0], selected)
        entropy = scatter_to_response(results[:, 1], selected) if calculate_entropy else None
        return entropy, log_probs

    def compute_log_prob(self,
                         data: DataProto,
                         calculate_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) of ``responses``, ``(batch, response_length)``, in the rows' order.

        ``meta_info``: ``micro_batch_size`` (rows per forward), or ``use_dynamic_bsz`` with ``max_token_len``
        (tokens per forward); ``temperature`` (default 1.0; must be the rollout's sampling temperature).
        """
        require_batch_keys(data, list(FORWARD_KEYS), "compute_log_prob")
        temperature = float(data.meta_info.get("temperature", 1.0))
        use_dynamic_bsz = bool(data.meta_info.get("use_dynamic_bsz", False))
        selected = data.select(batch_keys=list(FORWARD_KEYS), non_tensor_batch_keys=[])
        batch_idx = None
        if use_dynamic_bsz:
            max_token_len = data.meta_info.get("max_token_len")
            if max_token_len is None:
                raise KeyError("compute_log_prob with use_dynamic_bsz needs meta_info['max_token_len'] (set "
                               "log_prob_max_token_len_per_gpu)")
            dp = get_dp_info(self.actor_module)
            # each sp rank holds 1/sp of a micro-batch's tokens
            micro_batches, batch_idx = prepare_dynamic_batch(selected,
                                                             max_token_len=int(max_token_len) *
                                                             self.ulysses_sequence_parallel_size,
                                                             dp_group=dp.group,
                                                             same_micro_num_in_dp=dp.size > 1)
        else:
            micro_batch_size = data.meta_info.get("micro_batch_size")
            if micro_batch_size is None or int(micro_batch_size) <= 0:
                raise KeyError("compute_log_prob needs meta_info['micro_batch_size'] (set "
                               "log_prob_micro_batch_size_per_gpu) or meta_info['use_dynamic_bsz']=True")
            micro_batches = selected.split(int(micro_batch_size))

        was_training = self.actor_module.training
        self.actor_module.eval()
        log_probs_list, entropy_list = [], []
        try:
            with torch.no_grad():
                for micro in micro_batches:
                    entropy, log_probs = self._forward_micro_batch(micro.batch, temperature, calculate_entropy)
                    log_probs_list.append(log_probs)
                    if entropy is not None:
                        entropy_list.append(entropy)
        finally:
            self.actor_module.train(was_training)
        log_probs = torch.cat(log_probs_list, dim=0)
        entropys = torch.cat(entropy_list, dim=0) if calculate_entropy else None
        if batch_idx is not None:
            log_probs = restore_dynamic_batch(log_probs, batch_idx)
            if entropys is not None:
                entropys = restore_dynamic_batch(entropys, batch_idx)
        return log_probs, entropys

    # ------------------------------------------------------------------------------------------------ update ----
    def update_policy(self, data: DataProto) -> dict[str, list[float]]:
        """PPO update on ``data`` (this rank's rows). Returns metrics as lists (one entry per micro-batch, or per
        mini-batch for ``actor/grad_norm``); ``actor/skipped_steps`` counts optimizer steps skipped because the
        gradient norm was not finite."""
        if self.actor_optimizer is None:
            raise ValueError("update_policy needs an optimizer: build DataParallelPPOActor(config, module, optimizer)")
        # with use_dynamic_bsz each sp rank holds 1/sp of a micro-batch's tokens
        schedule = PPOSchedule.from_config(self.config, "actor", token_scale=self.ulysses_sequence_parallel_size)
        policy_loss = PPOPolicyLoss(self.config, schedule.loss_agg_mode)

        work, on_policy = policy_loss.select_update_inputs(data, schedule.mini_batch_size, schedule.epochs)
        temperature = float(data.meta_info.get("temperature", 1.0))
        grad_clip = cfg_get(self.config, "grad_clip", 1.0)
        dp = get_dp_info(self.actor_module)

        def accumulate_grads(micro_batches: list, global_units: float) -> list[dict[str, Any]]:
            self.actor_optimizer.zero_grad(set_to_none=True)
            micro_metrics = []
            for index, micro in enumerate(micro_batches):
                defer_gradient_reduction(self.actor_module, index == len(micro_batches) - 1, dp)
                mb = micro.batch.to(device_of(self.actor_module))
                entropy, log_prob = self._forward_micro_batch(mb,
                                                              temperature,
                                                              calculate_entropy=True,
                                                              entropy_grad=policy_loss.entropy_coeff != 0)
                loss, metrics = policy_loss(log_prob, entropy, mb, on_policy)
                weight = micro_batch_weight(mb["response_mask"], schedule.loss_agg_mode, global_units, dp)
                (loss * weight).backward()
                micro_metrics.append(metrics)
            return micro_metrics

        self.actor_module.train()
        metrics, skipped = run_ppo_epochs(
            work,
            schedule,
            accumulate_grads,
            lambda: guarded_optimizer_step(self.actor_module, self.actor_optimizer, grad_clip),
            role="actor",
            dp=dp,
            generator=self._shuffle_generator,
            log=logger)
        self.num_skipped_steps += skipped
        self.actor_optimizer.zero_grad(set_to_none=True)
        return metrics
