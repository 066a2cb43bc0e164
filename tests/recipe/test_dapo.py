"""The DAPO recipe (``recipe/dapo``).

* dynamic sampling without Ray: the group filter, the filter metrics and the round accumulator against hand-computed
  values, and the error once ``max_num_gen_batches`` rounds do not fill a batch;
* the DAPO config: ``dapo_trainer.yaml`` extends ``ppo_trainer.yaml`` with DAPO's defaults, its checks fail on the
  driver with the key and the fix, and the overlong buffer reaches the ``dapo`` reward manager (penalties checked
  by hand);
* end to end: ``recipe/dapo/run_dapo_qwen2.5_7b.sh`` as a user runs it (``python -m recipe.dapo.main_dapo``, Ray)
  with the tiny model and tiny sizes from its environment variables, 2 steps on CPU with a reward that makes half
  the prompts uninformative (so each step needs 2 generation rounds), the overlong buffer, validation, dumps and a
  checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import ray
import torch
from hydra import compose, initialize_config_dir

from recipe.dapo.dapo_ray_trainer import (DynamicSamplingBuffer, DynamicSamplingError, compute_filter_metric,
                                          select_informative_groups, validate_dapo_config)
from recipe.dapo.main_dapo import DAPOTaskRunner, run_dapo
from verl.models.tiny import get_tiny_model_path
from verl.protocol import DataProto
from verl.trainer.ppo.reward import compute_reward, load_reward_manager
from verl.utils.config import ConfigError
from verl.utils.dataset.tasks import write_arithmetic_task

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DAPO_CONFIG_DIR = os.path.join(REPO, "recipe", "dapo", "config")
SCRIPT = os.path.join(REPO, "recipe", "dapo", "run_dapo_qwen2.5_7b.sh")

# Even-indexed prompts get a score that depends on the response text (their groups are kept), odd-indexed ones a
# constant (their groups are dropped). "base" repeats the score so that the dumps show it next to the shaped reward.
REWARD_FN = '''
import zlib


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    index = int((extra_info or {}).get("index", 0))
    base = 0.5 if index % 2 else (zlib.crc32(solution_str.encode("utf-8")) % 1000) / 1000.0
    return {"score": base, "acc": base, "base": base, "parity": index % 2}
'''


def _compose(overrides: list[str] = ()):
    with initialize_config_dir(config_dir=DAPO_CONFIG_DIR, version_base=None):
        return compose(config_name="dapo_trainer", overrides=list(overrides))


def _scored(uids: list[str], scores: list[float], **non_tensors) -> DataProto:
    """A scored round: one row per response, the score on the last of 3 response tokens."""
    token_scores = torch.zeros(len(uids), 3)
    token_scores[:, -1] = torch.tensor(scores)
    return DataProto.from_dict(tensors={"token_level_scores": token_scores}, non_tensors={"uid": uids, **non_tensors})


# ----------------------------------------------------------------------------------------------------------------------
# dynamic sampling (no Ray)


def test_select_informative_groups_drops_groups_whose_values_are_all_equal():
    uids = ["a", "a", "a", "b", "b", "b", "c", "d", "d"]
    values = [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    rows, kept = select_informative_groups(uids, values)
    assert kept == ["a", "c"]  # b and d: every response scored the same; c: a single response is kept
    assert rows == [0, 1, 2, 6]
    # None (a failed sample) is left out: e keeps two different values, f has only one value left
    rows, kept = select_informative_groups(["e"] * 3 + ["f"] * 2, [1.0, np.nan, 0.0, np.nan, 1.0])
    assert (rows, kept) == ([0, 1, 2], ["e"])
    # interleaved groups keep their rows in batch order
    assert select_informative_groups(["x", "y", "x", "y"], [0, 1, 1, 1]) == ([0, 2], ["x"])
    with pytest.raises(ValueError, match="4 uids but 3 values"):
        select_informative_groups(["x"] * 4, [0, 1, 2])


def test_filter_metrics():
    data = _scored(["a", "a", "b", "b"], [1.0, 0.0, 0.25, 0.25], acc=np.array([True, False, 0, 0], dtype=object))
    assert compute_filter_metric(data, "seq_reward").tolist() == [1.0, 0.0, 0.25, 0.25]
    # before the KL penalty token_level_rewards is not set: seq_final_reward is the score
    assert compute_filter_metric(data, "seq_final_reward").tolist() == [1.0, 0.0, 0.25, 0.25]
    data.batch["token_level_rewards"] = data.batch["token_level_scores"] * 2
    assert compute_filter_metric(data, "seq_final_reward").tolist() == [2.0, 0.0, 0.5, 0.5]
    assert compute_filter_metric(data, "acc").tolist() == [1.0, 0.0, 0.0, 0.0]
    data.non_tensor_batch["acc"][1] = None
    assert np.isnan(compute_filter_metric(data, "acc")[1])
    with pytest.raises(KeyError, match=r"no 'score' per sample.*metric=seq_reward"):
        compute_filter_metric(data, "score")


def test_buffer_keeps_generating_until_the_batch_is_full_and_trims_to_train_batch_size():
    buffer = DynamicSamplingBuffer(train_batch_size=3, metric="acc", max_num_gen_batches=3)
    # round 1: A informative, B not -> 1 of 3 prompts
    assert buffer.add(_scored(["A", "A", "B", "B"], [1, 0, 1, 1], acc=np.array([1, 0, 1, 1]))) == {
        "gen_prompts": 2,
        "kept_prompts": 1
    }
    assert not buffer.ready
    buffer.check_budget()  # 1 of 3 rounds used: no error
    # round 2: C, D, E informative (one more reward key than round 1) -> 4 >= 3
    buffer.add(
        _scored(["C", "C", "D", "D", "E", "E"], [0, 1, 1, 0, 0, 1],
                acc=np.array([0, 1, 1, 0, 0, 1]),
                extra=np.array(["x"] * 6, dtype=object)))
    assert buffer.ready
    assert buffer.metrics() == {
        "train/num_gen_batches": 2,
        "train/num_gen_prompts": 5,
        "train/num_kept_prompts": 4,
        "train/kept_prompt_ratio": 0.8,
    }
    batch = buffer.pop()
    # the first train_batch_size kept prompts, every response of each; E (the surplus) is dropped
    assert batch.non_tensor_batch["uid"].tolist() == ["A", "A", "C", "C", "D", "D"]
    assert batch.batch["token_level_scores"][:, -1].tolist() == [1, 0, 0, 1, 1, 0]
    assert batch.non_tensor_batch["extra"].tolist() == [None, None, "x", "x", "x", "x"]  # aligned across rounds
    buffer.reset()
    assert buffer.num_gen_batches == 0 and not buffer.ready


def test_buffer_raises_after_max_num_gen_batches_rounds():
    buffer = DynamicSamplingBuffer(train_batch_size=2, metric="seq_reward", max_num_gen_batches=2)
    uninformative = ["P", "P", "Q", "Q"], [1, 1, 0, 0]
    buffer.add(_scored(*uninformative))
    buffer.check_budget()
    buffer.add(_scored(*uninformative))
    with pytest.raises(DynamicSamplingError, match=r"2 generation rounds.*max_num_gen_batches=2.*kept only 0 of") as e:
        buffer.check_budget()
    assert isinstance(e.value, ValueError)  # upstream raises ValueError
    # no limit: keeps going
    endless = DynamicSamplingBuffer(train_batch_size=2, metric="seq_reward", max_num_gen_batches=0)
    for _ in range(5):
        endless.add(_scored(*uninformative))
        endless.check_budget()
    with pytest.raises(RuntimeError, match="only 0 of 2"):
        endless.pop()


def test_buffer_without_filtering_trains_on_every_generated_prompt():
    buffer = DynamicSamplingBuffer(train_batch_size=2, metric=None, enable=False)
    buffer.add(_scored(["P", "P", "Q", "Q"], [1, 1, 0, 0]))
    assert buffer.ready
    assert buffer.pop().non_tensor_batch["uid"].tolist() == ["P", "P", "Q", "Q"]
    with pytest.raises(ValueError, match="filter metric"):
        DynamicSamplingBuffer(train_batch_size=2, metric=None, enable=True)


# ----------------------------------------------------------------------------------------------------------------------
# config


@pytest.fixture(scope="module")
def tiny_model():
    return get_tiny_model_path()


def test_dapo_yaml_extends_ppo_trainer_with_dapo_defaults():
    config = _compose(["data.train_batch_size=8"])
    assert config.data.gen_batch_size == 8  # follows train_batch_size
    actor = config.actor_rollout_ref.actor
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.loss_agg_mode) == (0.2, 0.28, "token-mean")
    assert config.algorithm.adv_estimator == "grpo" and not config.algorithm.use_kl_in_reward
    assert config.reward_model.reward_manager == "dapo"
    assert dict(config.algorithm.filter_groups) == {"enable": False, "metric": None, "max_num_gen_batches": 0}
    assert set(config.reward_model.overlong_buffer) == {"enable", "len", "penalty_factor", "log"}
    assert config.critic.ppo_mini_batch_size == 256  # the rest of the ppo_trainer tree is there
    validate_dapo_config(config)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["algorithm.filter_groups.enable=True"], r"algorithm\.filter_groups\.metric: is not set.*Fix: set"),
        (["data.gen_batch_size=16"], r"data\.gen_batch_size: =16 differs from data\.train_batch_size=8"),
        ([
            "algorithm.filter_groups.enable=True", "algorithm.filter_groups.metric=acc", "data.gen_batch_size=2",
            "algorithm.filter_groups.max_num_gen_batches=3"
        ], r"max_num_gen_batches: =3 rounds .* can never fill.*at least 4"),
        ([
            "algorithm.filter_groups.enable=True", "algorithm.filter_groups.metric=seq_final_reward",
            "algorithm.use_kl_in_reward=True"
        ], r"metric: =seq_final_reward with algorithm\.use_kl_in_reward=True"),
        ([
            "reward_model.overlong_buffer.enable=True", "reward_model.overlong_buffer.len=4",
            "reward_model.reward_manager=naive"
        ], r"overlong_buffer\.enable: =True but .*naive.*reward_manager=dapo"),
        (["reward_model.overlong_buffer.enable=True", "reward_model.overlong_buffer.len=600"
         ], r"overlong_buffer\.len: must be an integer in \(0, data\.max_response_length=512\], got 600"),
        ([
            "reward_model.overlong_buffer.enable=True", "reward_model.overlong_buffer.len=4",
            "reward_model.overlong_buffer.penalty_factor=-1"
        ], r"penalty_factor: must be a number >= 0"),
    ],
)
def test_dapo_config_errors_name_the_key_and_the_fix(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_dapo_config(_compose(["data.train_batch_size=8"] + overrides))


def test_bad_dapo_config_fails_on_the_driver_before_ray_starts(tiny_model):
    config = _compose([
        "algorithm.filter_groups.enable=True", "data.train_files=x.parquet",
        f"actor_rollout_ref.model.path={tiny_model}"
    ])
    assert not ray.is_initialized()
    with pytest.raises(ConfigError, match="filter_groups.metric"):
        run_dapo(config)
    assert not ray.is_initialized()


def _rollout(tokenizer, response_lengths: list[int], prompt_len: int = 4, resp_width: int = 8) -> DataProto:
    """Responses of the given lengths (real token ids, right-padded) after left-padded prompts."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = len(response_lengths)
    prompts = torch.full((rows, prompt_len), 5)
    responses = torch.full((rows, resp_width), pad)
    mask = torch.zeros(rows, prompt_len + resp_width, dtype=torch.long)
    mask[:, :prompt_len] = 1
    for i, length in enumerate(response_lengths):
        responses[i, :length] = 7
        mask[i, prompt_len:prompt_len + length] = 1
    return DataProto.from_dict(tensors={
        "prompts": prompts,
        "responses": responses,
        "attention_mask": mask,
    },
                               non_tensors={
                                   "data_source": ["arithmetic"] * rows,
                                   "reward_model": [{
                                       "style": "rule",
                                       "ground_truth": "1"
                                   }] * rows,
                               })


