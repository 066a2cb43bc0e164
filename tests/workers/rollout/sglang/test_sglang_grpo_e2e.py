"""End to end: ``verl.trainer.main_ppo`` trains 3 GRPO steps on CPU through Ray with
``actor_rollout_ref.rollout.name=sglang``: an FSDP worker process whose hybrid engine is SGLang's offline Engine
(started from dummy weights, synced from the actor before every generation), greedy validation before and after.

A reward that varies within each group makes every step change the actor's weights (lr 5e-3), and the rollout's own
log-probs (``calculate_log_probs``) are compared by the trainer with the actor's recomputed ones
(``training/rollout_probs_diff_max``): they agree to < 1e-3 at every step only if the engine received the updated
weights before generating. Needs SGLang (``scripts/ci/setup_sglang_env.sh``); skipped without it."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip(
        "SGLang is not installed; run tests/workers/rollout/sglang in the SGLang venv "
        "(bash scripts/ci/setup_sglang_env.sh .venv-sglang)",
        allow_module_level=True)

import ray  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import verl  # noqa: E402
from verl.models.tiny import get_tiny_model_path  # noqa: E402
from verl.single_controller.ray.utils import local_ray_init_kwargs  # noqa: E402
from verl.trainer.main_ppo import run_ppo  # noqa: E402
from verl.utils.dataset.tasks import write_arithmetic_task  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
STEPS = 3
# a score that differs between the samples of one prompt, so that GRPO advantages (and updates) are not zero
REWARD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return len(set(solution_str)) / 10.0
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang_grpo")
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


def _jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_grpo_three_steps_with_sglang_rollout(env):
    name = "grpo_sglang"
    out = env["root"] / name
    out.mkdir()
    reward_file = out / "reward.py"
    reward_file.write_text(REWARD)
    overrides = [
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
        "actor_rollout_ref.actor.optim.lr=5e-3",
        "actor_rollout_ref.rollout.name=sglang",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.rollout.calculate_log_probs=True",
        "actor_rollout_ref.rollout.max_num_seqs=32",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "algorithm.adv_estimator=grpo",
        f"custom_reward_function.path={reward_file}",
        "trainer.device=cpu",
        "trainer.n_gpus_per_node=1",
        f"trainer.total_training_steps={STEPS}",
        f"trainer.test_freq={STEPS}",
        "trainer.save_freq=-1",
        "trainer.logger=[console,file]",
        "trainer.project_name=verl_test",
        f"trainer.experiment_name={name}",
        f"trainer.default_local_dir={out / 'ckpt'}",
        f"trainer.rollout_data_dir={out / 'rollout'}",
        "trainer.validation_data_dir=null",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    run_ppo(config)

    logged = _jsonl(env["root"] / "logs" / "verl_test" / f"{name}.jsonl")
    train = [r for r in logged if "training/global_step" in r["data"]]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for record in train:
        metrics = record["data"]
        for key in ("actor/pg_loss", "actor/entropy", "critic/score/mean", "response_length/mean", "timing_s/gen",
                    "timing_s/update_actor", "perf/weight_sync_s", "perf/weight_sync_gb", "perf/weight_sync_buckets",
                    "perf/weight_sync_peak_memory_gb"):
            assert key in metrics, f"step {record['step']}: missing metric {key}; logged: {sorted(metrics)}"
        assert metrics["perf/weight_sync_gb"] > 0 and metrics["perf/weight_sync_buckets"] >= 1
        assert metrics["response_length/mean"] > 0
        # the engine generated with the actor's current weights (a stale engine differs by far more after lr 5e-3)
        assert metrics["training/rollout_probs_diff_max"] < 1e-3, metrics["training/rollout_probs_diff_max"]
    assert any(r["data"]["actor/grad_norm"] > 0 for r in train)  # the actor really trained
    assert [r["step"] for r in logged if "val-core/arithmetic/reward/mean@1" in r["data"]] == [0, STEPS]

    for step in range(1, STEPS + 1):
        rows = _jsonl(out / "rollout" / f"{step}.jsonl")
        assert len(rows) == 4 * 2
        uids = [row["uid"] for row in rows]
        assert sorted(uids.count(u) for u in set(uids)) == [2, 2, 2, 2]  # n responses share a prompt's uid
        assert all(isinstance(row["output"], str) for row in rows)
