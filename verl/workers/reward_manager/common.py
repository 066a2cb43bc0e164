"""What every reward manager does: read a rollout batch, call a scoring function safely, place scores.

Batch layout (rollout output): ``prompts [B, P]`` left-padded, ``responses [B, R]`` right-padded,
``attention_mask [B, P + R]`` covering both. Per-row data: ``reward_model`` (a dict with ``ground_truth``), the
data source column (``reward_fn_key``, default ``data_source``), optional ``extra_info``.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

MAX_LOGGED_ERRORS = 5  # per call; the rest are summarised in one line so a broken reward fn does not flood logs


class RewardTimeoutError(TimeoutError):
    """A reward function ran longer than its per-sample time limit."""


@dataclass
class RewardSample:
    """One row of a rollout batch, decoded and ready to score."""

    index: int
    data_source: str
    prompt_str: str
    response_str: str
    ground_truth: Any
    extra_info: dict[str, Any]
    valid_response_length: int

    def score_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``compute_score(data_source, solution_str, ground_truth, extra_info)``."""
        return {
            "data_source": self.data_source,
            "solution_str": self.response_str,
            "ground_truth": self.ground_truth,
            "extra_info": self.extra_info,
        }


@dataclass
class ScoreOutcome:
    """The result of scoring one sample: the scalar, extra values to log, and the error if it failed."""

    score: float
    extras: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ----------------------------------------------------------------------------------------------------------------------
# reading the batch


def _require(mapping: Any, key: str, where: str, fix: str) -> Any:
    keys = list(mapping.keys())
    if key not in keys:
        raise KeyError(f"reward manager: the batch has no {where} {key!r} (available: {sorted(map(str, keys))}). {fix}")
    return mapping[key]


def response_lengths(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_lengths, response_lengths)`` [B] from the attention mask split at the prompt width."""
    batch = data.batch
    if batch is None:
        raise ValueError("reward manager: the DataProto has no tensor batch; it must be a rollout output with "
                         "'prompts', 'responses' and 'attention_mask'.")
    fix = "Pass the output of generate_sequences (rollout) to the reward manager."
    prompts = _require(batch, "prompts", "tensor", fix)
    responses = _require(batch, "responses", "tensor", fix)
    attention_mask = _require(batch, "attention_mask", "tensor", fix)
    p, r = prompts.shape[-1], responses.shape[-1]
    if attention_mask.shape[-1] != p + r:
        raise ValueError(f"reward manager: attention_mask has {attention_mask.shape[-1]} columns but prompts ({p}) + "
                         f"responses ({r}) = {p + r}; the mask must cover the left-padded prompt then the response.")
    mask = attention_mask.to(torch.long)
    return mask[:, :p].sum(-1), mask[:, p:].sum(-1)


def _row_value(arr: np.ndarray, i: int) -> Any:
    value = arr[i]
    return value.item() if isinstance(value, np.generic) else value


def _extra_info_for(non_tensor: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    """A fresh dict per row: rows repeated ``n`` times share one object, and reward fns may mutate theirs."""
    raw = _row_value(non_tensor["extra_info"], i) if "extra_info" in non_tensor else None
    if raw is None:
        info: dict[str, Any] = {}
    elif isinstance(raw, Mapping):
        info = dict(raw)
    else:
        raise TypeError(f"reward manager: extra_info of row {i} must be a dict, got {type(raw).__name__}: {raw!r}. "
                        f"Fix the extra_info column of the dataset.")
    if "__num_turns__" in non_tensor:
        info["num_turns"] = _row_value(non_tensor["__num_turns__"], i)
    if "reward_scores" in non_tensor:
        info["rollout_reward_scores"] = _row_value(non_tensor["reward_scores"], i)
    return info


def extract_samples(data: Any, tokenizer: Any, reward_fn_key: str = "data_source") -> list[RewardSample]:
    """Decode every row of ``data`` (valid tokens only, special tokens skipped) with its ground truth."""
    prompt_lens, resp_lens = response_lengths(data)
    prompts, responses = data.batch["prompts"], data.batch["responses"]
    non_tensor = data.non_tensor_batch
    data_fix = "Each data row needs reward_model.ground_truth and a data source column (see the parquet schema)."
    reward_models = _require(non_tensor, "reward_model", "non-tensor column", data_fix)
    data_sources = _require(
        non_tensor, reward_fn_key, "non-tensor column (reward_fn_key)",
        data_fix + " Or set reward_model.reward_kwargs.reward_fn_key / data.reward_fn_key to the "
        "column that names the reward function.")
    width = prompts.shape[-1]
    samples = []
    for i in range(len(prompt_lens)):
        pl, rl = int(prompt_lens[i]), int(resp_lens[i])
        rm = _row_value(reward_models, i)
        if not isinstance(rm, Mapping) or "ground_truth" not in rm:
            raise KeyError(f"reward manager: reward_model of row {i} must be a dict with a 'ground_truth' key, got "
                           f"{rm!r}. Fix the reward_model column of the dataset.")
        samples.append(
            RewardSample(
                index=i,
                data_source=str(_row_value(data_sources, i)),
                prompt_str=tokenizer.decode(prompts[i, width - pl:].tolist(), skip_special_tokens=True),
                response_str=tokenizer.decode(responses[i, :rl].tolist(), skip_special_tokens=True),
                ground_truth=rm["ground_truth"],
                extra_info=_extra_info_for(non_tensor, i),
                valid_response_length=rl,
            ))
    return samples


def rm_scores_result(data: Any, return_dict: bool) -> Any:
    """The precomputed ``rm_scores`` (reward model or agent loop) in the manager's return format."""
    reward_tensor = data.batch["rm_scores"]
    if not return_dict:
        return reward_tensor
    keys = data.meta_info.get("reward_extra_keys", []) or []
    extra = {k: data.non_tensor_batch[k] for k in keys if k in data.non_tensor_batch}
    return {"reward_tensor": reward_tensor, "reward_extra_info": extra}


