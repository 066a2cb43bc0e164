"""``RayMinimalTrainer``: ``RayPPOTrainer`` plus one extra group of metrics, computed from the step's batch."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from verl.protocol import DataProto
from verl.trainer.ppo.ray_trainer import RayPPOTrainer
from verl.utils.config import cfg_select

__all__ = ["RayMinimalTrainer", "response_diversity_metrics"]


def response_diversity_metrics(responses: torch.Tensor, response_mask: torch.Tensor,
                               uids: Sequence[Any]) -> dict[str, float]:
    """How different the responses to each prompt are (rows sharing a uid form a group).

    ``diversity/distinct_ratio``: distinct responses (valid tokens compared) / group size, averaged over groups;
    ``diversity/identical_group_ratio``: the fraction of groups whose responses are all the same (GRPO learns
    nothing from those: every advantage is 0).
    """
    if len(uids) != responses.shape[0]:
        raise ValueError(f"response_diversity_metrics: {responses.shape[0]} responses but {len(uids)} uids")
    groups: dict[Any, list[tuple[int, ...]]] = {}
    lengths = response_mask.sum(dim=-1).tolist()
    for row, uid in enumerate(uids):
        tokens = tuple(responses[row, :int(lengths[row])].tolist())
        groups.setdefault(uid, []).append(tokens)
    distinct = [len(set(group)) / len(group) for group in groups.values()]
    identical = [len(set(group)) == 1 for group in groups.values()]
    return {
        "diversity/distinct_ratio": float(np.mean(distinct)) if distinct else 0.0,
        "diversity/identical_group_ratio": float(np.mean(identical)) if identical else 0.0,
    }


class RayMinimalTrainer(RayPPOTrainer):
    """The PPO trainer with one step changed: after the old log-probs (called once per step with the whole batch of
    responses), add :func:`response_diversity_metrics` to the step's metrics when ``diversity.enable``."""

    def _compute_old_log_prob(self, batch: DataProto, metrics: dict[str, Any]) -> None:
        super()._compute_old_log_prob(batch, metrics)
        if bool(cfg_select(self.config, "diversity.enable", False)):
            metrics.update(
                response_diversity_metrics(batch.batch["responses"], batch.batch["response_mask"],
                                           batch.non_tensor_batch["uid"].tolist()))
