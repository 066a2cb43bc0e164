"""Rule-based reward functions, selected by a data row's ``data_source``.

``default_compute_score`` is what reward managers call when no ``custom_reward_function.path`` is configured.
Each scorer returns a float, or a dict with a ``"score"`` key plus extra values to log.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

from verl.utils.reward_score import arithmetic, countdown, gsm8k
from verl.utils.reward_score import math as math_score

logger = logging.getLogger(__name__)

__all__ = ["default_compute_score", "get_scorer", "known_data_sources", "UnknownDataSourceError"]

# exact data_source -> scorer
_EXACT: dict[str, Callable[..., Any]] = {
    "openai/gsm8k": gsm8k.compute_score,
    "gsm8k": gsm8k.compute_score,
    "lighteval/MATH": math_score.compute_score,
    "DigitalLearningGmbH/MATH-lighteval": math_score.compute_score,
    "HuggingFaceH4/MATH-500": math_score.compute_score,
    "math_dapo": math_score.compute_score_dapo,
    "math": math_score.compute_score_dapo,
    "math_dapo_reasoning": math_score.compute_score_dapo,
    "countdown": countdown.compute_score,
    "arithmetic": arithmetic.compute_score,
}
# data_source prefix -> scorer (checked after the exact names)
_PREFIX: dict[str, Callable[..., Any]] = {
    "aime": math_score.compute_score_dapo,
    "numina_": math_score.compute_score,
}
# upstream data sources that need machinery this package does not ship (code sandboxes, search, vision)
_UNSUPPORTED = ("codecontests", "apps", "codeforces", "taco", "hiyouga/geometry3k", "searchR1_")

# arguments of the upstream signature that only code sandboxes use; accepted for compatibility
_SANDBOX_KWARGS = ("sandbox_fusion_url", "concurrent_semaphore", "memory_limit_mb")


class UnknownDataSourceError(NotImplementedError):
    """No built-in reward function matches a ``data_source``."""


def known_data_sources() -> list[str]:
    """The data sources ``default_compute_score`` handles (prefixes end with ``*``)."""
    return sorted(_EXACT) + [p + "*" for p in sorted(_PREFIX)]


def get_scorer(data_source: str) -> Callable[..., Any]:
    """The scoring function for ``data_source``; raises :class:`UnknownDataSourceError` naming it."""
    source = str(data_source)
    if source in _EXACT:
        return _EXACT[source]
    for prefix, fn in _PREFIX.items():
        if source.startswith(prefix):
            return fn
    hint = ""
    if any(source == u or (u.endswith("_") and source.startswith(u)) for u in _UNSUPPORTED):
        hint = " It needs a code sandbox or other external service that this package does not include."
    raise UnknownDataSourceError(
        f"No built-in reward function for data_source={source!r}.{hint} Known data sources: "
        f"{', '.join(known_data_sources())}. Write a function compute_score(data_source, solution_str, "
        f"ground_truth, extra_info=None) in a file and set custom_reward_function.path=<file> "
        f"(and custom_reward_function.name=<function> if it is not called compute_score), or fix the "
        f"data_source column of the dataset.")


def _unexpected_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any]) -> list[str]:
    """Keyword arguments the scorer's named parameters do not include (they would land in its ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [k for k in kwargs if k not in named]


_warned: set[tuple[str, str]] = set()


def _warn_unused_kwargs(fn: Callable[..., Any], data_source: str, kwargs: dict[str, Any]) -> None:
    """Log once per (data_source, key) a reward kwarg the scorer ignores: usually a typo in reward_kwargs.

    Not an error, because one set of reward kwargs serves datasets that mix sources with different options.
    """
    for key in _unexpected_kwargs(fn, kwargs):
        if (data_source, key) not in _warned:
            _warned.add((data_source, key))
            logger.warning("reward kwarg %r is not used by the scorer for data_source=%r (%s.%s)", key, data_source,
                           fn.__module__, fn.__name__)


def default_compute_score(data_source: str,
                          solution_str: str,
                          ground_truth: Any,
                          extra_info: dict | None = None,
                          sandbox_fusion_url: str | None = None,
                          concurrent_semaphore: Any = None,
                          memory_limit_mb: int | None = None,
                          **kwargs: Any) -> float | dict[str, Any]:
    """Score one response with the rule-based scorer of its ``data_source``.

    Extra keyword arguments (e.g. ``format_score``, ``method`` from ``reward_model.reward_kwargs``) go to the
    scorer. Numbers come back as float; dict results (``{"score": ..., ...}``) are returned unchanged.
    """
    fn = get_scorer(data_source)
    if kwargs:
        _warn_unused_kwargs(fn, str(data_source), kwargs)
    result = fn(solution_str, ground_truth, **kwargs)
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"the scorer for data_source={data_source!r} returned a dict without a 'score' key: "
                             f"{sorted(result)}")
        return result
    if isinstance(result, (list, tuple)):
        result = result[0]
    return float(result)


# Upstream name kept for users who import it.
_default_compute_score = default_compute_score
