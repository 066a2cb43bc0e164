"""Metrics the PPO driver logs each step: data statistics, timing, throughput, and validation metrics.

Names follow verl so dashboards and scripts written for it keep working:

* :func:`compute_data_metrics` -> ``critic/score/*``, ``critic/rewards/*``, ``critic/advantages/*``,
  ``critic/returns/*``, ``critic/values/*``, ``critic/vf_explained_var``, ``response_length/*``,
  ``response_length_non_aborted/*``, ``response/aborted_ratio``, ``prompt_length/*``, ``num_turns/*``.
* :func:`compute_timing_metrics` -> ``timing_s/{section}`` and ``timing_per_token_ms/{section}``.
* :func:`compute_throughout_metrics` (sic, verl's spelling) -> ``perf/total_num_tokens``, ``perf/time_per_step``,
  ``perf/throughput`` (tokens per second per device).
* :func:`process_validation_metrics` -> per data source and variable: ``mean@N``, ``std@N``, and bootstrapped
  ``best@n``/``worst@n``/``maj@n`` (``/mean`` and ``/std``) for n = 2, 4, 8, ... and N;
  :func:`flatten_validation_metrics` turns them into ``val-core/...`` / ``val-aux/...`` keys.
"""
from __future__ import annotations

import re
from collections import defaultdict
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch

from verl.protocol import DataProto
from verl.utils.timer import marked_timer, simple_timer

__all__ = [
    "reduce_metrics",
    "compute_data_metrics",
    "compute_timing_metrics",
    "compute_throughout_metrics",
    "compute_throughput_metrics",
    "bootstrap_metric",
    "calc_maj_val",
    "process_validation_metrics",
    "flatten_validation_metrics",
    "marked_timer",
    "simple_timer",
]

_MAX_TOKEN = re.compile(r"(^|[/_.\-])max($|[/_.\-])")
_MIN_TOKEN = re.compile(r"(^|[/_.\-])min($|[/_.\-])")


