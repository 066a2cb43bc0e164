"""Rollout and validation dumps: what the model was given, what it wrote and how it was scored, step by step.

:class:`~verl.trainer.ppo.ray_trainer.RayPPOTrainer` writes a dump when ``trainer.rollout_data_dir`` (training
rollouts) or ``trainer.validation_data_dir`` (validation generations) is set; ``notebooks/view_data.ipynb`` and
``scripts/rollout_viewer.py`` read it with :func:`load_dump`. Writer and reader live together here so that the
format has one definition.

Layout of a dump directory::

    {step}.jsonl     one sample record per line: every sample of that step (written atomically, replaced on rerun)
    metrics.jsonl    one metrics record per line, appended once per step: {"step": N, "metrics": {name: value}}
                     (training: everything logged for the step; validation: the validation metrics). A resumed
                     run appends a step again; the reader keeps the last record of each step.

Sample record fields (:data:`SAMPLE_FIELDS`; ``null`` where a field does not apply, e.g. ``advantages`` in a
validation dump; non-finite floats are written as ``null``):

==================  ===============================================================================================
``step``            global step (validation before training: 0)
``uid``             prompt id; the ``rollout.n`` responses to one prompt share it (GRPO groups by it)
``request_id``      the rollout request's id when the rollout reports one (agent loop / multi-turn), else ``null``
``data_source``     the row's data source (selects the reward function)
``input``           prompt text (its valid tokens decoded, special tokens skipped)
``output``          response text (its valid tokens decoded, special tokens skipped): what the reward function saw
``messages``        the prompt as chat messages (``[{role, content}, ...]``) when the batch carries ``raw_prompt``
                    (``data.return_raw_chat=True``), else ``null``
``num_turns``       number of chat turns of a multi-turn (agent) rollout, else ``null``
``gts``             ground truth (``reward_model.ground_truth``)
``score``           the reward function's score (sum of ``token_level_scores``)
``reward``          the sequence reward the advantages were computed from (sum of ``token_level_rewards``: ``score``
                    minus the KL penalty with ``algorithm.use_kl_in_reward``); validation: ``score``
``reward_extra_info``  the reward components: ``{key: value}`` of the reward function's extra outputs (the
                    ``reward_extra_info`` of the reward manager, e.g. ``acc``, ``pred``)
``response_length`` number of response tokens (the attention mask over the response)
``prompt_length``   number of prompt tokens
``advantages``      advantage, mean over the response tokens (``response_mask``)
``old_log_prob``    log-prob of the response under the policy before the update, mean over the response tokens
``ref_log_prob``    log-prob under the reference policy, mean over the response tokens
``rollout_log_prob``  log-prob reported by the rollout engine, mean over the response tokens
==================  ===============================================================================================

Dumps written by earlier versions (the reward components as top-level keys) load too: every key that is not a
sample field is read as a reward component.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # the reader must not need torch: the notebook and the viewer only import pandas
    import pandas as pd

    from verl.protocol import DataProto

__all__ = [
    "SAMPLE_FIELDS",
    "METRICS_FILE",
    "RolloutDump",
    "make_sample_records",
    "batch_sample_records",
    "write_samples",
    "write_metrics",
    "load_dump",
    "step_summary",
    "filter_samples",
    "render_conversation",
]

SAMPLE_FIELDS = ("step", "uid", "request_id", "data_source", "input", "output", "messages", "num_turns", "gts", "score",
                 "reward", "reward_extra_info", "response_length", "prompt_length", "advantages", "old_log_prob",
                 "ref_log_prob", "rollout_log_prob")
METRICS_FILE = "metrics.jsonl"
# reward components become columns "reward_extra_info.<key>" of the samples DataFrame (pandas' json_normalize style)
COMPONENT_PREFIX = "reward_extra_info."
_STEP_FILE = re.compile(r"^(\d+)\.jsonl$")
# tensor of the batch -> record field holding its mean over the response tokens
_TOKEN_MEANS = {
    "advantages": "advantages",
    "old_log_probs": "old_log_prob",
    "ref_log_prob": "ref_log_prob",
    "rollout_log_probs": "rollout_log_prob",
}


# ---------------------------------------------------------------------------------------------------- writing -----
def _jsonable(value: Any) -> Any:
    """Plain JSON values: tensors/arrays to lists, numpy scalars to Python, NaN/inf to None (strict JSON)."""
    if hasattr(value, "detach") and hasattr(value, "tolist"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def make_sample_records(step: int,
                        inputs: Sequence[str],
                        outputs: Sequence[str],
                        gts: Sequence[Any],
                        scores: Sequence[float],
                        reward_extra_info: Optional[Mapping[str, Sequence[Any]]] = None,
                        fields: Optional[Mapping[str, Sequence[Any]]] = None) -> list[dict]:
    """One record per sample. ``reward_extra_info`` holds the per-sample reward components and ``fields`` further
    per-sample lists named like sample fields (``uid``, ``advantages``, ...). A list of another length is an error,
    since its values cannot be matched to samples."""
    unknown = sorted(set(fields or {}) - set(SAMPLE_FIELDS))
    if unknown:
        raise ValueError(f"rollout dump: {unknown} are not sample fields (known: {list(SAMPLE_FIELDS)}); pass reward "
                         f"components as reward_extra_info")
    n = len(inputs)
    columns = {"input": inputs, "output": outputs, "gts": gts, "score": scores, **(fields or {})}
    for name, values in list(columns.items()) + list((reward_extra_info or {}).items()):
        if len(values) != n:
            raise ValueError(f"rollout dump: column {name!r} has {len(values)} values for {n} samples; every "
                             f"per-sample column must have one value per sample")
    records = []
    for i in range(n):
        record: dict[str, Any] = dict.fromkeys(SAMPLE_FIELDS)
        record.update({name: values[i] for name, values in columns.items()})
        record["step"] = int(step)
        if record["reward"] is None:
            record["reward"] = record["score"]
        record["reward_extra_info"] = {k: v[i] for k, v in (reward_extra_info or {}).items()}
        records.append(_jsonable(record))
    return records


def batch_sample_records(batch: "DataProto",
                         tokenizer: Any,
                         step: int,
                         scores: Optional[Sequence[float]] = None,
                         reward_extra_info: Optional[Mapping[str, Sequence[Any]]] = None) -> list[dict]:
    """The sample records of a scored rollout batch (``prompts``, ``responses``, ``attention_mask``; the reward,
    advantage and log-prob tensors when present). ``scores`` defaults to the sum of ``token_level_scores``."""
    import torch

    tensors = batch.batch
    prompts, responses = tensors["prompts"], tensors["responses"]
    width, resp_width = prompts.shape[-1], responses.shape[-1]
    attention = tensors["attention_mask"].to(torch.long)
    prompt_lens = attention[:, :width].sum(-1).tolist()
    resp_lens = attention[:, width:width + resp_width].sum(-1).tolist()
    n = len(prompt_lens)
    inputs = [
        tokenizer.decode(prompts[i, width - prompt_lens[i]:].tolist(), skip_special_tokens=True) for i in range(n)
    ]
    outputs = [tokenizer.decode(responses[i, :resp_lens[i]].tolist(), skip_special_tokens=True) for i in range(n)]
    if scores is None:
        scores = tensors["token_level_scores"].sum(-1).tolist()

    fields: dict[str, Sequence[Any]] = {"prompt_length": prompt_lens, "response_length": resp_lens}
    if "token_level_rewards" in tensors.keys():
        fields["reward"] = tensors["token_level_rewards"].sum(-1).tolist()
    mask = tensors["response_mask"] if "response_mask" in tensors.keys() else attention[:, width:]
    mask = mask.to(torch.float32)
    count = mask.sum(-1)
    for key, name in _TOKEN_MEANS.items():
        if key in tensors.keys():
            means = (tensors[key].to(torch.float32) * mask).sum(-1) / count.clamp(min=1)
            fields[name] = [m if c > 0 else None for m, c in zip(means.tolist(), count.tolist())]
    non_tensor = batch.non_tensor_batch
    for key, name in (("uid", "uid"), ("request_id", "request_id"), ("data_source", "data_source"),
                      ("raw_prompt", "messages"), ("__num_turns__", "num_turns")):
        if key in non_tensor:
            fields[name] = list(non_tensor[key])
    reward_models = non_tensor.get("reward_model")
    gts = [rm.get("ground_truth") if isinstance(rm, Mapping) else None for rm in reward_models
          ] if reward_models is not None else [None] * n
    # batch-level values (not one per sample) are metrics, not sample fields
    components = {k: v for k, v in (reward_extra_info or {}).items() if len(v) == n}
    return make_sample_records(step, inputs, outputs, gts, scores, reward_extra_info=components, fields=fields)


def write_samples(dump_dir: str, step: int, records: Sequence[Mapping[str, Any]]) -> str:
    """Write ``{dump_dir}/{step}.jsonl`` atomically (a reader never sees half a file) and return its path."""
    os.makedirs(dump_dir, exist_ok=True)
    path = os.path.join(dump_dir, f"{int(step)}.jsonl")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(_jsonable(dict(record)), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_metrics(dump_dir: str, step: int, metrics: Mapping[str, Any]) -> str:
    """Append the step's metrics record ``{"step": N, "metrics": {...}}`` to ``{dump_dir}/metrics.jsonl``."""
    os.makedirs(dump_dir, exist_ok=True)
    path = os.path.join(dump_dir, METRICS_FILE)
    line = json.dumps({"step": int(step), "metrics": _jsonable(dict(metrics))}, ensure_ascii=False)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- reading -----
