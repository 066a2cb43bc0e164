"""``python -m verl.trainer.main_eval [key=value ...]``: score offline generations and report pass@k.

Reads the parquet written by :mod:`verl.trainer.main_generation` (``data.path``; a list of responses per row in
``data.response_key``), scores every response with the reward function of its row's data source
(:func:`verl.utils.reward_score.default_compute_score`, or ``custom_reward_function.path``/``name``) against
``reward_model.ground_truth``, and prints, per data source:

* ``mean_score``: the mean score over all responses;
* ``pass@k`` for ``k = 1..n`` (``n`` = responses per prompt): the unbiased estimator
  ``1 - C(n - c, k) / C(n, k)`` of "at least one of k samples is correct" for a prompt with ``c`` correct responses
  out of ``n``, averaged over prompts. A response is correct when its score is ``>= evaluation.pass_threshold`` (or
  when the reward function returns a dict whose ``acc`` is true).

With ``evaluation.output_path`` set the metrics are also written there as JSON. :func:`run_eval` returns them.
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from typing import Any, Callable, Mapping, Optional, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from verl.utils.config import ConfigError, cfg_select

__all__ = ["main", "run_eval", "pass_at_k", "score_responses", "aggregate_metrics"]


def _fail(key: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{key}: {problem}. Fix: {fix}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with ``c`` correct responses out of ``n``: the probability that ``k`` responses
    drawn without replacement include a correct one, ``1 - C(n-c, k) / C(n, k)`` (as a stable product)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
        miss *= 1.0 - k / i
    return 1.0 - miss


def _load_reward_fn(config: Any) -> tuple[Callable[..., Any], bool]:
    """The user's function (``custom_reward_function``) or ``default_compute_score``; and whether it is the default."""
    from verl.utils.reward_score import default_compute_score
    from verl.utils.reward_score.custom import get_custom_reward_fn

    try:
        custom = get_custom_reward_fn(config)
    except (FileNotFoundError, AttributeError) as exc:  # no such file / no such function: the message has the fix
        raise ConfigError(str(exc)) from None
    return (custom, False) if custom is not None else (default_compute_score, True)


def _read_rows(config: Any) -> list[dict[str, Any]]:
    """Rows of ``data.path`` as Python dicts, after checking the columns the evaluation needs."""
    import pyarrow.parquet as pq

    path = cfg_select(config, "data.path")
    if not isinstance(path, str) or not path:
        _fail("data.path", f"must be a path to a parquet file, got {path!r}",
              "set data.path=/path/to/generations.parquet")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        _fail("data.path", f"file {path!r} does not exist", "point data.path at the data.output_path that "
              "verl.trainer.main_generation wrote")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        _fail("data.path", f"{path!r} is not a readable parquet file ({type(exc).__name__}: {exc})",
              "point data.path at a parquet file")
    columns = list(table.column_names)
    for key, default, hint in (("data.response_key", "responses", "run verl.trainer.main_generation first, or set "
                                "data.response_key to the column holding the list of responses"),
                               ("data.data_source_key", "data_source", "set data.data_source_key to the column that "
                                "names each row's data source"), ("data.reward_model_key", "reward_model",
                                                                  "set data.reward_model_key to the column "
                                                                  "holding {'ground_truth': ...}")):
        column = cfg_select(config, key, default)
        if column not in columns:
            _fail(key, f"column {column!r} is not in {path!r} (columns: {columns})", hint)
    if table.num_rows == 0:
        _fail("data.path", f"{path!r} has no rows", "generate responses for a non-empty prompt file")
    return table.to_pylist()


def _ground_truth(value: Any, row: int, key: str) -> Any:
    if isinstance(value, Mapping):
        if "ground_truth" not in value:
            raise ValueError(f"row {row}: the {key!r} column has no 'ground_truth' entry (keys: {sorted(value)}); "
                             "regenerate the data with examples/data_preprocess/ or set data.reward_model_key")
        return value["ground_truth"]
    raise ValueError(f"row {row}: the {key!r} column must hold a dict with 'ground_truth', got "
                     f"{type(value).__name__} {value!r}")


