"""The interface every PPO actor implements (data-parallel FSDP, Megatron, ...)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from verl.protocol import DataProto

__all__ = ["BasePPOActor"]


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
