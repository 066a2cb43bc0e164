"""ppo_megatron_trainer.yaml: extends ppo_trainer.yaml with the Megatron keys, validates, and main_ppo stops with one
clear line (with the pip command) when megatron-core is not installed."""
from __future__ import annotations

import os
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import verl
from verl.utils.config import ConfigError, validate_config

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
MEGATRON_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                 "context_parallel_size", "expert_model_parallel_size", "sequence_parallel", "param_offload",
                 "use_dist_checkpointing", "seed", "override_transformer_config")
TRAIN_ONLY_KEYS = ("grad_offload", "optimizer_offload", "use_distributed_optimizer", "override_ddp_config")
SMALL_RUN = [
    "algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=2", "data.train_batch_size=8",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2"
]


def _compose(name: str, overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name=name, overrides=overrides or [])


def _leaves(node, prefix=""):
    out = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        if OmegaConf.is_dict(value) and len(value):
            out |= _leaves(value, path + ".")
        else:
            out.add(path)
    return out


def test_extends_ppo_trainer_and_sets_megatron_everywhere():
    base = _compose("ppo_trainer")
    cfg = _compose("ppo_megatron_trainer")
    OmegaConf.resolve(cfg)
    assert _leaves(base) <= _leaves(cfg)  # every ppo_trainer.yaml key is still there
    assert cfg.data.train_batch_size == base.data.train_batch_size
    for key in ("actor_rollout_ref.actor.strategy", "actor_rollout_ref.ref.strategy", "critic.strategy",
                "reward_model.strategy"):
        assert OmegaConf.select(cfg, key) == "megatron", key
    for section in ("actor_rollout_ref.actor", "actor_rollout_ref.ref", "critic"):
        for key in MEGATRON_KEYS:
            assert OmegaConf.select(cfg, f"{section}.megatron.{key}", default="<absent>") != "<absent>", (section, key)
    for section in ("actor_rollout_ref.actor", "critic"):
        for key in TRAIN_ONLY_KEYS:
            assert OmegaConf.select(cfg, f"{section}.megatron.{key}", default="<absent>") != "<absent>", (section, key)


def test_reference_follows_the_actor_layout_and_transformer_overrides_take_plus_keys():
    cfg = _compose("ppo_megatron_trainer", [
        "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
        "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2",
        "+actor_rollout_ref.actor.megatron.override_transformer_config.recompute_granularity=full",
        "+actor_rollout_ref.actor.megatron.override_transformer_config.recompute_num_layers=1",
        "critic.megatron.tensor_model_parallel_size=4",
    ])
    OmegaConf.resolve(cfg)
    ref = cfg.actor_rollout_ref.ref.megatron
    assert ref.tensor_model_parallel_size == 2 and ref.pipeline_model_parallel_size == 2
    assert OmegaConf.to_container(ref.override_transformer_config) == {
        "recompute_granularity": "full",
        "recompute_num_layers": 1
    }
    assert cfg.critic.megatron.tensor_model_parallel_size == 4
    assert cfg.actor_rollout_ref.actor.megatron.virtual_pipeline_model_parallel_size is None


def test_validate_config_uses_the_megatron_data_parallel_size():
    cfg = _compose("ppo_megatron_trainer", SMALL_RUN + ["trainer.n_gpus_per_node=4", "trainer.device=cpu"])
    OmegaConf.resolve(cfg)
    validate_config(cfg, check_paths=False)  # dp = 4 devices / (tp 1 * pp 1 * cp 1)
    bad = _compose(
        "ppo_megatron_trainer", SMALL_RUN + [
            "trainer.n_gpus_per_node=4", "trainer.device=cpu",
            "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=3"
        ])
    OmegaConf.resolve(bad)
    with pytest.raises(ConfigError, match="megatron.tensor_model_parallel_size"):
        validate_config(bad, check_paths=False)


