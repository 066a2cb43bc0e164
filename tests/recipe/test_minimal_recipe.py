"""The example recipe of ``recipe/README.md`` (``recipe/minimal``): its metric against hand-computed values, its
yaml on top of ``ppo_trainer.yaml``, and its Hydra main run as the README shows (``python -m
recipe.minimal.main_minimal``, its own process and local Ray) for 2 steps on CPU with the tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from recipe.minimal.main_minimal import MinimalTaskRunner
from recipe.minimal.minimal_ray_trainer import RayMinimalTrainer, response_diversity_metrics
from verl.models.tiny import get_tiny_model_path
from verl.trainer.ppo.ray_trainer import RayPPOTrainer
from verl.utils.config import validate_config
from verl.utils.dataset.tasks import write_arithmetic_task

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_response_diversity_metrics_by_hand():
    responses = torch.tensor([[1, 2, 0], [1, 2, 9], [3, 0, 0], [4, 5, 6]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    # group a: [1, 2] twice (the 9 is padding) -> 1 distinct of 2; group b: [3] and [4, 5, 6] -> 2 of 2
    metrics = response_diversity_metrics(responses, mask, ["a", "a", "b", "b"])
    assert metrics == {"diversity/distinct_ratio": 0.75, "diversity/identical_group_ratio": 0.5}
    with pytest.raises(ValueError, match="4 responses but 3 uids"):
        response_diversity_metrics(responses, mask, ["a", "a", "b"])


def test_minimal_yaml_extends_ppo_trainer_and_the_runner_builds_the_subclass():
    with initialize_config_dir(config_dir=os.path.join(REPO, "recipe", "minimal", "config"), version_base=None):
        config = compose(config_name="minimal_trainer",
                         overrides=[
                             "diversity.enable=False", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
                             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8"
                         ])
    assert config.algorithm.adv_estimator == "grpo" and config.actor_rollout_ref.rollout.n == 4
    assert config.diversity.enable is False  # the recipe's own key, overridable without '+'
    assert config.trainer.project_name == "verl_minimal_recipe"
    assert config.actor_rollout_ref.actor.clip_ratio == 0.2  # and everything else of ppo_trainer.yaml
    validate_config(config, check_paths=False)
    assert issubclass(RayMinimalTrainer, RayPPOTrainer)
    assert MinimalTaskRunner().get_trainer_cls(config) is RayMinimalTrainer


@pytest.mark.slow
def test_main_minimal_runs_two_steps(tmp_path):
    data = write_arithmetic_task(str(tmp_path / "data"), train_size=8, test_size=4)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({"HOME": str(tmp_path / "home"), "VERL_FILE_LOGGER_ROOT": str(tmp_path / "logs")})
    command = [
        sys.executable, "-m", "recipe.minimal.main_minimal", f"data.train_files={data['train']}",
        f"data.val_files={data['test']}", f"actor_rollout_ref.model.path={get_tiny_model_path()}",
        "trainer.total_training_steps=2", "data.train_batch_size=4", "data.max_prompt_length=32",
        "data.max_response_length=8", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.use_torch_compile=False",
        "actor_rollout_ref.model.enable_gradient_checkpointing=False", "trainer.device=cpu",
        "trainer.val_before_train=False", "trainer.logger=[console,file]", "trainer.experiment_name=tiny",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}"
    ]
    # from any directory: PYTHONPATH names the repository root (tests/recipe/conftest.py), as running from it would
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    with open(tmp_path / "logs" / "verl_minimal_recipe" / "tiny.jsonl", encoding="utf-8") as f:
        logged = [json.loads(line) for line in f if line.strip()]
    train = [r for r in logged if "training/global_step" in r["data"]]
    assert [r["step"] for r in train] == [1, 2]
    for record in train:
        metrics = record["data"]
        assert 0.25 <= metrics["diversity/distinct_ratio"] <= 1.0  # at least 1 distinct response of n=4
        assert 0.0 <= metrics["diversity/identical_group_ratio"] <= 1.0
        assert "actor/pg_loss" in metrics and "critic/advantages/mean" in metrics  # the rest of the PPO step
