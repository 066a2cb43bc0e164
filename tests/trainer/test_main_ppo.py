"""End-to-end runs of ``verl.trainer.main_ppo`` on CPU with a real local Ray cluster and the tiny model.

* config validation fails on the driver, fast, before any Ray actor exists;
* the embedded default fills data, model and small batch sizes, and user overrides win;
* a 2-step GRPO run over 2 worker processes (KL loss, so a reference worker too): metrics, rollout and validation
  dumps, checkpoint layout and tracker, curriculum sampler updates;
* a 2-step PPO run (GAE + critic, KL in the reward, reward function in a Ray task);
* resume: 2 steps saving every step, then ``resume_mode=auto`` with 3 total steps trains only step 3, on the next
  batch of data, and prunes old checkpoints to ``max_actor_ckpt_to_keep``.

One Ray cluster serves the whole module.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import ray
from hydra import compose, initialize_config_dir

import verl
from verl.models.tiny import get_tiny_model_path
from verl.single_controller.ray.utils import local_ray_init_kwargs
from verl.trainer.main_ppo import EMBEDDED_DEFAULT_OVERRIDES, prepare_config, run_ppo
from verl.utils.config import ConfigError, validate_config
from verl.utils.dataset.tasks import write_arithmetic_task
from verl.utils.device import is_cuda_available  # noqa: F401  (imports torch, so timings below exclude it)

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Task files, the tiny model, and a Ray cluster whose processes write file-logger metrics under ``logs``."""
    root = tmp_path_factory.mktemp("main_ppo")
    paths = write_arithmetic_task(str(root / "data"), train_size=16, test_size=4)
    model = get_tiny_model_path()
    mp = pytest.MonkeyPatch()
    mp.setenv("VERL_FILE_LOGGER_ROOT", str(root / "logs"))  # inherited by the Ray processes started below
    ray.init(**local_ray_init_kwargs(num_cpus=4))
    try:
        yield {"root": root, "train": paths["train"], "test": paths["test"], "model": model}
    finally:
        ray.shutdown()
        mp.undo()


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def _base_overrides(env, name: str) -> list[str]:
    out = env["root"] / name
    return [
        f"data.train_files={env['train']}",
        f"data.val_files={env['test']}",
        "data.train_batch_size=4",
        "data.max_prompt_length=32",
        "data.max_response_length=8",
        f"actor_rollout_ref.model.path={env['model']}",
        "actor_rollout_ref.model.enable_gradient_checkpointing=False",
        "actor_rollout_ref.actor.use_torch_compile=False",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.optim.lr=1e-4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
        "trainer.device=cpu",
        "trainer.logger=[console,file]",
        "trainer.project_name=verl_test",
        f"trainer.experiment_name={name}",
        f"trainer.default_local_dir={out / 'ckpt'}",
        f"trainer.rollout_data_dir={out / 'rollout'}",
        f"trainer.validation_data_dir={out / 'val'}",
    ]


def _logged(env, name: str) -> list[dict]:
    path = env["root"] / "logs" / "verl_test" / f"{name}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _live_actor_count() -> int:
    from ray._private import state

    return sum(1 for info in state.actors().values() if info.get("State") != "DEAD")


# ----------------------------------------------------------------------------------------------------------------------


def test_config_error_is_raised_on_the_driver_before_any_actor(env):
    config = _compose(
        _base_overrides(env, "bad") + [
            "algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=2",
            "actor_rollout_ref.actor.ppo_mini_batch_size=3"
        ])
    before = _live_actor_count()
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"actor_rollout_ref\.actor\.ppo_mini_batch_size.*Fix:") as info:
        run_ppo(config)
    elapsed = time.perf_counter() - start
    assert "\n" not in str(info.value)
    assert elapsed < 5.0, f"validation took {elapsed:.1f}s"
    assert _live_actor_count() == before  # no TaskRunner, no workers


def test_rollout_mode_and_placement_are_checked_before_workers(env):
    """Server mode takes every rollout server (hf, sglang, vllm: verl.workers.fsdp_async_workers); an unknown mode, or
    a server address without the disaggregated placement, is refused before any worker starts."""
    from verl.trainer.main_ppo import _preflight

    config = _compose(
        _base_overrides(env, "bad_mode") +
        ["actor_rollout_ref.rollout.mode=async", "actor_rollout_ref.rollout.name=sglang"])
    _preflight(config)
    config.actor_rollout_ref.rollout.mode = "server"
    with pytest.raises(ConfigError, match=r"rollout\.mode.*Fix:"):
        _preflight(config)
    config = _compose(
        _base_overrides(env, "bad_placement") +
        ["actor_rollout_ref.rollout.mode=async", "actor_rollout_ref.rollout.server_address=http://10.0.0.2:30000"])
    with pytest.raises(ConfigError, match=r"rollout\.server_address.*placement=disaggregated"):
        validate_config(config, check_paths=False)