@dataclass
class RolloutDump:
    """A loaded dump directory.

    ``samples``: one row per sample, ordered by step then file line (the index is the sample's id for
    :func:`render_conversation` and ``rollout_viewer.py --sample``); the columns of :data:`SAMPLE_FIELDS` except
    ``reward_extra_info``, which is spread into one ``reward_extra_info.<key>`` column per reward component.
    ``metrics``: one row per step (index ``step``), one column per metric name; empty when no ``metrics.jsonl``.
    """

    path: str
    samples: "pd.DataFrame"
    metrics: "pd.DataFrame"

    @property
    def reward_components(self) -> list[str]:
        """The reward components' names (without the ``reward_extra_info.`` prefix)."""
        return [c[len(COMPONENT_PREFIX):] for c in self.samples.columns if c.startswith(COMPONENT_PREFIX)]

    @property
    def steps(self) -> list[int]:
        return sorted(set(self.samples["step"].tolist()) | set(self.metrics.index.tolist()))


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"rollout dump: line {number} of {path} is not JSON ({exc}); the file is corrupt, "
                                 f"delete it or rerun the step") from exc
            if not isinstance(row, dict):
                raise ValueError(f"rollout dump: line {number} of {path} is not a JSON object")
            rows.append(row)
    return rows


def _normalize_sample(raw: Mapping[str, Any], step: int) -> dict[str, Any]:
    row = {name: raw.get(name) for name in SAMPLE_FIELDS if name != "reward_extra_info"}
    if row["step"] is None:
        row["step"] = step
    components = dict(raw.get("reward_extra_info") or {})
    components.update({k: v for k, v in raw.items() if k not in SAMPLE_FIELDS})  # older, flat dumps
    for key, value in components.items():
        row[COMPONENT_PREFIX + key] = value
    if row["reward"] is None:
        row["reward"] = row["score"]
    return row


