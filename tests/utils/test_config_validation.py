"""validate_config: every bad config raises one single-line ConfigError naming the key and the fix."""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import verl
from verl.utils.config import ConfigError, ConfigWarning, need_critic, need_reference_policy, validate_config
from verl.utils.device import is_cuda_available

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfgval")
    train, val = root / "train.parquet", root / "val.parquet"
    train.write_bytes(b"")
    val.write_bytes(b"")
    model = root / "model"
    model.mkdir()
    reward = root / "reward.py"
    reward.write_text("def compute_score(*a, **k):\n    return 0.0\n")
    return {"train": str(train), "val": str(val), "model": str(model), "reward": str(reward), "root": root}


@pytest.fixture(scope="module")
def base_cfg(files):
    """A small valid GAE config on one CPU device."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="ppo_trainer",
                      overrides=[
                          f"data.train_files={files['train']}", f"data.val_files={files['val']}",
                          f"actor_rollout_ref.model.path={files['model']}", "data.train_batch_size=8",
                          "data.max_prompt_length=64", "data.max_response_length=64",
                          "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                          "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                          "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
                          "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
                          "critic.ppo_micro_batch_size_per_gpu=2", "trainer.n_gpus_per_node=1", "trainer.device=cpu",
                          "trainer.logger=[console]"
                      ])
    return cfg


def _with(cfg, updates: dict):
    cfg = copy.deepcopy(cfg)
    for key, value in updates.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _grpo(**extra):
    out = {"algorithm.adv_estimator": "grpo", "actor_rollout_ref.rollout.n": 2}
    out.update(extra)
    return out


def test_base_config_is_valid(base_cfg):
    assert validate_config(base_cfg) == []
    assert need_critic(base_cfg) and not need_reference_policy(base_cfg)
    grpo = _with(base_cfg, _grpo())
    assert validate_config(grpo) == [] and not need_critic(grpo)


def test_plain_dict_config_is_accepted(base_cfg):
    as_dict = OmegaConf.to_container(base_cfg, resolve=True)
    assert validate_config(as_dict) == []


# (updates, key the message must start with, a fragment of the fix)
BAD_CASES = {
    "mini_not_dividing_train": ({
        "data.train_batch_size": 10
    }, "actor_rollout_ref.actor.ppo_mini_batch_size", "divisor of 10"),
    "mini_larger_than_train": ({
        "actor_rollout_ref.actor.ppo_mini_batch_size": 16
    }, "actor_rollout_ref.actor.ppo_mini_batch_size", "divisor"),
    "responses_not_dividing_devices": ({
        "trainer.n_gpus_per_node": 3
    }, "data.train_batch_size", "multiple of 3"),
    "mini_times_n_not_dividing_dp": ({
        "trainer.n_gpus_per_node": 4,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 2
    }, "actor_rollout_ref.actor.ppo_mini_batch_size", "multiple of 4"),
    "micro_not_dividing_mini": ({
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 3
    }, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", "divisor of 4"),
    "micro_global_and_per_gpu": ({
        "actor_rollout_ref.actor.ppo_micro_batch_size": 4
    }, "actor_rollout_ref.actor.ppo_micro_batch_size", "remove"),
    "micro_missing": ({
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": None
    }, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", "use_dynamic_bsz=True"),
    "rollout_log_prob_micro_missing": ({
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": None
    }, "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", "log_prob_use_dynamic_bsz=True"),
    "ref_log_prob_micro_missing": ({
        "actor_rollout_ref.actor.use_kl_loss": True,
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": None
    }, "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", "set"),
    "critic_micro_missing": ({
        "critic.ppo_micro_batch_size_per_gpu": None
    }, "critic.ppo_micro_batch_size_per_gpu", "set"),
    "grpo_with_one_response": (_grpo(**{"actor_rollout_ref.rollout.n": 1}), "actor_rollout_ref.rollout.n", "n=2"),
    "rloo_with_one_response": ({
        "algorithm.adv_estimator": "rloo"
    }, "actor_rollout_ref.rollout.n", "n=2"),
    "unknown_estimator": ({
        "algorithm.adv_estimator": "no_such_estimator"
    }, "algorithm.adv_estimator", "registered"),
    "unknown_rollout": ({
        "actor_rollout_ref.rollout.name": "trtllm"
    }, "actor_rollout_ref.rollout.name", "rollout.name=hf"),
    "unknown_rollout_mode": ({
        "actor_rollout_ref.rollout.mode": "batch"
    }, "actor_rollout_ref.rollout.mode", "sync"),
    "unknown_logger": ({
        "trainer.logger": ["console", "neptune"]
    }, "trainer.logger", "tensorboard"),
    "bad_device": ({
        "trainer.device": "gpu"
    }, "trainer.device", "trainer.device=auto"),
    "train_files_missing": ({
        "data.train_files": None
    }, "data.train_files", "data.train_files="),
    "train_file_does_not_exist": ({
        "data.train_files": ["/nonexistent/train.parquet"]
    }, "data.train_files", "check the path"),
    "val_files_missing_with_validation_on": ({
        "data.val_files": None
    }, "data.val_files", "val_before_train=False"),
    "model_path_missing": ({
        "actor_rollout_ref.model.path": None
    }, "actor_rollout_ref.model.path", "actor_rollout_ref.model.path="),
    "model_path_does_not_exist": ({
        "actor_rollout_ref.model.path": "/nonexistent/model"
    }, "actor_rollout_ref.model.path", "check the path"),
    "dynamic_bsz_budget_too_small": ({
        "actor_rollout_ref.actor.use_dynamic_bsz": True,
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": 100
    }, "actor_rollout_ref.actor.ppo_max_token_len_per_gpu", ">= 128"),
    "critic_budget_too_small": ({
        "actor_rollout_ref.actor.use_dynamic_bsz": True,
        "critic.ppo_max_token_len_per_gpu": 64
    }, "critic.ppo_max_token_len_per_gpu", ">= 128"),
    "gae_without_critic": ({
        "critic.enable": False
    }, "critic.enable", "grpo"),
    "custom_reward_file_missing": ({
        "custom_reward_function.path": "/nonexistent/reward.py"
    }, "custom_reward_function.path", "check the path"),
    "bad_loss_agg_mode": ({
        "actor_rollout_ref.actor.loss_agg_mode": "sum"
    }, "actor_rollout_ref.actor.loss_agg_mode", "token-mean"),
    "unknown_policy_loss": ({
        "actor_rollout_ref.actor.policy_loss.loss_mode": "nope"
    }, "actor_rollout_ref.actor.policy_loss.loss_mode", "registered"),
    "unknown_reward_manager": ({
        "reward_model.reward_manager": "nope"
    }, "reward_model.reward_manager", "registered"),
    "bad_kl_loss_type": ({
        "actor_rollout_ref.actor.kl_loss_type": "kl2"
    }, "actor_rollout_ref.actor.kl_loss_type", "low_var_kl"),
    "val_sampling_needs_temperature": ({
        "actor_rollout_ref.rollout.val_kwargs.do_sample": True
    }, "actor_rollout_ref.rollout.val_kwargs.temperature", "temperature=1.0"),
    "zero_temperature": ({
        "actor_rollout_ref.rollout.temperature": 0.0
    }, "actor_rollout_ref.rollout.temperature", "do_sample=False"),
    "resume_path_without_path": ({
        "trainer.resume_mode": "resume_path"
    }, "trainer.resume_from_path", "global_step_N"),
    "hf_rollout_with_tp": ({
        "trainer.n_gpus_per_node": 2,
        "actor_rollout_ref.rollout.tensor_model_parallel_size": 2
    }, "actor_rollout_ref.rollout.tensor_model_parallel_size", "tensor_model_parallel_size=1"),
    "sp_not_dividing_devices": ({
        "trainer.n_gpus_per_node": 2,
        "actor_rollout_ref.actor.ulysses_sequence_parallel_size": 3
    }, "actor_rollout_ref.actor.ulysses_sequence_parallel_size", "divisor of 2"),
    "global_micro_not_dividing_dp": ({
        "trainer.n_gpus_per_node": 2,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": None,
        "actor_rollout_ref.actor.ppo_micro_batch_size": 3
    }, "actor_rollout_ref.actor.ppo_micro_batch_size", "ppo_micro_batch_size_per_gpu"),
    "non_integer_batch": ({
        "data.train_batch_size": "eight"
    }, "data.train_batch_size", "=N"),
    "hybrid_engine_off": ({
        "actor_rollout_ref.hybrid_engine": False
    }, "actor_rollout_ref.hybrid_engine", "hybrid_engine=True"),
}


@pytest.mark.filterwarnings("ignore::verl.utils.config.ConfigWarning")
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_config_raises_config_error_naming_the_key(base_cfg, case):
    updates, key, fix = BAD_CASES[case]
    cfg = _with(base_cfg, updates)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message.startswith(key), message
    assert fix in message, message
    assert "Fix" in message and "\n" not in message, message


def test_cuda_device_without_gpu(base_cfg):
    if is_cuda_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match=r"^trainer\.device: =cuda.*trainer\.device=cpu"):
        validate_config(_with(base_cfg, {"trainer.device": "cuda"}))


def test_missing_tracker_package_is_named(base_cfg):
    missing = [
        name for name in ("clearml", "trackio", "swanlab", "mlflow", "wandb", "tensorboard") if not _installed(name)
    ]
    if not missing:
        pytest.skip("every tracker package is installed")
    with pytest.raises(ConfigError, match=rf"^trainer\.logger: includes '{missing[0]}'.*Fix: pip install {missing[0]}"):
        validate_config(_with(base_cfg, {"trainer.logger": ["console", missing[0]]}))


def test_missing_engine_package_is_named(base_cfg):
    if _installed("vllm"):
        pytest.skip("vllm is installed")
    with pytest.raises(ConfigError, match=r"^actor_rollout_ref\.rollout\.name: =vllm.*pip install"):
        validate_config(_with(base_cfg, {"actor_rollout_ref.rollout.name": "vllm"}))


def test_validation_can_be_off_without_val_files(base_cfg):
    cfg = _with(base_cfg, {"data.val_files": None, "trainer.val_before_train": False, "trainer.test_freq": -1})
    assert validate_config(cfg) == []


def test_paths_can_be_skipped(base_cfg):
    cfg = _with(base_cfg, {"data.train_files": None, "actor_rollout_ref.model.path": None})
    assert validate_config(cfg, check_paths=False) == []


def test_hub_id_model_path_and_remote_data_are_accepted(base_cfg):
    cfg = _with(
        base_cfg, {
            "actor_rollout_ref.model.path": "Qwen/Qwen2.5-0.5B-Instruct",
            "data.train_files": ["hdfs://cluster/data/train.parquet"]
        })
    assert validate_config(cfg) == []


def test_dynamic_bsz_needs_no_micro_batch(base_cfg):
    cfg = _with(
        base_cfg, {
            "actor_rollout_ref.actor.use_dynamic_bsz": True,
            "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": 128,
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": None,
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": None,
            "critic.ppo_micro_batch_size_per_gpu": None,
            "critic.ppo_max_token_len_per_gpu": 256,
        })
    assert validate_config(cfg) == []


def test_multi_device_arithmetic_that_works(base_cfg):
    # 8 prompts x n=4 over 4 ranks; mini 4 prompts -> 16 rows -> 4 per rank; micro 2 per GPU
    cfg = _with(base_cfg, _grpo(**{"actor_rollout_ref.rollout.n": 4, "trainer.n_gpus_per_node": 4}))
    assert validate_config(cfg) == []


def test_deprecated_global_micro_batch_warns(base_cfg):
    cfg = _with(
        base_cfg, {
            "trainer.n_gpus_per_node": 2,
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": None,
            "actor_rollout_ref.actor.ppo_micro_batch_size": 4
        })
    with pytest.warns(ConfigWarning, match="deprecated"):
        validate_config(cfg)


def test_kl_twice_warns(base_cfg):
    cfg = _with(base_cfg, {"algorithm.use_kl_in_reward": True, "actor_rollout_ref.actor.use_kl_loss": True})
    with pytest.warns(ConfigWarning, match="penalised twice"):
        found = validate_config(cfg)
    assert any("use_kl_in_reward" in w for w in found)


def test_unused_critic_warns(base_cfg):
    cfg = _with(base_cfg, _grpo(**{"critic.enable": True}))
    with pytest.warns(ConfigWarning, match="critic"):
        found = validate_config(cfg)
    assert len(found) == 1


def test_loss_agg_modes_match_core_algos():
    from verl.trainer.ppo.core_algos import LOSS_AGG_MODES
    from verl.utils.config import LOSS_AGG_MODES as checked

    assert tuple(checked) == tuple(LOSS_AGG_MODES)


def test_sglang_sampling_names_are_checked_on_the_driver(base_cfg):
    """A parameter SGLang calls differently fails in validate_config (no SGLang needed), naming the key."""
    cluster = {"ray_kwargs.ray_init.address": "10.0.0.1:6379"}  # a remote cluster: a missing package only warns
    good = _with(base_cfg, {"actor_rollout_ref.rollout.name": "sglang", **cluster})
    validate_config(good, check_paths=False)
    bad = copy.deepcopy(good)
    OmegaConf.update(bad, "actor_rollout_ref.rollout.min_tokens", 4, force_add=True)  # +key=value on the CLI
    with pytest.raises(ConfigError, match=r"actor_rollout_ref\.rollout\.min_tokens: .*min_new_tokens"):
        validate_config(bad, check_paths=False)