def test_embedded_default_fills_data_model_and_small_batches(env, monkeypatch):
    monkeypatch.setenv("VERL_DATA_CACHE", str(env["root"] / "cache"))
    monkeypatch.setenv("VERL_TINY_MODEL_CACHE", os.path.dirname(env["model"]))
    # the SFT warm-up of the embedded model is built and tested in tests/trainer/test_fsdp_sft_trainer.py
    monkeypatch.setattr("verl.trainer.main_ppo._embedded_model_path", lambda: env["model"])
    config = prepare_config(_compose(["trainer.total_training_steps=3", "trainer.default_local_dir=rel/ckpt"]))
    assert config.data.train_files == str(env["root"] / "cache" / "arithmetic" / "train.parquet")
    assert os.path.isfile(config.data.val_files)
    assert config.actor_rollout_ref.model.path == env["model"]
    assert config.algorithm.adv_estimator == EMBEDDED_DEFAULT_OVERRIDES["algorithm.adv_estimator"]
    assert config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu is not None
    assert config.trainer.total_training_steps == 3  # the user's value wins over the preset
    assert config.actor_rollout_ref.rollout.response_length == config.data.max_response_length  # resolved
    assert config.trainer.default_local_dir == os.path.abspath("rel/ckpt")
    validate_config(config)  # the embedded default is a valid config, for 1 and 2 processes
    config.trainer.n_gpus_per_node = 2
    validate_config(config)


CURRICULUM_SAMPLER = """
import json
from verl.utils.dataset.sampler import AbstractCurriculumSampler


class RecordingSampler(AbstractCurriculumSampler):
    LOG = {log!r}

    def __init__(self, data_source, data_config):
        self.size = len(data_source)

    def __iter__(self):
        return iter(range(self.size))

    def __len__(self):
        return self.size

    def update(self, batch):
        with open(self.LOG, "a") as f:
            f.write(json.dumps({{"rows": len(batch), "has_scores": "token_level_scores" in batch.batch.keys()}}) + "\\n")
"""


@pytest.mark.slow
def test_grpo_two_steps_two_processes(env):
    name = "grpo"
    out = env["root"] / name
    out.mkdir()
    sampler_file = out / "curriculum.py"
    sampler_file.write_text(CURRICULUM_SAMPLER.format(log=str(out / "sampler_updates.jsonl")))
    run_ppo(
        _compose(
            _base_overrides(env, name) + [
                f"data.sampler.class_path={sampler_file}",
                "data.sampler.class_name=RecordingSampler",
                "algorithm.adv_estimator=grpo",
                "actor_rollout_ref.rollout.n=2",
                "actor_rollout_ref.actor.use_kl_loss=True",
                "trainer.n_gpus_per_node=2",
                "trainer.total_training_steps=2",
                "trainer.test_freq=2",
                "trainer.save_freq=2",
                "trainer.log_val_generations=2",
            ]))

    logged = _logged(env, name)
    train = [r for r in logged if "training/global_step" in r["data"]]
    assert [r["step"] for r in train] == [1, 2]
    metrics = train[-1]["data"]
    for key in ("training/epoch", "critic/score/mean", "critic/advantages/mean", "response_length/mean",
                "actor/pg_loss", "actor/entropy", "actor/lr", "perf/mfu/actor", "perf/throughput", "timing_s/gen",
                "timing_s/old_log_prob", "timing_s/ref", "timing_s/update_actor", "timing_s/step",
                "global_seqlen/balanced_max", "val-core/arithmetic/reward/mean@1"):
        assert key in metrics, f"missing metric {key}; logged: {sorted(metrics)}"
    assert "critic/values/mean" not in metrics  # no critic for GRPO
    assert [r["step"] for r in logged if "val-core/arithmetic/reward/mean@1" in r["data"]] == [0, 2]

    for step in (1, 2):
        rows = _jsonl(out / "rollout" / f"{step}.jsonl")
        assert len(rows) == 4 * 2
        for row in rows:
            assert {"input", "output", "gts", "score", "step", "advantages"} <= set(row)
            assert row["step"] == step and isinstance(row["score"], float)
        uids = [row["uid"] for row in rows]
        assert sorted(uids.count(u) for u in set(uids)) == [2, 2, 2, 2]  # n responses share a prompt's uid
    val_rows = _jsonl(out / "val" / "0.jsonl")
    assert len(val_rows) == 4 and all(r["gts"] is not None for r in val_rows)
    assert os.path.isfile(out / "val" / "2.jsonl")

    # the curriculum sampler was updated after every step with the scored batch
    assert _jsonl(out / "sampler_updates.jsonl") == [{"rows": 8, "has_scores": True}] * 2

    ckpt = out / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "global_step_2" / "actor").is_dir() and (ckpt / "global_step_2" / "data.pt").is_file()
    assert not (ckpt / "global_step_1").exists()  # save_freq=2
    assert not (ckpt / "global_step_2" / "critic").exists()