def load_dump(dump_dir: str) -> RolloutDump:
    """Read a dump directory (``{step}.jsonl`` files and ``metrics.jsonl``) into DataFrames."""
    import pandas as pd

    path = os.path.abspath(os.path.expanduser(str(dump_dir)))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"rollout dump directory {path} does not exist; point to the directory set as "
                                f"trainer.rollout_data_dir or trainer.validation_data_dir of a run")
    step_files = sorted((int(m.group(1)), name) for name in os.listdir(path) if (m := _STEP_FILE.match(name)))
    metrics_path = os.path.join(path, METRICS_FILE)
    if not step_files and not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"{path} holds no rollout dump ({{step}}.jsonl or {METRICS_FILE} files); is it the "
                                f"directory set as trainer.rollout_data_dir / trainer.validation_data_dir, and did "
                                f"the run finish a step?")
    rows = [_normalize_sample(raw, step) for step, name in step_files for raw in _read_jsonl(os.path.join(path, name))]
    columns = [n for n in SAMPLE_FIELDS if n != "reward_extra_info"]
    columns += sorted({k for row in rows for k in row if k not in columns})
    samples = pd.DataFrame(rows, columns=columns)
    for name in ("score", "reward", "advantages", "old_log_prob", "ref_log_prob", "rollout_log_prob"):
        samples[name] = pd.to_numeric(samples[name], errors="coerce")
    for name in ("step", "response_length", "prompt_length", "num_turns"):
        samples[name] = pd.to_numeric(samples[name], errors="coerce").astype("Int64")

    by_step: dict[int, dict] = {}
    if os.path.isfile(metrics_path):
        for record in _read_jsonl(metrics_path):
            if "step" not in record or not isinstance(record.get("metrics"), Mapping):
                raise ValueError(f"rollout dump: {metrics_path} has a record without 'step' and a 'metrics' object: "
                                 f"{str(record)[:200]}")
            by_step[int(record["step"])] = dict(record["metrics"])  # a rerun step: the last record wins
    metrics = pd.DataFrame.from_dict(by_step, orient="index").sort_index()
    metrics.index.name = "step"
    return RolloutDump(path=path, samples=samples, metrics=metrics)


