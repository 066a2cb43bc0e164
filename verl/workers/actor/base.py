"""The interface every PPO actor implements (data-parallel FSDP, Megatron, ...), and the per-micro-batch loss they
share (:class:`PPOPolicyLoss`)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from verl.protocol import DataProto
from verl.utils.dp_update import FORWARD_KEYS, cfg_get, require_batch_keys, to_float

__all__ = ["BasePPOActor", "PPOPolicyLoss"]


class BasePPOActor(ABC):
    """A policy that scores responses and learns from them; workers drive it with DataProto batches."""

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def compute_log_prob(self,
                         data: DataProto,
                         calculate_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probabilities (and optionally entropies) of ``responses`` given the prompts, ``(batch,
        response_length)`` each."""

    @abstractmethod
    def update_policy(self, data: DataProto) -> dict[str, Any]:
        """One PPO update over ``data`` (mini-batches x epochs); returns metrics."""


class PPOPolicyLoss:
    """The actor's loss on one micro-batch, one implementation for every backend so that they compute the same
    gradients: the policy loss (``policy_loss.loss_mode``), minus ``entropy_coeff`` x the entropy, plus
    ``kl_loss_coef`` x the KL to the reference policy (``use_kl_loss``, estimator ``kl_loss_type``), each aggregated
    over the micro-batch's response tokens with ``loss_agg_mode``. The caller applies the micro-batch's weight
    (:func:`verl.utils.dp_update.micro_batch_weight`).

    Args:
        config: the ``actor`` config.
        loss_agg_mode: ``actor.loss_agg_mode`` (as read by :class:`~verl.utils.dp_update.PPOSchedule`).
    """

    def __init__(self, config: Any, loss_agg_mode: str) -> None:
        from verl.trainer.ppo import core_algos

        self.config = config
        self.loss_agg_mode = loss_agg_mode
        self.entropy_coeff = float(cfg_get(config, "entropy_coeff", 0.0))
        self.use_kl_loss = bool(cfg_get(config, "use_kl_loss", False))
        self.kl_loss_coef = float(cfg_get(config, "kl_loss_coef", 0.001))
        self.kl_loss_type = str(cfg_get(config, "kl_loss_type", "low_var_kl"))
        self.policy_loss_fn = core_algos.get_policy_loss_fn(str(cfg_get(config, "policy_loss.loss_mode", "vanilla")))

    def select_update_inputs(self, data: DataProto, mini_batch_size: int, epochs: int) -> tuple[DataProto, bool]:
        """``(the columns of data the update reads, on_policy)``. ``on_policy``: one epoch over one mini-batch, where
        the old policy is the current one, so ``old_log_probs`` may be absent (the trainer skips that pass)."""
        require_batch_keys(data, list(FORWARD_KEYS) + ["advantages"], "update_policy")
        available = set(data.batch.keys())
        on_policy = -(-len(data) // mini_batch_size) == 1 and epochs == 1
        if "old_log_probs" not in available and not on_policy:
            raise KeyError("update_policy needs 'old_log_probs' (from compute_log_prob) unless the update is one "
                           "mini-batch for one epoch")
        if self.use_kl_loss and "ref_log_prob" not in available:
            raise KeyError("actor.use_kl_loss=True needs 'ref_log_prob' in the batch: enable the reference policy, or "
                           "set actor_rollout_ref.actor.use_kl_loss=False")
        optional = ["response_mask", "old_log_probs", "rollout_is_weights"
                   ] + (["ref_log_prob"] if self.use_kl_loss else [])
        keys = list(FORWARD_KEYS) + ["advantages"] + [k for k in optional if k in available]
        work = data.select(batch_keys=keys, non_tensor_batch_keys=[])
        if "response_mask" not in available:  # older producers: the response part of attention_mask
            work.batch["response_mask"] = data.batch["attention_mask"][:, -data.batch["responses"].shape[-1]:]
        return work, on_policy

    def __call__(self, log_prob: torch.Tensor, entropy: torch.Tensor, mb: Any,
                 on_policy: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(loss, metrics)`` of the micro-batch ``mb`` (``response_mask``, ``advantages``, and as needed
        ``old_log_probs``, ``ref_log_prob``, ``rollout_is_weights``) given the current ``log_prob`` and ``entropy``
        (detached when ``entropy_coeff`` is 0). ``on_policy``: the old policy is the current one (one mini-batch for
        one epoch), whose log-probs are ``log_prob`` detached."""
        from verl.trainer.ppo import core_algos

        mode = self.loss_agg_mode
        response_mask = mb["response_mask"].to(torch.float32)
        old_log_prob = log_prob.detach() if on_policy else mb["old_log_probs"]
        pg_loss, pg_metrics = self.policy_loss_fn(
            old_log_prob=old_log_prob,
            log_prob=log_prob,
            advantages=mb["advantages"],
            response_mask=response_mask,
            loss_agg_mode=mode,
            config=self.config,
            rollout_is_weights=mb["rollout_is_weights"] if "rollout_is_weights" in mb.keys() else None)
        entropy_agg = core_algos.agg_loss(loss_mat=entropy, loss_mask=response_mask, loss_agg_mode=mode)
        loss = pg_loss - self.entropy_coeff * entropy_agg if self.entropy_coeff != 0 else pg_loss
        metrics: dict[str, Any] = {"actor/pg_loss": to_float(pg_loss), "actor/entropy": to_float(entropy_agg)}
        if self.use_kl_loss:
            kld = core_algos.kl_penalty(logprob=log_prob, ref_logprob=mb["ref_log_prob"], kl_penalty=self.kl_loss_type)
            kl_loss = core_algos.agg_loss(loss_mat=kld, loss_mask=response_mask, loss_agg_mode=mode)
            loss = loss + self.kl_loss_coef * kl_loss
            metrics["actor/kl_loss"] = to_float(kl_loss)
            metrics["actor/kl_coef"] = self.kl_loss_coef
        for key, value in (pg_metrics or {}).items():
            metrics[key if key.startswith("actor/") else f"actor/{key}"] = to_float(value)
        return loss, metrics
