"""Base class of reward managers: turn a rollout batch into token-level scores."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from verl.utils.reward_score import default_compute_score

RawRewardFn = Callable[..., Any]


class AbstractRewardManager(ABC):
    """``manager(data)`` -> ``[B, response_length]`` scores; ``manager(data, return_dict=True)`` ->
    ``{"reward_tensor": ..., "reward_extra_info": {key: list aligned with the batch}}``.

    Args:
        tokenizer: decodes prompts and responses for the scoring function.
        num_examine: samples per data source printed on each call (0 = silent).
        compute_score: ``fn(data_source, solution_str, ground_truth, extra_info=None, **kw)`` returning a float or a
            dict with ``"score"``; defaults to :func:`verl.utils.reward_score.default_compute_score`.
        reward_fn_key: the non-tensor column whose value is passed as ``data_source``.
        error_score: the score of a sample whose scoring function raised, timed out or returned something unusable
            (a warning is logged with the sample index and exception type; the run goes on).
    """

    def __init__(self,
                 tokenizer: Any,
                 num_examine: int,
                 compute_score: RawRewardFn | None = None,
                 reward_fn_key: str = "data_source",
                 error_score: float = 0.0,
                 **kwargs: Any) -> None:
        self.tokenizer = tokenizer
        self.num_examine = num_examine
        self.compute_score = compute_score if compute_score is not None else default_compute_score
        self.reward_fn_key = reward_fn_key
        self.error_score = float(error_score)

    @abstractmethod
    def __call__(self, data: Any, return_dict: bool = False) -> torch.Tensor | dict[str, Any]:
        """Score ``data`` (a rollout :class:`~verl.protocol.DataProto`)."""