def _correct(samples: "pd.DataFrame") -> "pd.Series":
    """Per-sample correctness: the ``acc`` reward component when the reward function reports one, else score > 0."""
    import pandas as pd

    column = COMPONENT_PREFIX + "acc"
    if column in samples.columns:
        return pd.to_numeric(samples[column], errors="coerce").astype(float)
    return (samples["score"] > 0).astype(float)


def step_summary(dump: RolloutDump) -> "pd.DataFrame":
    """Per-step curves: ``reward`` (mean score), ``accuracy`` (see :func:`_correct`), ``response_length`` (mean
    tokens), ``entropy`` (the ``actor/entropy`` metric; NaN where not logged, e.g. validation), ``num_samples``."""
    import pandas as pd

    samples = dump.samples
    frame = pd.DataFrame({
        "step": samples["step"].astype(float),
        "score": samples["score"].astype(float),
        "correct": _correct(samples),
        "response_length": samples["response_length"].astype(float),
    })
    grouped = frame.groupby("step")
    summary = pd.DataFrame({
        "reward": grouped["score"].mean(),
        "accuracy": grouped["correct"].mean(),
        "response_length": grouped["response_length"].mean(),
        "num_samples": grouped.size(),
    })
    summary.index = summary.index.astype(int)
    summary = summary.reindex(sorted(set(summary.index) | set(dump.metrics.index)))
    entropy = dump.metrics["actor/entropy"] if "actor/entropy" in dump.metrics.columns else None
    summary["entropy"] = entropy.reindex(summary.index).astype(float) if entropy is not None else float("nan")
    summary["num_samples"] = summary["num_samples"].fillna(0).astype(int)
    summary.index.name = "step"
    return summary[["reward", "accuracy", "response_length", "entropy", "num_samples"]]


def filter_samples(samples: "pd.DataFrame",
                   step: Optional[int] = None,
                   min_score: Optional[float] = None,
                   max_score: Optional[float] = None,
                   min_length: Optional[int] = None,
                   max_length: Optional[int] = None) -> "pd.DataFrame":
    """The samples of one step / score range / response-length range (bounds inclusive; None: no bound)."""
    keep = np.ones(len(samples), dtype=bool)
    if step is not None:
        keep &= (samples["step"] == int(step)).to_numpy(dtype=bool, na_value=False)
    if min_score is not None:
        keep &= (samples["score"] >= float(min_score)).to_numpy(dtype=bool, na_value=False)
    if max_score is not None:
        keep &= (samples["score"] <= float(max_score)).to_numpy(dtype=bool, na_value=False)
    if min_length is not None:
        keep &= (samples["response_length"] >= int(min_length)).to_numpy(dtype=bool, na_value=False)
    if max_length is not None:
        keep &= (samples["response_length"] <= int(max_length)).to_numpy(dtype=bool, na_value=False)
    return samples[keep]


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_conversation(sample: Mapping[str, Any]) -> str:
    """A sample as text: a header (step, uid, score, ground truth, reward components, advantage, log-probs) and
    the conversation, one ``[role]`` block per message, the response last as ``[assistant]``."""
    get = sample.get
    components = {k[len(COMPONENT_PREFIX):]: v for k, v in sample.items() if str(k).startswith(COMPONENT_PREFIX)}
    components = {k: v for k, v in components.items() if _fmt(v) != "-"}
    lines = [
        f"step {_fmt(get('step'))}  uid {_fmt(get('uid'))}  data_source {_fmt(get('data_source'))}",
        f"score {_fmt(get('score'))}  reward {_fmt(get('reward'))}  ground truth {_fmt(get('gts'))}",
        f"response_length {_fmt(get('response_length'))}  prompt_length {_fmt(get('prompt_length'))}  "
        f"advantage {_fmt(get('advantages'))}  old_log_prob {_fmt(get('old_log_prob'))}  "
        f"ref_log_prob {_fmt(get('ref_log_prob'))}",
    ]
    if components:
        lines.append("reward components: " + ", ".join(f"{k}={_fmt(v)}" for k, v in components.items()))
    messages = get("messages")
    if not isinstance(messages, (list, tuple)) or not messages:
        messages = [{"role": "user", "content": get("input") or ""}]
    for message in list(messages) + [{"role": "assistant", "content": get("output") or ""}]:
        role = message.get("role", "?") if isinstance(message, Mapping) else "?"
        content = message.get("content", "") if isinstance(message, Mapping) else str(message)
        lines += ["", f"[{role}]", str(content if content is not None else "")]
    return "\n".join(lines)