def has_rm_scores(data: Any) -> bool:
    return data.batch is not None and "rm_scores" in data.batch.keys()


# ----------------------------------------------------------------------------------------------------------------------
# calling the scoring function


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


_warned_no_timeout = False


def call_with_timeout(fn: Callable[..., Any], kwargs: Mapping[str, Any], timeout_s: float | None) -> Any:
    """``fn(**kwargs)``, raising :class:`RewardTimeoutError` after ``timeout_s`` seconds (SIGALRM based).

    The alarm interrupts Python code only (a C call that never returns is not stopped: use the prime manager's
    process pool for untrusted code). Off the main thread, where signals cannot be used, no limit is applied and a
    warning is logged once.
    """
    global _warned_no_timeout
    if not timeout_s or timeout_s <= 0:
        return fn(**kwargs)
    if not _in_main_thread() or not hasattr(signal, "SIGALRM"):
        if not _warned_no_timeout:
            _warned_no_timeout = True
            logger.warning(
                "reward timeout_s=%s cannot be enforced here (not the main thread, or no SIGALRM); "
                "reward functions run without a time limit. Use the 'prime' reward manager for a hard "
                "per-sample timeout.", timeout_s)
        return fn(**kwargs)

    def on_alarm(signum: int, frame: Any) -> None:
        raise RewardTimeoutError(f"reward function exceeded {timeout_s}s")

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, _ = signal.setitimer(signal.ITIMER_REAL, float(timeout_s))
    start = time.monotonic()
    try:
        return fn(**kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:  # give an outer alarm back what is left of its time
            signal.setitimer(signal.ITIMER_REAL, max(previous_delay - (time.monotonic() - start), 1e-3))


def normalize_result(result: Any) -> ScoreOutcome:
    """A float, a numeric scalar/0-d tensor or a ``{"score": ..., ...}`` dict -> :class:`ScoreOutcome`.

    Raises ``TypeError``/``ValueError`` for anything else and for non-finite scores (a NaN reward would silently
    poison the advantages).
    """
    extras: dict[str, Any] = {}
    value = result
    if isinstance(result, Mapping):
        if "score" not in result:
            raise ValueError(f"reward function returned a dict without a 'score' key (keys: {sorted(result)})")
        extras = dict(result)
        value = result["score"]
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"reward function returned a tensor of shape {tuple(value.shape)}, expected a scalar")
        value = value.item()
    if isinstance(value, (list, tuple)) or value is None or isinstance(value, str):
        raise TypeError(f"reward function returned {type(value).__name__} {value!r}, expected a number or a dict "
                        f"with a numeric 'score'")
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"reward function returned a non-finite score {score}")
    if extras:
        extras["score"] = score
    return ScoreOutcome(score=score, extras=extras)