def score_responses(rows: Sequence[Mapping[str, Any]],
                    reward_fn: Callable[..., Any],
                    response_key: str = "responses",
                    data_source_key: str = "data_source",
                    reward_model_key: str = "reward_model",
                    extra_info_key: str = "extra_info",
                    pass_threshold: float = 1.0) -> list[dict[str, Any]]:
    """Score every response of every row; one ``{"data_source", "scores", "correct"}`` record per row."""
    from verl.workers.reward_manager.common import normalize_result

    records = []
    for i, row in enumerate(rows):
        responses = row.get(response_key)
        if isinstance(responses, str) or not isinstance(responses, Sequence) or len(responses) == 0:
            raise ValueError(f"row {i}: column {response_key!r} must hold a non-empty list of response strings, got "
                             f"{responses!r}")
        data_source = row.get(data_source_key)
        ground_truth = _ground_truth(row.get(reward_model_key), i, reward_model_key)
        extra = row.get(extra_info_key)
        scores, correct = [], []
        for response in responses:
            extra_info = dict(extra) if isinstance(extra, Mapping) else extra  # reward fns may mutate theirs
            result = reward_fn(data_source=data_source,
                               solution_str=str(response),
                               ground_truth=ground_truth,
                               extra_info=extra_info)
            outcome = normalize_result(result)
            scores.append(outcome.score)
            acc = outcome.extras.get("acc") if outcome.extras else None
            correct.append(bool(acc) if acc is not None else outcome.score >= pass_threshold)
        records.append({"data_source": str(data_source), "scores": scores, "correct": correct})
    return records


def aggregate_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per data source: ``mean_score`` over responses, ``pass@k`` for k = 1..n averaged over prompts, and counts.

    ``n`` is the smallest number of responses of a prompt of that data source (rows usually all have the same).
    """
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record["data_source"]].append(record)
    metrics: dict[str, dict[str, float]] = {}
    for source in sorted(groups):
        rows = groups[source]
        all_scores = [s for r in rows for s in r["scores"]]
        n_min = min(len(r["correct"]) for r in rows)
        out: dict[str, float] = {
            "mean_score": sum(all_scores) / len(all_scores),
            "num_prompts": len(rows),
            "num_responses": len(all_scores),
        }
        for k in range(1, n_min + 1):
            values = [pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in rows]
            out[f"pass@{k}"] = sum(values) / len(values)
        metrics[source] = out
    return metrics


def run_eval(config: Any) -> dict[str, dict[str, float]]:
    """Score ``data.path`` and return ``{data_source: {"mean_score", "pass@1", ..., "pass@n", "num_prompts",
    "num_responses"}}``; also printed, and written as JSON to ``evaluation.output_path`` when set."""
    if not isinstance(config, DictConfig):
        config = OmegaConf.create(config)
    threshold = cfg_select(config, "evaluation.pass_threshold", 1.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        _fail("evaluation.pass_threshold", f"must be a number, got {threshold!r}",
              "set evaluation.pass_threshold=1.0 (the score of a correct response)")
    rows = _read_rows(config)
    reward_fn, is_default = _load_reward_fn(config)
    source_key = cfg_select(config, "data.data_source_key", "data_source")
    if is_default:  # an unknown data source fails here, once, rather than on its first row
        from verl.utils.reward_score import UnknownDataSourceError, get_scorer

        for source in sorted({str(r.get(source_key)) for r in rows}):
            try:
                get_scorer(source)
            except UnknownDataSourceError as exc:
                raise ConfigError(f"{source_key} column: {exc}") from None
    records = score_responses(rows,
                              reward_fn,
                              response_key=cfg_select(config, "data.response_key", "responses"),
                              data_source_key=source_key,
                              reward_model_key=cfg_select(config, "data.reward_model_key", "reward_model"),
                              extra_info_key=cfg_select(config, "data.extra_info_key", "extra_info"),
                              pass_threshold=float(threshold))
    metrics = aggregate_metrics(records)
    for source, values in metrics.items():
        print(f"test_score/{source}: {values['mean_score']:.4f}", flush=True)
        line = " - ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in values.items())
        print(f"[verl] {source}: {line}", flush=True)
    output = cfg_select(config, "evaluation.output_path")
    if output:
        output = os.path.abspath(os.path.expanduser(str(output)))
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
        print(f"[verl] wrote metrics to {output}", flush=True)
    return metrics


@hydra.main(config_path="config", config_name="evaluation", version_base=None)
def main(config: DictConfig) -> Optional[dict[str, dict[str, float]]]:
    """Hydra entry point. A config error is printed as one line (exit status 2) instead of a traceback."""
    try:
        return run_eval(config)
    except ConfigError as exc:
        print(f"[verl] config error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