@pytest.mark.parametrize("style", ["overlong_buffer", "reward_kwargs"])
def test_overlong_buffer_reaches_the_dapo_reward_manager(style, tiny_model, tmp_path):
    """max_response_length 8, buffer 4, factor 0.5: free up to 4 tokens, then -(L - 4) / 4 * 0.5."""
    from transformers import AutoTokenizer

    reward_file = tmp_path / "always_one.py"
    reward_file.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                           "    return 1.0\n")
    buffer = {"enable": "True", "len": "4", "penalty_factor": "0.5", "log": "True"}
    if style == "overlong_buffer":
        overrides = [f"reward_model.overlong_buffer.{k}={v}" for k, v in buffer.items()]
    else:  # newer upstream scripts: +reward_model.reward_kwargs.overlong_buffer_cfg.*
        overrides = [f"+reward_model.reward_kwargs.overlong_buffer_cfg.{k}={v}" for k, v in buffer.items()]
    config = _compose(overrides + ["data.max_response_length=8", f"custom_reward_function.path={reward_file}"])
    validate_dapo_config(config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    kwargs = DAPOTaskRunner().reward_manager_kwargs(config)
    assert kwargs["max_resp_len"] == 8 and kwargs["overlong_buffer_cfg"]["len"] == 4
    reward_fn = load_reward_manager(config, tokenizer, num_examine=0, **kwargs)

    lengths = [2, 4, 5, 6, 8]
    reward, extra = compute_reward(_rollout(tokenizer, lengths), reward_fn)
    penalties = [0.0, 0.0, -0.125, -0.25, -0.5]
    assert extra["overlong_reward"] == pytest.approx(penalties)
    assert extra["overlong"] == [False, False, True, True, True]
    for i, (length, penalty) in enumerate(zip(lengths, penalties)):
        assert reward[i, length - 1].item() == pytest.approx(1.0 + penalty)  # on the last response token
        assert reward[i].sum().item() == pytest.approx(1.0 + penalty)


def test_overlong_arguments_go_only_to_managers_that_take_them():
    config = _compose(["reward_model.reward_manager=batch", "+reward_model.reward_kwargs.timeout_s=5"])
    assert DAPOTaskRunner().reward_manager_kwargs(config) == {"timeout_s": 5}  # batch would pass them to the fn


# ----------------------------------------------------------------------------------------------------------------------
# end to end: the shell recipe as a user runs it (its own process and local Ray cluster), sized down through its
# environment variables; the extra arguments make the rounds deterministic and dump the trained samples


def _jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _components(row: dict) -> dict:
    """A dump row's reward components, nested under reward_extra_info or at the top level."""
    return row.get("reward_extra_info") or row


TINY_ENV = {
    "N_GPUS_PER_NODE": "1",
    "ROLLOUT_NAME": "hf",
    "ROLLOUT_TP": "1",
    "OFFLOAD": "False",
    "GRADIENT_CHECKPOINTING": "False",
    "TRAIN_PROMPT_BSZ": "4",
    "GEN_PROMPT_BSZ": "4",
    "N_RESP_PER_PROMPT": "4",
    "TRAIN_PROMPT_MINI_BSZ": "2",
    "MAX_PROMPT_LENGTH": "32",
    "MAX_RESPONSE_LENGTH": "8",
    "OVERLONG_BUFFER_LEN": "4",
    "MAX_NUM_GEN_BATCHES": "3",
    "TOTAL_TRAINING_STEPS": "2",
    "SAVE_FREQ": "2",
    "TEST_FREQ": "2",
    "VAL_BEFORE_TRAIN": "False",
    "VAL_N": "1",
    "LOGGER": "['console','file']",
    "PROJECT_NAME": "dapo_script",
    "EXPERIMENT_NAME": "tiny",
}


@pytest.mark.slow
def test_run_script_two_steps_with_dynamic_sampling_and_overlong_shaping(tiny_model, tmp_path):
    data = write_arithmetic_task(str(tmp_path / "data"), train_size=16, test_size=4)
    reward_file = tmp_path / "reward.py"
    reward_file.write_text(REWARD_FN)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # the script starts its own local Ray
    env.update(TINY_ENV)
    env.update({
        "HOME": str(tmp_path / "home"),  # nothing lands in the real home directory
        "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),  # python3 = this interpreter
        "VERL_FILE_LOGGER_ROOT": str(tmp_path / "logs"),
        "MODEL_PATH": tiny_model,
        "TRAIN_FILE": data["train"],
        "TEST_FILE": data["test"],
        "CKPTS_DIR": str(tmp_path / "ckpt"),
    })
    args = [
        "trainer.device=cpu",
        "actor_rollout_ref.actor.use_torch_compile=False",
        f"custom_reward_function.path={reward_file}",
        "data.shuffle=False",  # rounds of prompts 0-3, 4-7, ...: two informative prompts in each
        f"trainer.rollout_data_dir={tmp_path / 'rollout'}",
    ]
    proc = subprocess.run(["bash", SCRIPT, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    logged = [
        r for r in _jsonl(tmp_path / "logs" / "dapo_script" / "tiny.jsonl") if "training/global_step" in r["data"]
    ]
    assert [r["step"] for r in logged] == [1, 2]
    for record in logged:
        metrics = record["data"]
        # each step: 2 rounds of 4 prompts, half of them dropped, exactly train_batch_size=4 kept
        assert metrics["train/num_gen_batches"] == 2
        assert metrics["train/num_gen_prompts"] == 8 and metrics["train/num_kept_prompts"] == 4
        assert metrics["train/kept_prompt_ratio"] == 0.5
        for key in ("actor/pg_loss", "actor/pg_clipfrac", "critic/score/mean", "critic/advantages/mean", "timing_s/gen",
                    "timing_s/step", "timing_s/update_actor"):
            assert key in metrics, f"missing {key}; logged {sorted(metrics)}"
    assert "val-core/arithmetic/acc/mean@1" in logged[-1]["data"]

    for step in (1, 2):
        rows = _jsonl(tmp_path / "rollout" / f"{step}.jsonl")
        assert len(rows) == 4 * 4  # train_batch_size prompts x n, no more
        uids = [row["uid"] for row in rows]
        assert sorted(uids.count(u) for u in set(uids)) == [4, 4, 4, 4]
        for row in rows:
            parts = _components(row)
            assert parts["parity"] == 0  # only the informative (even-indexed) prompts were trained on
            assert -1.0 <= parts["overlong_reward"] <= 0.0  # the overlong buffer shaped the reward
            assert row["score"] == pytest.approx(parts["base"] + parts["overlong_reward"], abs=1e-6)
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "global_step_2" / "actor").is_dir() and (ckpt / "global_step_2" / "data.pt").is_file()
