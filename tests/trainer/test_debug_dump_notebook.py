"""The debug agent-data run end to end.

``examples/grpo_trainer/run_qwen2-7b_seq_balance_debug.sh`` runs as a user runs it (through the runner of
tests/examples/test_example_scripts.py: tiny model, tiny data, 2 steps) and leaves rollout and validation dumps.
Their records are checked field by field against independent computations (the reward function, the chat template's
token count, GRPO's group normalisation, the step's logged metrics); then ``notebooks/view_data.ipynb`` executes end
to end against the dump with nbclient (any cell error fails) and ``scripts/rollout_viewer.py`` shows it.

One training run serves the whole module.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from verl.utils.reward_score import default_compute_score
from verl.utils.rollout_dump import METRICS_FILE, SAMPLE_FIELDS, load_dump, step_summary

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = "grpo_trainer/run_qwen2-7b_seq_balance_debug.sh"
NOTEBOOK = os.path.join(REPO, "notebooks", "view_data.ipynb")
VIEWER = os.path.join(REPO, "scripts", "rollout_viewer.py")


def _load_example_runner():
    """tests/examples/test_example_scripts.py as a module: its runner, tiny sizes and data (no duplicate here)."""
    path = os.path.join(REPO, "tests", "examples", "test_example_scripts.py")
    spec = importlib.util.spec_from_file_location("_verl_example_scripts_runner", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EX = _load_example_runner()
STEPS, BATCH, N, TEST_ROWS = EX.STEPS, EX.BATCH, EX.N, EX.TEST_ROWS
MAX_RESPONSE_LENGTH = int(EX.TINY_ENV["MAX_RESPONSE_LENGTH"])

pytestmark = pytest.mark.slow


def _jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("debug_run")
    data = EX.make_tiny_data(out / "data")
    log = EX.run_example_script(SCRIPT, data, out, EX.TRAINER_ARGS)
    EX.check_grpo_debug(out, log)  # the example test's own check: this module is where the debug script runs
    return {
        "rollout": out / "debug" / "rollout",
        "validation": out / "debug" / "validation",
        "model": data["model"],
        "log": log
    }


@pytest.fixture(scope="module")
def tokenizer(run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run["model"])


def _check_common(row: dict, step: int, tokenizer) -> None:
    assert set(row) == set(SAMPLE_FIELDS), sorted(set(row) ^ set(SAMPLE_FIELDS))
    assert row["step"] == step and row["data_source"] == "arithmetic" and isinstance(row["uid"], str)
    # the score is what the reward function gives for this response
    expected = default_compute_score(row["data_source"], row["output"], row["gts"], extra_info=None)
    assert row["score"] == pytest.approx(float(expected)), row
    # the prompt: its chat messages render to exactly prompt_length tokens, and decode to the input text
    assert isinstance(row["messages"], list) and row["messages"][0]["role"] == "user"
    assert row["messages"][0]["content"] in row["input"]
    ids = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert row["prompt_length"] == len(ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == row["input"]
    assert isinstance(row["response_length"], int) and 0 < row["response_length"] <= MAX_RESPONSE_LENGTH
    assert isinstance(row["reward_extra_info"], dict)


def test_rollout_records_match_reward_fn_grpo_and_step_metrics(run, tokenizer):
    metrics = {r["step"]: r["metrics"] for r in _jsonl(run["rollout"] / METRICS_FILE)}
    assert sorted(metrics) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        rows = _jsonl(run["rollout"] / f"{step}.jsonl")
        assert len(rows) == BATCH * N
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            _check_common(row, step, tokenizer)
            assert row["reward"] == pytest.approx(row["score"])  # no KL in the reward in this script
            for key in ("old_log_prob", "ref_log_prob"):
                assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] < 0
            assert row["rollout_log_prob"] is None  # the HF rollout reports none
            if step == 1:  # before the first update the policy is the reference
                assert row["old_log_prob"] == pytest.approx(row["ref_log_prob"], abs=1e-4)
            groups[row["uid"]].append(row)
        assert sorted(len(g) for g in groups.values()) == [N] * BATCH
        for group in groups.values():  # GRPO: score normalised within the prompt's group
            scores = np.array([r["score"] for r in group])
            expected = (scores - scores.mean()) / (scores.std(ddof=1) + 1e-6)
            assert [r["advantages"] for r in group] == pytest.approx(expected.tolist(), abs=1e-4)

        # the step's metrics record agrees with its samples
        logged = metrics[step]
        assert logged["training/global_step"] == step
        lengths = [r["response_length"] for r in rows]
        assert logged["response_length/mean"] == pytest.approx(np.mean(lengths))
        assert logged["response_length/max"] == max(lengths) and logged["response_length/min"] == min(lengths)
        prompt_lengths = [r["prompt_length"] for r in rows]
        assert logged["prompt_length/mean"] == pytest.approx(np.mean(prompt_lengths))
        assert logged["critic/score/mean"] == pytest.approx(np.mean([r["score"] for r in rows]))
        for key in ("actor/entropy", "actor/pg_loss", "actor/kl_loss", "timing_s/step"):
            assert isinstance(logged[key], float), key


def test_validation_records_and_metrics(run, tokenizer):
    metrics = {r["step"]: r["metrics"] for r in _jsonl(run["validation"] / METRICS_FILE)}
    assert sorted(metrics) == list(range(0, STEPS + 1))  # before training, then every step (TEST_FREQ=1)
    for step in range(0, STEPS + 1):
        rows = _jsonl(run["validation"] / f"{step}.jsonl")
        assert len(rows) == TEST_ROWS
        for row in rows:
            _check_common(row, step, tokenizer)
            assert row["advantages"] is None and row["old_log_prob"] is None and row["ref_log_prob"] is None
        mean_score = float(np.mean([r["score"] for r in rows]))
        assert metrics[step]["val-core/arithmetic/reward/mean@1"] == pytest.approx(mean_score)


def test_load_dump_reads_what_was_written(run):
    dump = load_dump(str(run["rollout"]))
    rows = [row for step in range(1, STEPS + 1) for row in _jsonl(run["rollout"] / f"{step}.jsonl")]
    samples = dump.samples
    assert len(samples) == len(rows) and list(samples.index) == list(range(len(rows)))
    assert samples["output"].tolist() == [r["output"] for r in rows]
    assert samples["score"].tolist() == [r["score"] for r in rows]
    assert samples["response_length"].tolist() == [r["response_length"] for r in rows]
    assert list(dump.metrics.index) == list(range(1, STEPS + 1)) and dump.steps == list(range(1, STEPS + 1))
    summary = step_summary(dump)
    for step in range(1, STEPS + 1):
        step_rows = [r for r in rows if r["step"] == step]
        assert summary.loc[step, "reward"] == pytest.approx(np.mean([r["score"] for r in step_rows]))
        assert summary.loc[step, "accuracy"] == pytest.approx(np.mean([r["score"] > 0 for r in step_rows]))
        assert summary.loc[step, "entropy"] == pytest.approx(dump.metrics.loc[step, "actor/entropy"])
        assert summary.loc[step, "num_samples"] == BATCH * N


def test_notebook_executes_end_to_end(run, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    figure = tmp_path / "curves.png"
    monkeypatch.setenv("VERL_DUMP_DIR", str(run["rollout"]))  # the kernel inherits this environment
    monkeypatch.setenv("VERL_DUMP_FIGURE", str(figure))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # headless
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb,
                            timeout=120,
                            kernel_name="python3",
                            allow_errors=False,
                            resources={"metadata": {
                                "path": str(tmp_path)
                            }})
    client.execute()  # raises CellExecutionError on the first failing cell

    text = "".join(
        out.get("text", "") + str(out.get("data", {}).get("text/plain", "")) for cell in nb.cells
        if cell.cell_type == "code" for out in cell.get("outputs", []))
    assert f"{BATCH * N * STEPS} samples" in text  # loaded the dump the environment pointed at
    first = _jsonl(run["rollout"] / "1.jsonl")[0]
    assert "[assistant]" in text and f"uid {first['uid']}" in text  # rendered the first sample's conversation
    with open(figure, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"  # the curves were drawn


def _viewer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, VIEWER, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_rollout_viewer_shows_table_and_sample(run):
    rows = [row for step in range(1, STEPS + 1) for row in _jsonl(run["rollout"] / f"{step}.jsonl")]
    chosen = BATCH * N + 1  # the second sample of step 2
    proc = _viewer(str(run["rollout"]), "--step", "2", "--min-score", "0", "--max-len", str(MAX_RESPONSE_LENGTH),
                   "--sample", str(chosen))
    assert proc.returncode == 0, proc.stderr
    assert f"== samples: {BATCH * N} of {len(rows)} match" in proc.stdout
    assert "== per step" in proc.stdout and "entropy" in proc.stdout
    rendered = proc.stdout.split(f"== sample {chosen}")[1]
    assert f"uid {rows[chosen]['uid']}" in rendered and rows[chosen]["messages"][0]["content"] in rendered
    assert f"ground truth {rows[chosen]['gts']}" in rendered

    proc = _viewer(str(run["validation"]), "--max-len", "0")
    assert proc.returncode == 0 and f"== samples: 0 of {TEST_ROWS * (STEPS + 1)} match" in proc.stdout

    proc = _viewer(str(run["rollout"]), "--sample", str(len(rows)))
    assert proc.returncode == 2 and "is not a sample id" in proc.stderr
    proc = _viewer(str(run["rollout"] / "missing"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