class ErrorLog:
    """Collects scoring failures of one call and logs them (the first few in full, then a summary)."""

    def __init__(self, error_score: float, what: str = "reward function") -> None:
        self.error_score = error_score
        self.what = what
        self.counts: Counter[str] = Counter()

    def record(self, sample: RewardSample, exc: BaseException) -> ScoreOutcome:
        kind = getattr(exc, "kind", None) or type(exc).__name__
        self.counts[kind] += 1
        if sum(self.counts.values()) <= MAX_LOGGED_ERRORS:
            message = str(exc)
            if message.startswith(kind + ": "):
                message = message[len(kind) + 2:]
            logger.warning("%s failed on sample %d (data_source=%r) with %s: %s; using error_score=%s", self.what,
                           sample.index, sample.data_source, kind, message, self.error_score)
        return ScoreOutcome(score=float(self.error_score), error=kind)

    def summarize(self) -> None:
        total = sum(self.counts.values())
        if total > MAX_LOGGED_ERRORS:
            logger.warning("%s failed on %d samples in this batch (%s); each got error_score=%s", self.what, total,
                           dict(self.counts), self.error_score)


def safe_score(fn: Callable[..., Any],
               sample: RewardSample,
               errors: ErrorLog,
               timeout_s: float | None = None,
               extra_kwargs: Mapping[str, Any] | None = None) -> ScoreOutcome:
    """Score one sample; an exception, a timeout or an unusable return value gives ``errors.error_score``."""
    kwargs = sample.score_kwargs()
    if extra_kwargs:
        kwargs.update(extra_kwargs)
    try:
        return normalize_result(call_with_timeout(fn, kwargs, timeout_s))
    except Exception as exc:  # noqa: BLE001 - any failure of user code must not crash the run
        return errors.record(sample, exc)


# ----------------------------------------------------------------------------------------------------------------------
# assembling the output


def build_reward_tensor(data: Any, samples: Sequence[RewardSample], scores: Sequence[float]) -> torch.Tensor:
    """Zeros ``[B, R]`` with each score at the row's last valid response token (column 0 for an empty response)."""
    responses = data.batch["responses"]
    reward_tensor = torch.zeros(responses.shape, dtype=torch.float32, device=responses.device)
    for sample, score in zip(samples, scores):
        reward_tensor[sample.index, max(sample.valid_response_length - 1, 0)] = score
    return reward_tensor


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number, np.bool_)) and not isinstance(value, str)


def build_reward_extra_info(outcomes: Sequence[ScoreOutcome]) -> dict[str, list[Any]]:
    """Per-key lists aligned with the batch; a key missing for some rows (failed or float-returning ones) gets the
    row's score for ``score``, NaN for numeric keys and None otherwise."""
    keys: list[str] = []
    for outcome in outcomes:
        for key in outcome.extras:
            if key not in keys:
                keys.append(key)
    info: dict[str, list[Any]] = {}
    for key in keys:
        present = [o.extras[key] for o in outcomes if key in o.extras]
        numeric = all(_is_number(v) for v in present)
        fill = float("nan") if numeric else None
        info[key] = [o.extras[key] if key in o.extras else (o.score if key == "score" else fill) for o in outcomes]
    return info


class Examiner:
    """Prints the first ``num_examine`` samples of each data source in a call (what the model actually wrote)."""

    def __init__(self, num_examine: int) -> None:
        self.num_examine = int(num_examine or 0)
        self.printed: Counter[str] = Counter()

    def maybe_print(self, sample: RewardSample, outcome: ScoreOutcome, extra: Mapping[str, Any] | None = None) -> None:
        if self.printed[sample.data_source] >= self.num_examine:
            return
        self.printed[sample.data_source] += 1
        print("[prompt]", sample.prompt_str)
        print("[response]", sample.response_str)
        print("[ground_truth]", sample.ground_truth)
        if outcome.extras:
            for key, value in outcome.extras.items():
                print(f"[{key}]", value)
        else:
            print("[score]", outcome.score)
        for key, value in (extra or {}).items():
            print(f"[{key}]", value)