def test_context_parallelism_is_accepted_with_dp_tp_or_pp_and_refused_with_tp_and_pp_or_ep():
    """CP > 1 divides the devices like TP x PP (DP = devices / (TP x PP x CP)); it combines with TP or PP, and its
    combinations with TP and PP both > 1 or with EP are refused on the driver with the reason and the fix."""
    base = SMALL_RUN + ["trainer.device=cpu", "actor_rollout_ref.actor.megatron.context_parallel_size=2"]
    for extra in ([], ["actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2"], [
            "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2",
            "actor_rollout_ref.actor.megatron.virtual_pipeline_model_parallel_size=2"
    ]):
        cfg = _compose("ppo_megatron_trainer", base + ["trainer.n_gpus_per_node=4"] + extra)
        OmegaConf.resolve(cfg)
        validate_config(cfg, check_paths=False)  # dp = 4 / 2, or 4 / (2 x 2)
    refused = {
        "pipeline_model_parallel_size": ([
            "trainer.n_gpus_per_node=8", "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
            "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2"
        ], r"> 1 together with .*tensor_model_parallel_size=2 and .*context_parallel_size=2"),
        "expert_model_parallel_size":
            (["trainer.n_gpus_per_node=4", "actor_rollout_ref.actor.megatron.expert_model_parallel_size=2"],
             r"> 1 together with .*context_parallel_size=2"),
    }
    for part, (extra, problem) in refused.items():
        bad = _compose("ppo_megatron_trainer", base + extra)
        OmegaConf.resolve(bad)
        with pytest.raises(ConfigError, match=rf"actor_rollout_ref.actor.megatron.{part}: {problem}.*Fix: set"):
            validate_config(bad, check_paths=False)
    odd = _compose(
        "ppo_megatron_trainer", SMALL_RUN +
        ["trainer.n_gpus_per_node=4", "trainer.device=cpu", "actor_rollout_ref.actor.megatron.context_parallel_size=3"])
    OmegaConf.resolve(odd)
    with pytest.raises(ConfigError, match="tensor x pipeline x context parallel = 3 does not divide 4"):
        validate_config(odd, check_paths=False)


def test_preflight_passes_with_megatron_core_and_names_the_pip_command_without_it(monkeypatch):
    import importlib.util

    from verl.trainer import main_ppo

    cfg = _compose("ppo_megatron_trainer", SMALL_RUN + ["trainer.device=cpu"])
    OmegaConf.resolve(cfg)
    if importlib.util.find_spec("megatron.core") is not None:
        assert main_ppo._megatron_backend_problems(cfg) == []  # megatron runs on CPU too (verl.utils.megatron_cpu)
        main_ppo._preflight(cfg)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name.startswith("megatron") else real_find_spec(name, *a))
    assert main_ppo._megatron_backend_problems(cfg) == ["megatron-core is not installed"]
    with pytest.raises(ConfigError, match=r"megatron-core is not installed.*pip install megatron-core==0\.16\.1"):
        main_ppo._preflight(cfg)


def test_preflight_requires_the_critic_to_share_the_actor_megatron_layout():
    import importlib.util

    from verl.trainer import main_ppo

    if importlib.util.find_spec("megatron.core") is None:
        pytest.skip("megatron-core is not installed")
    cfg = _compose(
        "ppo_megatron_trainer", SMALL_RUN + [
            "trainer.device=cpu", "algorithm.adv_estimator=gae", "critic.megatron.tensor_model_parallel_size=2",
            "critic.ppo_micro_batch_size_per_gpu=2"
        ])
    OmegaConf.resolve(cfg)
    with pytest.raises(ConfigError, match=r"critic.megatron.tensor_model_parallel_size.*set critic.megatron"):
        main_ppo._preflight(cfg)


def test_megatron_expert_parallelism_divides_the_data_parallel_ranks():
    """EP > 1 (MoE) is accepted when it divides devices / (TP x PP); DP stays devices / (TP x PP)."""
    ok = _compose(
        "ppo_megatron_trainer", SMALL_RUN + [
            "trainer.n_gpus_per_node=4", "trainer.device=cpu",
            "actor_rollout_ref.actor.megatron.expert_model_parallel_size=2"
        ])
    OmegaConf.resolve(ok)
    validate_config(ok, check_paths=False)
    bad = _compose(
        "ppo_megatron_trainer", SMALL_RUN + [
            "trainer.n_gpus_per_node=4", "trainer.device=cpu",
            "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
            "actor_rollout_ref.actor.megatron.expert_model_parallel_size=4"
        ])
    OmegaConf.resolve(bad)
    with pytest.raises(ConfigError, match=r"megatron.expert_model_parallel_size: =4 does not divide the data-parallel"):
        validate_config(bad, check_paths=False)
