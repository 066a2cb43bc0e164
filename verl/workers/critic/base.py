"""The interface every PPO critic implements, and the per-micro-batch value loss they share
(:func:`ppo_value_loss`)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from verl.protocol import DataProto
from verl.utils.dp_update import to_float

__all__ = ["BasePPOCritic", "ppo_value_loss"]


class BasePPOCritic(ABC):
    """A value function over response positions; workers drive it with DataProto batches."""

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def compute_values(self, data: DataProto) -> torch.Tensor:
        """Values of the states before each response token, ``(batch, response_length)``."""

    @abstractmethod
    def update_critic(self, data: DataProto) -> dict[str, Any]:
        """One value-regression update over ``data``; returns metrics."""


def ppo_value_loss(vpreds: torch.Tensor, mb: Any, cliprange_value: float,
                   loss_agg_mode: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """The critic's clipped value loss on one micro-batch (``response_mask``, ``values``, ``returns``) and its
    metrics, one implementation for every backend; the caller applies the micro-batch's weight
    (:func:`verl.utils.dp_update.micro_batch_weight`)."""
    from verl.trainer.ppo import core_algos

    response_mask = mb["response_mask"].to(torch.float32)
    vf_loss, vf_clipfrac = core_algos.compute_value_loss(vpreds=vpreds,
                                                         returns=mb["returns"],
                                                         values=mb["values"],
                                                         response_mask=response_mask,
                                                         cliprange_value=cliprange_value,
                                                         loss_agg_mode=loss_agg_mode)
    denom = response_mask.sum().clamp(min=1.0)
    return vf_loss, {
        "critic/vf_loss": to_float(vf_loss),
        "critic/vf_clipfrac": to_float(vf_clipfrac),
        "critic/vpred_mean": to_float((vpreds.detach() * response_mask).sum() / denom),
    }
