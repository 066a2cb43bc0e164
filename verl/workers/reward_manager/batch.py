"""Batch reward manager: one call of the scoring function with lists (for functions that batch internally, e.g.
a reward server or a vectorised checker)."""
from __future__ import annotations

import logging
from typing import Any

import torch

from verl.utils.reward_score import default_compute_score
from verl.workers.reward_manager.abstract import AbstractRewardManager, RawRewardFn
from verl.workers.reward_manager.common import (ErrorLog, Examiner, ScoreOutcome, build_reward_extra_info,
                                                build_reward_tensor, call_with_timeout, extract_samples, has_rm_scores,
                                                normalize_result, rm_scores_result)
from verl.workers.reward_manager.registry import register

logger = logging.getLogger(__name__)


def default_batch_compute_score(data_sources: list[str], solution_strs: list[str], ground_truths: list[Any],
                                extra_infos: list[Any], **kwargs: Any) -> list[Any]:
    """Element-wise :func:`default_compute_score`: lets the batch manager run without a custom function."""
    return [
        default_compute_score(ds, s, gt, ei, **kwargs)
        for ds, s, gt, ei in zip(data_sources, solution_strs, ground_truths, extra_infos)
    ]


@register("batch")
class BatchRewardManager(AbstractRewardManager):
    """Calls ``compute_score(data_sources=, solution_strs=, ground_truths=, extra_infos=, **reward_kwargs)`` once
    per batch; it must return one score (float or dict with ``"score"``) per sample.

    If the call raises (or exceeds ``timeout_s``), every sample gets ``error_score``; a single unusable element
    gives only that sample ``error_score``. A list of the wrong length is a bug in the function and raises.
    """

    def __init__(self,
                 tokenizer: Any,
                 num_examine: int,
                 compute_score: RawRewardFn | None = None,
                 reward_fn_key: str = "data_source",
                 error_score: float = 0.0,
                 timeout_s: float | None = None,
                 **reward_kwargs: Any) -> None:
        if compute_score is None or compute_score is default_compute_score:
            compute_score = default_batch_compute_score
        super().__init__(tokenizer, num_examine, compute_score, reward_fn_key, error_score=error_score)
        self.timeout_s = timeout_s
        self.reward_kwargs = reward_kwargs

    def __call__(self, data: Any, return_dict: bool = False) -> torch.Tensor | dict[str, Any]:
        if has_rm_scores(data):
            return rm_scores_result(data, return_dict)
        samples = extract_samples(data, self.tokenizer, self.reward_fn_key)
        errors = ErrorLog(self.error_score, what="batch reward function")
        kwargs = {
            "data_sources": [s.data_source for s in samples],
            "solution_strs": [s.response_str for s in samples],
            "ground_truths": [s.ground_truth for s in samples],
            "extra_infos": [s.extra_info for s in samples],
            **self.reward_kwargs,
        }
        outcomes: list[ScoreOutcome]
        try:
            results = call_with_timeout(self.compute_score, kwargs, self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - user code must not crash the run
            outcomes = [errors.record(s, exc) for s in samples]
        else:
            if results is None or not hasattr(results, "__len__") or len(results) != len(samples):
                got = "None" if results is None else (
                    f"{len(results)} items" if hasattr(results, "__len__") else type(results).__name__)
                raise ValueError(f"batch reward function {getattr(self.compute_score, '__name__', self.compute_score)}"
                                 f" returned {got} for a batch of {len(samples)}; it must return one score per "
                                 f"sample, in order.")
            outcomes = []
            for sample, result in zip(samples, results):
                try:
                    outcomes.append(normalize_result(result))
                except Exception as exc:  # noqa: BLE001
                    outcomes.append(errors.record(sample, exc))
        errors.summarize()
        examiner = Examiner(self.num_examine)
        for sample, outcome in zip(samples, outcomes):
            examiner.maybe_print(sample, outcome)
        reward_tensor = build_reward_tensor(data, samples, [o.score for o in outcomes])
        if return_dict:
            return {"reward_tensor": reward_tensor, "reward_extra_info": build_reward_extra_info(outcomes)}
        return reward_tensor
