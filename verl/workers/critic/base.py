"""The interface every PPO critic implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from verl.protocol import DataProto

__all__ = ["BasePPOCritic"]


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
