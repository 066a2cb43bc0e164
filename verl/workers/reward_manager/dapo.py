"""DAPO reward manager: the naive score plus a soft penalty for responses that run into the length limit.

With ``overlong_buffer_cfg = {enable: True, len: L, penalty_factor: f, log: bool}`` and ``max_resp_len = M``, a
response of ``n`` tokens gets ``min(-(n - (M - L)) / L * f, 0)`` added: nothing up to ``M - L`` tokens, then a
penalty growing linearly to ``-f`` at ``M`` tokens.
"""
from __future__ import annotations

from typing import Any

import torch

from verl.utils.reward_score.custom import cfg_get
from verl.workers.reward_manager.abstract import RawRewardFn
from verl.workers.reward_manager.common import (Examiner, build_reward_extra_info, build_reward_tensor, has_rm_scores,
                                                rm_scores_result)
from verl.workers.reward_manager.naive import NaiveRewardManager
from verl.workers.reward_manager.registry import register


def overlong_penalty(response_length: int, max_resp_len: int, buffer_len: int, penalty_factor: float) -> float:
    """The (non-positive) overlong reward of a response of ``response_length`` tokens."""
    expected_len = max_resp_len - buffer_len
    exceed_len = response_length - expected_len
    return min(-exceed_len / buffer_len * penalty_factor, 0.0)


@register("dapo")
class DAPORewardManager(NaiveRewardManager):
    """Naive scoring plus the overlong buffer penalty (when ``overlong_buffer_cfg.enable``)."""

    def __init__(self,
                 tokenizer: Any,
                 num_examine: int,
                 compute_score: RawRewardFn | None = None,
                 reward_fn_key: str = "data_source",
                 max_resp_len: int | None = None,
                 overlong_buffer_cfg: Any = None,
                 error_score: float = 0.0,
                 timeout_s: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(tokenizer,
                         num_examine,
                         compute_score,
                         reward_fn_key,
                         error_score=error_score,
                         timeout_s=timeout_s)
        self.overlong_buffer_cfg = overlong_buffer_cfg
        self.max_resp_len = max_resp_len
        self.overlong_enabled = bool(cfg_get(overlong_buffer_cfg, "enable", False))
        if self.overlong_enabled:
            if max_resp_len is None:
                raise ValueError("dapo reward manager: overlong_buffer_cfg.enable=True needs max_resp_len (set it to "
                                 "data.max_response_length).")
            self.buffer_len = int(cfg_get(overlong_buffer_cfg, "len", 0))
            self.penalty_factor = float(cfg_get(overlong_buffer_cfg, "penalty_factor", 1.0))
            self.log_overlong = bool(cfg_get(overlong_buffer_cfg, "log", False))
            if not 0 < self.buffer_len <= int(max_resp_len):
                raise ValueError(f"dapo reward manager: overlong_buffer_cfg.len must be in (0, max_resp_len="
                                 f"{max_resp_len}], got {self.buffer_len}.")
            if self.penalty_factor < 0:
                raise ValueError(f"dapo reward manager: overlong_buffer_cfg.penalty_factor must be >= 0, got "
                                 f"{self.penalty_factor}.")

    def __call__(self, data: Any, return_dict: bool = False) -> torch.Tensor | dict[str, Any]:
        if has_rm_scores(data):
            return rm_scores_result(data, return_dict)
        samples, outcomes = self.score_samples(data)
        examiner = Examiner(self.num_examine)
        rewards = []
        for sample, outcome in zip(samples, outcomes):
            reward = outcome.score
            extra = {}
            if self.overlong_enabled:
                penalty = overlong_penalty(sample.valid_response_length, int(self.max_resp_len), self.buffer_len,
                                           self.penalty_factor)
                reward += penalty
                if self.log_overlong:
                    extra = {"overlong_reward": penalty, "overlong": penalty < 0}
                    outcome.extras.update(extra)
            rewards.append(reward)
            examiner.maybe_print(sample, outcome, {"reward": reward} if self.overlong_enabled else None)
        reward_tensor = build_reward_tensor(data, samples, rewards)
        if return_dict:
            return {"reward_tensor": reward_tensor, "reward_extra_info": build_reward_extra_info(outcomes)}
        return reward_tensor