@pytest.mark.slow
def test_ppo_gae_with_critic_kl_in_reward_and_async_reward(env):
    name = "ppo"
    run_ppo(
        _compose(
            _base_overrides(env, name) + [
                "algorithm.adv_estimator=gae",
                "algorithm.use_kl_in_reward=True",
                "reward_model.launch_reward_fn_async=True",  # rewards computed in a Ray task meanwhile
                "critic.ppo_micro_batch_size_per_gpu=2",
                "critic.model.enable_gradient_checkpointing=False",
                "trainer.n_gpus_per_node=1",
                "trainer.total_training_steps=2",
                "trainer.val_before_train=False",
                "trainer.rollout_data_dir=null",
                "trainer.validation_data_dir=null",
            ]))
    train = [r for r in _logged(env, name) if "training/global_step" in r["data"]]
    assert [r["step"] for r in train] == [1, 2]
    metrics = train[-1]["data"]
    for key in ("critic/vf_loss", "critic/values/mean", "critic/vf_explained_var", "critic/returns/mean",
                "actor/reward_kl_penalty", "actor/reward_kl_penalty_coeff", "actor/pg_loss", "timing_s/values",
                "timing_s/update_critic"):
        assert key in metrics, f"missing metric {key}; logged: {sorted(metrics)}"
    assert metrics["actor/reward_kl_penalty_coeff"] == pytest.approx(0.001)
    assert metrics["critic/score/mean"] == metrics["critic/score/mean"]  # the async reward arrived (not NaN)


@pytest.mark.slow
def test_resume_continues_from_the_latest_checkpoint(env):
    """12 prompts, 4 per step: 3 steps per epoch. Run to step 2 (mid-epoch), resume to step 3 (the end of the
    epoch), then resume with total_epochs=2 (steps 4-6: the resumed dataloader must start the second epoch)."""
    name = "resume"
    out = env["root"] / name
    common = _base_overrides(env, name) + [
        "algorithm.adv_estimator=grpo",
        "actor_rollout_ref.rollout.n=2",
        "data.train_max_samples=12",
        "data.seed=7",
        "trainer.n_gpus_per_node=1",
        "trainer.save_freq=1",
        "trainer.max_actor_ckpt_to_keep=2",
        "trainer.val_before_train=False",
        "trainer.validation_data_dir=null",
    ]
    ckpt = out / "ckpt"
    run_ppo(_compose(common + ["trainer.total_training_steps=2"]))
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "global_step_1" / "actor").is_dir() and (ckpt / "global_step_2" / "data.pt").is_file()

    run_ppo(_compose(common + ["trainer.total_training_steps=3", "trainer.resume_mode=auto"]))
    steps = [r["step"] for r in _logged(env, name) if "training/global_step" in r["data"]]
    assert steps == [1, 2, 3]  # the second run trained only step 3
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert not (ckpt / "global_step_1").exists()  # pruned to max_actor_ckpt_to_keep=2
    assert (ckpt / "global_step_2" / "actor").is_dir() and (ckpt / "global_step_3" / "actor").is_dir()

    run_ppo(_compose(common + ["trainer.total_training_steps=null", "trainer.total_epochs=2"]))
    logged = [r for r in _logged(env, name) if "training/global_step" in r["data"]]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["data"]["training/epoch"] for r in logged] == [0, 0, 0, 1, 1, 1]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "6"

    prompts = {step: {row["input"] for row in _jsonl(out / "rollout" / f"{step}.jsonl")} for step in range(1, 7)}
    assert all(len(p) == 4 for p in prompts.values())
    # the dataloader position was restored mid-epoch: step 3 trains on the rest of the epoch, not the first batch
    first_epoch = prompts[1] | prompts[2] | prompts[3]
    assert len(first_epoch) == 12
    # and after the end-of-epoch checkpoint the next epoch covers the data once more
    assert prompts[4] | prompts[5] | prompts[6] == first_epoch
