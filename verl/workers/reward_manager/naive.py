"""The default reward manager: score each sample in turn with a rule-based or user function."""
from __future__ import annotations

from typing import Any

import torch

from verl.workers.reward_manager.abstract import AbstractRewardManager, RawRewardFn
from verl.workers.reward_manager.common import (ErrorLog, Examiner, ScoreOutcome, build_reward_extra_info,
                                                build_reward_tensor, extract_samples, has_rm_scores, rm_scores_result,
                                                safe_score)
from verl.workers.reward_manager.registry import register


@register("naive")
class NaiveRewardManager(AbstractRewardManager):
    """Sequential scoring. ``timeout_s`` (optional) limits each call of the scoring function on the main thread.

    Extra keyword arguments (``reward_model.reward_kwargs``) other than the named ones are ignored, as upstream.
    """

    def __init__(self,
                 tokenizer: Any,
                 num_examine: int,
                 compute_score: RawRewardFn | None = None,
                 reward_fn_key: str = "data_source",
                 error_score: float = 0.0,
                 timeout_s: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(tokenizer, num_examine, compute_score, reward_fn_key, error_score=error_score)
        self.timeout_s = timeout_s

    def score_samples(self, data: Any) -> tuple[list[Any], list[ScoreOutcome]]:
        """Decoded samples and their outcomes (shared with subclasses that adjust scores afterwards)."""
        samples = extract_samples(data, self.tokenizer, self.reward_fn_key)
        errors = ErrorLog(self.error_score)
        outcomes = [safe_score(self.compute_score, s, errors, timeout_s=self.timeout_s) for s in samples]
        errors.summarize()
        return samples, outcomes

    def __call__(self, data: Any, return_dict: bool = False) -> torch.Tensor | dict[str, Any]:
        if has_rm_scores(data):
            return rm_scores_result(data, return_dict)
        samples, outcomes = self.score_samples(data)
        examiner = Examiner(self.num_examine)
        for sample, outcome in zip(samples, outcomes):
            examiner.maybe_print(sample, outcome)
        reward_tensor = build_reward_tensor(data, samples, [o.score for o in outcomes])
        if return_dict:
            return {"reward_tensor": reward_tensor, "reward_extra_info": build_reward_extra_info(outcomes)}
        return reward_tensor