def reduce_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Reduce lists of per-micro-batch / per-rank values to one number each.

    Keys with a ``max`` word (``critic/score/max``, ``perf/max_memory_allocated_gb``) take the maximum, keys with a
    ``min`` word the minimum, everything else the mean. Scalars pass through as floats."""
    out: dict[str, float] = {}
    for key, values in metrics.items():
        arr = _as_float_array(values)
        if arr.size == 0:
            out[key] = float("nan")
        elif _MAX_TOKEN.search(key):
            out[key] = float(np.max(arr))
        elif _MIN_TOKEN.search(key):
            out[key] = float(np.min(arr))
        else:
            out[key] = float(np.mean(arr))
    return out


def _as_float_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy().reshape(-1)
    if isinstance(values, (list, tuple)):
        flat = []
        for v in values:
            if isinstance(v, torch.Tensor):
                flat.extend(v.detach().float().cpu().reshape(-1).tolist())
            else:
                flat.extend(np.asarray(v, dtype=np.float64).reshape(-1).tolist())
        return np.asarray(flat, dtype=np.float64)
    return np.asarray(values, dtype=np.float64).reshape(-1)


# ----------------------------------------------------------------------------------------------- batch data -----
def _require(batch: DataProto, keys: Sequence[str], who: str) -> None:
    missing = [k for k in keys if k not in batch.batch.keys()]
    if missing:
        raise KeyError(f"{who} needs batch keys {missing} (present: {sorted(batch.batch.keys())})")


def _response_mask(batch: DataProto) -> torch.Tensor:
    response_length = batch.batch["responses"].shape[-1]
    if "response_mask" in batch.batch.keys():
        return batch.batch["response_mask"].bool()
    return batch.batch["attention_mask"][:, -response_length:].bool()


def _compute_response_info(batch: DataProto) -> dict[str, Any]:
    """Prompt and response lengths (in tokens) of each row, and the padded widths."""
    response_width = batch.batch["responses"].shape[-1]
    attention_mask = batch.batch["attention_mask"]
    prompt_mask = attention_mask[:, :-response_width].bool()
    response_mask = _response_mask(batch)
    return {
        "prompt_length": prompt_mask.sum(-1).float(),
        "response_length": response_mask.sum(-1).float(),
        "max_prompt_length": prompt_mask.shape[-1],
        "max_response_length": response_width,
        "response_mask": response_mask,
    }


def _stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    values = values.detach().float()
    if values.numel() == 0:
        nan = float("nan")
        return {f"{prefix}/mean": nan, f"{prefix}/max": nan, f"{prefix}/min": nan}
    return {
        f"{prefix}/mean": float(values.mean().item()),
        f"{prefix}/max": float(values.max().item()),
        f"{prefix}/min": float(values.min().item()),
    }


def compute_data_metrics(batch: DataProto, use_critic: bool = True) -> dict[str, float]:
    """Statistics of one training batch (after advantages are computed).

    Needs batch keys ``responses``, ``attention_mask``, ``token_level_scores``, ``token_level_rewards``,
    ``advantages``, ``returns`` (and ``values`` with ``use_critic``); ``response_mask`` is used when present.
    Sequence scores/rewards are sums over the response; advantages, returns and values are over valid response
    tokens. ``vf_explained_var`` is ``1 - Var(returns - values) / Var(returns)`` over those tokens."""
    keys = ["responses", "attention_mask", "token_level_scores", "token_level_rewards", "advantages", "returns"]
    _require(batch, keys + (["values"] if use_critic else []), "compute_data_metrics")
    info = _compute_response_info(batch)
    mask = info["response_mask"]
    prompt_length, response_length = info["prompt_length"], info["response_length"]
    max_prompt, max_response = info["max_prompt_length"], info["max_response_length"]

    metrics: dict[str, float] = {}
    metrics.update(_stats("critic/score", batch.batch["token_level_scores"].sum(-1)))
    metrics.update(_stats("critic/rewards", batch.batch["token_level_rewards"].sum(-1)))
    valid_adv = torch.masked_select(batch.batch["advantages"], mask)
    valid_returns = torch.masked_select(batch.batch["returns"], mask)
    metrics.update(_stats("critic/advantages", valid_adv))
    metrics.update(_stats("critic/returns", valid_returns))
    if use_critic:
        valid_values = torch.masked_select(batch.batch["values"], mask)
        metrics.update(_stats("critic/values", valid_values))
        if valid_returns.numel() >= 2:
            return_var = torch.var(valid_returns.float())
            diff_var = torch.var((valid_returns - valid_values).float())
            metrics["critic/vf_explained_var"] = float((1.0 - diff_var / (return_var + 1e-5)).item())
        else:
            metrics["critic/vf_explained_var"] = float("nan")

    metrics.update(_stats("response_length", response_length))
    metrics["response_length/clip_ratio"] = float(torch.eq(response_length, max_response).float().mean().item())
    aborted = response_length == 0
    non_aborted = response_length[~aborted]
    metrics["response/aborted_ratio"] = float(aborted.float().mean().item())
    metrics.update(_stats("response_length_non_aborted", non_aborted))
    metrics["response_length_non_aborted/clip_ratio"] = (float(
        torch.eq(non_aborted, max_response).float().mean().item()) if non_aborted.numel() else float("nan"))
    metrics.update(_stats("prompt_length", prompt_length))
    metrics["prompt_length/clip_ratio"] = float(torch.eq(prompt_length, max_prompt).float().mean().item())

    for key, name in (("__num_turns__", "num_turns"), ("tool_call_counts", "tool_call_counts")):
        if key in batch.non_tensor_batch:
            values = torch.as_tensor(np.asarray(batch.non_tensor_batch[key], dtype=np.float64))
            stats = _stats(name, values)
            metrics.update({k: stats[k] for k in (f"{name}/min", f"{name}/max", f"{name}/mean")})
    return metrics


# ------------------------------------------------------------------------------------------------- timing -----
# sections whose cost scales with response tokens only (generation) vs. all tokens (forward/backward passes)
_RESPONSE_TOKEN_SECTIONS = ("gen",)
_ALL_TOKEN_SECTIONS = ("ref", "values", "adv", "update_critic", "update_actor", "old_log_prob")


def compute_timing_metrics(batch: DataProto, timing_raw: dict[str, float]) -> dict[str, float]:
    """``timing_s/{name}`` for every timed section, and ``timing_per_token_ms/{name}`` for the sections whose
    cost is per token (``gen`` per response token; ``ref``, ``values``, ``adv``, ``update_critic``,
    ``update_actor``, ``old_log_prob`` per prompt+response token)."""
    info = _compute_response_info(batch)
    num_response = float(info["response_length"].sum().item())
    num_overall = float(info["prompt_length"].sum().item()) + num_response
    tokens = {name: num_response for name in _RESPONSE_TOKEN_SECTIONS}
    tokens.update({name: num_overall for name in _ALL_TOKEN_SECTIONS})
    metrics = {f"timing_s/{name}": float(value) for name, value in timing_raw.items()}
    for name, value in timing_raw.items():
        if name in tokens and tokens[name] > 0:
            metrics[f"timing_per_token_ms/{name}"] = float(value) * 1000.0 / tokens[name]
    return metrics


def compute_throughout_metrics(batch: DataProto, timing_raw: dict[str, float], n_gpus: int) -> dict[str, float]:
    """Tokens processed this step (``meta_info['global_token_num']``: per-row prompt+response lengths, else the
    attention mask) and throughput in tokens per second per device over ``timing_raw['step']``."""
    if "step" not in timing_raw:
        raise KeyError("compute_throughout_metrics needs timing_raw['step'] (time the whole step with "
                       "marked_timer('step', timing_raw))")
    token_num = batch.meta_info.get("global_token_num")
    if token_num is None:
        total = float(batch.batch["attention_mask"].sum().item())
    elif isinstance(token_num, (int, float)):
        total = float(token_num)
    else:
        total = float(np.sum(np.asarray(token_num, dtype=np.float64)))
    step_time = float(timing_raw["step"])
    if n_gpus < 1:
        raise ValueError(f"n_gpus must be >= 1, got {n_gpus}")
    return {
        "perf/total_num_tokens": total,
        "perf/time_per_step": step_time,
        "perf/throughput": total / (step_time * n_gpus) if step_time > 0 else float("nan"),
    }


compute_throughput_metrics = compute_throughout_metrics  # correctly spelled alias

# ---------------------------------------------------------------------------------------------- validation -----
_VECTOR_REDUCERS = {np.max: np.max, np.min: np.min, np.mean: np.mean, np.sum: np.sum, np.median: np.median}


def bootstrap_metric(data: Sequence[Any],
                     subset_size: int,
                     reduce_fns: Sequence[Callable[[Any], float]],
                     n_bootstrap: int = 1000,
                     seed: int = 42) -> list[tuple[float, float]]:
    """Estimate ``reduce_fn`` over random subsets of ``subset_size`` items (drawn with replacement),
    ``n_bootstrap`` times; returns ``(mean, std)`` of the estimates for each reduce function.

    This is how ``best@n`` is computed from N >= n samples: the expected best of n draws, with its spread. The
    draws come from a private ``np.random.RandomState(seed)``, so results are reproducible and the global numpy
    RNG is left alone."""
    if subset_size < 1:
        raise ValueError(f"subset_size must be >= 1, got {subset_size}")
    if len(data) == 0:
        raise ValueError("bootstrap_metric needs at least one data point")
    rng = np.random.RandomState(seed)
    # one draw of shape (n_bootstrap, subset_size) gives the same indices as n_bootstrap draws of subset_size
    idx = rng.choice(len(data), size=(n_bootstrap, subset_size), replace=True)
    numeric = None
    results = []
    for fn in reduce_fns:
        vec = _VECTOR_REDUCERS.get(fn)
        if vec is not None:
            if numeric is None:
                numeric = np.asarray(data, dtype=np.float64)
            estimates = vec(numeric[idx], axis=1)
        else:
            estimates = np.asarray([fn([data[i] for i in row]) for row in idx], dtype=np.float64)
        results.append((float(np.mean(estimates)), float(np.std(estimates))))
    return results


def calc_maj_val(data: Sequence[dict[str, Any]], vote_key: str, val_key: str) -> float:
    """Majority vote: the ``val_key`` of the answer (``vote_key``) given most often; ties go to the answer seen
    first. E.g. ``vote_key='pred'`` (extracted answer), ``val_key='acc'`` gives maj@n accuracy."""
    counts: dict[Any, int] = {}
    first_val: dict[Any, Any] = {}
    for item in data:
        vote = item[vote_key]
        if vote not in counts:
            counts[vote] = 0
            first_val[vote] = item[val_key]
        counts[vote] += 1
    best = max(counts, key=lambda v: counts[v])  # max keeps the first of equal counts (insertion order)
    return first_val[best]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating, bool, np.bool_)) or (isinstance(x, torch.Tensor) and
                                                                                    x.numel() == 1)


def _bootstrap_sizes(n: int) -> list[int]:
    sizes, k = [], 2
    while k < n:
        sizes.append(k)
        k *= 2
    sizes.append(n)
    return sizes


def process_validation_metrics(data_sources: Sequence[str],
                               sample_inputs: Sequence[str],
                               infos_dict: dict[str, Sequence[Any]],
                               seed: int = 42) -> dict[str, dict[str, dict[str, float]]]:
    """Aggregate per-response validation values into per-data-source metrics.

    ``sample_inputs`` identifies the prompt of each response (its text or uid): responses of one prompt form a
    group of N. For each numeric variable in ``infos_dict`` (e.g. ``reward``/``score``, ``acc``) and each prompt:
    ``mean@N``, and with N > 1 ``std@N`` and bootstrapped ``best@n``/``worst@n`` (``/mean``, ``/std``) for n in
    2, 4, 8, ... , N; when ``infos_dict`` has ``pred`` (the extracted answer), also ``maj@n``. These are then
    averaged over the prompts of each data source.

    Returns ``{data_source: {variable: {metric_name: value}}}``."""
    n = len(data_sources)
    if len(sample_inputs) != n:
        raise ValueError(f"data_sources has {n} entries but sample_inputs has {len(sample_inputs)}")
    for name, values in infos_dict.items():
        if len(values) != n:
            raise ValueError(f"infos_dict[{name!r}] has {len(values)} entries but there are {n} samples")

    # data source -> prompt -> variable -> values (in sample order)
    grouped: dict[str, dict[str, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for i in range(n):
        group = grouped[data_sources[i]][sample_inputs[i]]
        for name, values in infos_dict.items():
            group[name].append(values[i])

    # data source -> variable -> metric -> per-prompt values
    collected: dict[str, dict[str, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for source, prompts in grouped.items():
        for var2vals in prompts.values():
            preds = var2vals.get("pred")
            for var, values in var2vals.items():
                if not values or not all(_is_number(v) for v in values):
                    continue  # text fields (e.g. pred) are not metrics
                values = [float(v) for v in values]
                count = len(values)
                metric = {f"mean@{count}": float(np.mean(values))}
                if count > 1:
                    metric[f"std@{count}"] = float(np.std(values))
                    for k in _bootstrap_sizes(count):
                        (best_m, best_s), (worst_m, worst_s) = bootstrap_metric(values, k, [np.max, np.min], seed=seed)
                        metric[f"best@{k}/mean"], metric[f"best@{k}/std"] = best_m, best_s
                        metric[f"worst@{k}/mean"], metric[f"worst@{k}/std"] = worst_m, worst_s
                        if preds is not None:
                            votes = [{"val": v, "pred": p} for v, p in zip(values, preds)]
                            [(maj_m, maj_s)] = bootstrap_metric(votes,
                                                                k,
                                                                [partial(calc_maj_val, vote_key="pred", val_key="val")],
                                                                seed=seed)
                            metric[f"maj@{k}/mean"], metric[f"maj@{k}/std"] = maj_m, maj_s
                for name, value in metric.items():
                    collected[source][var][name].append(value)

    return {
        source: {
            var: {
                name: float(np.mean(vals)) for name, vals in metrics.items()
            } for var, metrics in var2metrics.items()
        } for source, var2metrics in collected.items()
    }


def flatten_validation_metrics(data_src2var2metric2val: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """``{data_source: {var: {metric: value}}}`` -> flat ``val-core/{source}/{var}/{metric}`` keys for the headline
    numbers (the core variable ``acc`` if present else ``reward``; its ``mean``/``maj``/``best`` at the largest N)
    and ``val-aux/...`` for everything else, as verl's trainer logs them."""
    out: dict[str, float] = {}
    for source, var2metric in data_src2var2metric2val.items():
        core_var = "acc" if "acc" in var2metric else "reward"
        for var, metric2val in var2metric.items():
            n_max = max(int(name.split("@")[-1].split("/")[0]) for name in metric2val)
            for name, value in metric2val.items():
                is_core = (var == core_var and name.startswith(("mean", "maj", "best")) and
                           name.split("@")[-1].split("/")[0] == str(n_max))
                section = "val-core" if is_core else "val-aux"
                out[f"{section}/{source}/{var}/{name}"] = value
    return out
