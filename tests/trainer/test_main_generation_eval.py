"""``verl.trainer.main_generation`` and ``verl.trainer.main_eval`` on CPU with the tiny model and a local Ray.

* generation over 2 rollout worker processes: every row of the input comes back, in order, with all its columns and
  a ``responses`` list of ``n_samples`` strings; eval of that file matches mean score and pass@k computed here from
  scores taken independently with ``default_compute_score``;
* eval of hand-written responses (two data sources, known right/wrong answers) against pass@k worked out by hand,
  the JSON output, a custom reward function with an ``acc`` entry, and ``pass_threshold``;
* the pass@k estimator against brute-force enumeration of all k-subsets;
* bad input (missing file / column, greedy decoding with several samples, ``rollout.n``) fails on the driver, before
  any Ray actor starts.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from hydra import compose, initialize_config_dir

import verl
from verl.models.tiny import get_tiny_model_path
from verl.single_controller.ray.utils import local_ray_init_kwargs
from verl.trainer.main_eval import aggregate_metrics, pass_at_k, run_eval
from verl.trainer.main_generation import run_generation
from verl.utils.config import ConfigError
from verl.utils.dataset.schema import make_rl_row
from verl.utils.dataset.tasks import write_arithmetic_task
from verl.utils.reward_score import default_compute_score

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("main_generation")
    paths = write_arithmetic_task(str(root / "data"), train_size=4, test_size=5)
    model = get_tiny_model_path()
    ray.init(**local_ray_init_kwargs(num_cpus=4))
    try:
        yield {"root": root, "prompts": paths["test"], "model": model}
    finally:
        ray.shutdown()


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def _gen_overrides(env, out: str, **extra) -> list[str]:
    settings = {
        "trainer.n_gpus_per_node": 2,
        "trainer.device": "cpu",
        "data.path": env["prompts"],
        "data.output_path": out,
        "data.n_samples": 2,
        "data.batch_size": 2,
        "model.path": env["model"],
        "rollout.name": "hf",
        "rollout.prompt_length": 32,
        "rollout.response_length": 8,
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


def _live_actor_count() -> int:
    from ray._private import state

    return sum(1 for info in state.actors().values() if info.get("State") != "DEAD")


# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_two_samples_per_prompt_then_eval(env):
    out = str(env["root"] / "gen" / "out.parquet")
    before = _live_actor_count()
    assert run_generation(_compose("generation", _gen_overrides(env, out))) == out
    assert _live_actor_count() == before  # the rollout workers were shut down

    source = pq.read_table(env["prompts"]).to_pylist()
    generated = pq.read_table(out).to_pylist()
    assert len(generated) == len(source) == 5
    for src, row in zip(source, generated):
        responses = row.pop("responses")
        assert row == src  # every input column, in the input's row order
        assert isinstance(responses, list) and len(responses) == 2
        assert all(isinstance(r, str) for r in responses)

    metrics_path = env["root"] / "gen" / "metrics.json"
    metrics = run_eval(_compose("evaluation", [f"data.path={out}", f"evaluation.output_path={metrics_path}"]))

    # the same numbers from scores taken here, with the pass@k estimator written out for n = 2
    scores = [[
        float(default_compute_score(r["data_source"], resp, r["reward_model"]["ground_truth"], r["extra_info"]))
        for resp in r["responses"]
    ]
              for r in pq.read_table(out).to_pylist()]
    correct = [[s >= 1.0 for s in row] for row in scores]
    assert set(metrics) == {"arithmetic"}
    m = metrics["arithmetic"]
    assert m["num_prompts"] == 5 and m["num_responses"] == 10
    assert m["mean_score"] == pytest.approx(sum(map(sum, scores)) / 10)
    assert m["pass@1"] == pytest.approx(sum(sum(c) / 2 for c in correct) / 5)
    assert m["pass@2"] == pytest.approx(sum(1.0 if any(c) else 0.0 for c in correct) / 5)
    assert set(m) == {"mean_score", "num_prompts", "num_responses", "pass@1", "pass@2"}
    assert json.loads(metrics_path.read_text()) == metrics


def _write_generations(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_eval_of_known_responses_matches_hand_computed_pass_at_k(env, tmp_path, capsys):
    # arithmetic rows: ground truths 7, 10, 3; gsm8k rows: 42, 5; three responses each
    def arith(i, gt, responses):
        row = make_rl_row("arithmetic", f"What is {gt} + 0?", str(gt), "test", i)
        return {**row, "responses": responses}

    def gsm(i, gt, responses):
        row = make_rl_row("openai/gsm8k", f"question {i}", str(gt), "test", i)
        return {**row, "responses": responses}

    rows = [
        arith(0, 7, ["so #### 7", "#### 8", "no idea"]),  # 1 of 3 correct
        arith(1, 10, ["#### 10", "10 is it: #### 10", "#### 11"]),  # 2 of 3
        arith(2, 3, ["#### 4", "#### 5", "#### 6"]),  # 0 of 3
        gsm(3, 42, ["#### 42", "#### 42", "#### 42"]),  # 3 of 3
        gsm(4, 5, ["#### 6", "#### 5", "#### 7"]),  # 1 of 3
    ]
    path = _write_generations(tmp_path / "gens.parquet", rows)
    out = tmp_path / "sub" / "metrics.json"
    metrics = run_eval(_compose("evaluation", [f"data.path={path}", f"evaluation.output_path={out}"]))

    # by hand: pass@k of one prompt = 1 - C(n-c, k) / C(n, k) with n = 3
    #   c=0: 0, 0, 0     c=1: 1/3, 2/3, 1     c=2: 2/3, 1, 1     c=3: 1, 1, 1
    a, g = metrics["arithmetic"], metrics["openai/gsm8k"]
    assert a["pass@1"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert a["pass@2"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert a["pass@3"] == pytest.approx((1 + 1 + 0) / 3)
    assert a["mean_score"] == pytest.approx(3 / 9)
    assert g["pass@1"] == pytest.approx((1 + 1 / 3) / 2)
    assert g["pass@2"] == pytest.approx((1 + 2 / 3) / 2)
    assert g["pass@3"] == pytest.approx(1.0)
    assert g["mean_score"] == pytest.approx(4 / 6)
    assert (a["num_prompts"], a["num_responses"], g["num_prompts"], g["num_responses"]) == (3, 9, 2, 6)
    assert json.loads(out.read_text()) == metrics
    printed = capsys.readouterr().out
    assert "test_score/arithmetic: 0.3333" in printed and "test_score/openai/gsm8k: 0.6667" in printed

    # a custom reward function: partial credit 0.5 for a number, "acc" decides correctness when present
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text("def my_score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):\n"
                           "    right = solution_str.strip().endswith('#### ' + str(ground_truth))\n"
                           "    if data_source == 'openai/gsm8k':\n"
                           "        return {'score': 0.5 + bonus, 'acc': right}\n"
                           "    return (1.0 if right else 0.5) + bonus\n")
    custom = run_eval(
        _compose("evaluation", [
            f"data.path={path}", f"custom_reward_function.path={reward_file}", "custom_reward_function.name=my_score",
            "+custom_reward_function.reward_kwargs.bonus=0.25", "evaluation.pass_threshold=1.2"
        ]))
    # arithmetic: correct responses score 1.25 >= 1.2 -> the same correctness as the built-in scorer
    assert custom["arithmetic"]["pass@1"] == pytest.approx(a["pass@1"])
    assert custom["arithmetic"]["mean_score"] == pytest.approx((3 * 1.25 + 6 * 0.75) / 9)
    # gsm8k: every score is 0.75 (< threshold) but "acc" marks the right answers correct
    assert custom["openai/gsm8k"]["pass@2"] == pytest.approx(g["pass@2"])
    assert custom["openai/gsm8k"]["mean_score"] == pytest.approx(0.75)


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_aggregate_uses_the_smallest_sample_count_of_a_data_source():
    records = [
        {
            "data_source": "x",
            "scores": [1.0, 0.0, 0.0],
            "correct": [True, False, False]
        },
        {
            "data_source": "x",
            "scores": [0.0, 1.0],
            "correct": [False, True]
        },
    ]
    m = aggregate_metrics(records)["x"]
    assert "pass@3" not in m
    assert m["pass@1"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert m["pass@2"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["mean_score"] == pytest.approx(2 / 5)
    assert math.isclose(m["num_responses"], 5)


# ----------------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "extra, match",
    [
        ({
            "data.path": "/nonexistent/prompts.parquet"
        }, r"data\.path: file '/nonexistent/prompts\.parquet' does not "),
        ({
            "data.prompt_key": "question"
        }, r"data\.prompt_key: column 'question' is not in .*Fix: set data\.prompt_key"),
        ({
            "rollout.do_sample": False
        }, r"data\.n_samples: =2 with greedy decoding.*Fix: set data\.n_samples=1"),
        ({
            "rollout.temperature": 0
        }, r"data\.n_samples: =2 with greedy decoding"),
        ({
            "rollout.n": 4
        }, r"rollout\.n: =4.*Fix: set rollout\.n=1 and data\.n_samples=4"),
        ({
            "data.n_samples": 0
        }, r"data\.n_samples: must be a positive integer"),
        ({
            "rollout.name": "nosuch"
        }, r"unknown rollout\.name='nosuch'"),
        ({
            "model.path": "/nonexistent/model"
        }, r"model\.path: model directory '/nonexistent/model' does not exist"),
    ],
)
def test_generation_config_errors_before_any_worker(env, tmp_path, extra, match):
    out = str(tmp_path / "never.parquet")
    before = _live_actor_count()
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=match) as info:
        run_generation(_compose("generation", _gen_overrides(env, out, **extra)))
    assert "\n" not in str(info.value)
    assert time.perf_counter() - start < 10
    assert _live_actor_count() == before
    assert not os.path.exists(out)


def test_eval_errors_name_the_key(env, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path: file .*missing\.parquet' does not exist"):
        run_eval(_compose("evaluation", [f"data.path={tmp_path / 'missing.parquet'}"]))
    # the prompt file has no responses yet
    with pytest.raises(ConfigError, match=r"data\.response_key: column 'responses' is not in .*main_generation"):
        run_eval(_compose("evaluation", [f"data.path={env['prompts']}"]))
    rows = [{**make_rl_row("arithmetic", "q", "1", "test", 0), "responses": ["#### 1"]}]
    path = _write_generations(tmp_path / "g.parquet", rows)
    with pytest.raises(ConfigError, match=r"data\.reward_model_key: column 'answer' is not in"):
        run_eval(_compose("evaluation", [f"data.path={path}", "data.reward_model_key=answer"]))
    unknown = _write_generations(tmp_path / "u.parquet", [{
        **make_rl_row("my/dataset", "q", "1", "test", 0), "responses": ["#### 1"]
    }])
    with pytest.raises(ConfigError, match=r"No built-in reward function for data_source='my/dataset'"):
        run_eval(_compose("evaluation", [f"data.path={unknown}"]))
    with pytest.raises(ConfigError, match=r"custom_reward_function\.path=.*no such file"):
        run_eval(_compose("evaluation", [f"data.path={path}", f"custom_reward_function.path={tmp_path / 'no.py'}"]))
