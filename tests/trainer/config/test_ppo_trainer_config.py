"""ppo_trainer.yaml composes with Hydra and accepts, without `+`, every key verl's example recipes override."""
from __future__ import annotations

import os
import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import verl

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")

# verl-map 11.2: override keys used across upstream's examples/**/*.sh (counts in parentheses are dropped;
# `.*` wildcards are Megatron / generative-RM subtrees covered by other configs and are skipped).
OVERRIDE_KEYS_TEXT = """
Universal: `trainer.{project_name, experiment_name, logger}` (137), `data.{train_files (137), val_files,
train_batch_size, max_prompt_length, max_response_length, truncation, filter_overlong_prompts}`,
`algorithm.adv_estimator` (127), `actor_rollout_ref.model.path` (127), `actor_rollout_ref.rollout.name` (127),
`actor_rollout_ref.actor.{ppo_mini_batch_size, optim.lr, use_kl_loss}` (126-127),
`trainer.{total_epochs, nnodes, n_gpus_per_node, save_freq, test_freq}`,
`actor_rollout_ref.rollout.{tensor_model_parallel_size, gpu_memory_utilization}` (125),
`algorithm.use_kl_in_reward` (120), `trainer.critic_warmup` (110).
Very common: `actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu` (102), `actor_rollout_ref.rollout.n` (101),
`actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu` (99), `actor_rollout_ref.model.enable_gradient_checkpointing`
(98), `actor_rollout_ref.actor.kl_loss_coef` (95), `actor_rollout_ref.actor.fsdp_config.{param_offload,optimizer_offload}`
(90+), `actor_rollout_ref.model.use_remove_padding` (91), `actor_rollout_ref.actor.entropy_coeff` (91),
`actor_rollout_ref.actor.kl_loss_type` (81), `actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu` (74),
`actor_rollout_ref.ref.fsdp_config.param_offload` (71).
Common: `trainer.val_before_train`, `actor_rollout_ref.actor.{use_dynamic_bsz, ppo_max_token_len_per_gpu,
ulysses_sequence_parallel_size, clip_ratio_low, clip_ratio_high, clip_ratio_c, loss_agg_mode, policy_loss.loss_mode,
use_torch_compile, grad_clip, optim.{weight_decay, lr_warmup_steps, lr_warmup_steps_ratio, clip_grad},
checkpoint.save_contents, entropy_checkpointing, fsdp_config.fsdp_size, megatron.*}`,
`actor_rollout_ref.rollout.{enable_chunked_prefill, log_prob_max_token_len_per_gpu, log_prob_use_dynamic_bsz, mode,
max_num_batched_tokens, enforce_eager, free_cache_engine, max_num_seqs, load_format, max_model_len, layered_summon,
temperature, top_p, top_k, calculate_log_probs, multi_stage_wake_up, data_parallel_size, expert_parallel_size,
over_sample_rate, val_kwargs.{temperature, top_p, top_k, n, do_sample}, multi_turn.{tool_config_path,
interaction_config_path, max_user_turns, format}}`, `actor_rollout_ref.ref.{log_prob_max_token_len_per_gpu,
log_prob_use_dynamic_bsz, ulysses_sequence_parallel_size, megatron.*}`, `actor_rollout_ref.model.{use_fused_kernels,
lora_rank, lora_alpha, target_modules, use_shm, trust_remote_code}`, `actor_rollout_ref.nccl_timeout`,
`data.{return_raw_chat, prompt_key, shuffle, image_key, val_batch_size, trust_remote_code}`,
`critic.{optim.lr, model.path, model.use_remove_padding, model.enable_gradient_checkpointing,
model.fsdp_config.{param,optimizer}_offload, ppo_micro_batch_size_per_gpu, ppo_max_token_len_per_gpu,
use_dynamic_bsz, ulysses_sequence_parallel_size, forward_max_token_len_per_gpu}`,
`algorithm.{kl_ctrl.kl_coef, gamma, kl_penalty, rollout_correction.rollout_is_threshold}`,
`reward_model.{reward_manager, enable, model.path, use_reward_loop, num_workers, micro_batch_size_per_gpu,
rollout.*}`, `custom_reward_function.{path, name}`, `trainer.{default_local_dir, total_training_steps,
resume_mode, log_val_generations, balance_batch, use_legacy_worker_impl}`, `global_profiler.{tool, steps, save_path}`.
"""

# keys the brief of this project adds on top of the recipe list
EXTRA_KEYS = [
    "actor_rollout_ref.hybrid_engine", "actor_rollout_ref.actor.fsdp_config.param_offload",
    "actor_rollout_ref.actor.optim.total_training_steps", "actor_rollout_ref.actor.checkpoint.load_contents",
    "actor_rollout_ref.rollout.engine_kwargs.vllm", "actor_rollout_ref.rollout.engine_kwargs.sglang",
    "actor_rollout_ref.rollout.multi_turn.enable", "actor_rollout_ref.rollout.agent.num_workers",
    "custom_reward_function.reward_kwargs", "algorithm.norm_adv_by_std_in_grpo", "algorithm.kl_ctrl.type",
    "algorithm.kl_ctrl.horizon", "algorithm.kl_ctrl.target_kl", "algorithm.lam", "trainer.resume_from_path",
    "trainer.max_actor_ckpt_to_keep", "trainer.max_critic_ckpt_to_keep", "trainer.rollout_data_dir",
    "trainer.validation_data_dir", "trainer.device", "ray_init.num_cpus", "ray_init.address",
    "ray_kwargs.ray_init.num_cpus", "reward_model.reward_kwargs", "critic.enable", "critic.cliprange_value"
]


def _expand(pattern: str) -> list[str]:
    """Expand `a.{b, c.{d,e}_f}` into ['a.b', 'a.c.d_f', 'a.c.e_f']."""
    start = pattern.find("{")
    if start < 0:
        return [pattern.strip()]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    inner, alternatives, level, current = pattern[start + 1:end], [], 0, ""
    for ch in inner:
        if ch == "," and level == 0:
            alternatives.append(current)
            current = ""
            continue
        level += {"{": 1, "}": -1}.get(ch, 0)
        current += ch
    alternatives.append(current)
    out = []
    for alt in alternatives:
        out.extend(_expand(pattern[:start] + alt.strip() + pattern[end + 1:]))
    return out


def parse_override_keys(text: str) -> list[str]:
    keys = []
    for chunk in re.findall(r"`([^`]*)`", text):
        chunk = re.sub(r"\s*\(\d+\)", "", chunk.replace("\n", " "))
        for key in _expand(chunk):
            key = re.sub(r"\s+", "", key)
            if not key.endswith(".*") and key not in keys:
                keys.append(key)
    return keys


OVERRIDE_KEYS = parse_override_keys(OVERRIDE_KEYS_TEXT)


def _compose(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides or [])


def test_parser_expands_nested_braces():
    assert _expand("critic.{a, model.fsdp_config.{param,optimizer}_offload}") == [
        "critic.a", "critic.model.fsdp_config.param_offload", "critic.model.fsdp_config.optimizer_offload"
    ]
    assert len(OVERRIDE_KEYS) > 120
    assert "actor_rollout_ref.rollout.val_kwargs.do_sample" in OVERRIDE_KEYS
    assert "critic.model.fsdp_config.optimizer_offload" in OVERRIDE_KEYS
    assert not any("*" in k or "(" in k or " " in k for k in OVERRIDE_KEYS)


def test_config_composes_and_fully_resolves():
    cfg = _compose()
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert container["actor_rollout_ref"]["rollout"]["name"] == "hf"
    assert container["algorithm"]["adv_estimator"] == "gae"
    assert container["trainer"]["default_local_dir"] == "checkpoints/verl_examples/gsm8k"
    # runtime-filled defaults stay null
    assert container["data"]["train_files"] is None and container["actor_rollout_ref"]["model"]["path"] is None
    assert OmegaConf.is_struct(cfg)  # unknown keys need `+`


@pytest.fixture(scope="module")
def default_cfg():
    return _compose()


@pytest.mark.parametrize("key", OVERRIDE_KEYS + EXTRA_KEYS)
def test_every_recipe_key_exists(default_cfg, key):
    assert OmegaConf.select(default_cfg, key, default="<absent>", throw_on_missing=False) != "<absent>", key


def test_all_recipe_overrides_compose_without_plus():
    overrides, expected = [], {}
    for i, key in enumerate(OVERRIDE_KEYS):
        value = f"v{i}"
        overrides.append(f"{key}={value}")
        expected[key] = value
    cfg = _compose(overrides)
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value, key


def test_unknown_key_needs_plus_and_plus_keys_from_recipes_work():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _compose(["actor_rollout_ref.actor.no_such_key=1"])
    cfg = _compose([
        "+actor_rollout_ref.rollout.engine_kwargs.vllm.disable_mm_preprocessor_cache=True",
        "+reward_model.reward_kwargs.overlong_buffer_cfg.len=4096",
        "+actor_rollout_ref.model.override_config.attention_dropout=0.0",
    ])
    assert cfg.actor_rollout_ref.rollout.engine_kwargs.vllm.disable_mm_preprocessor_cache is True
    assert cfg.reward_model.reward_kwargs.overlong_buffer_cfg.len == 4096


def test_list_values_from_cli():
    cfg = _compose(["data.train_files=['a.parquet','b.parquet']", "trainer.logger=['console','wandb']"])
    assert list(cfg.data.train_files) == ["a.parquet", "b.parquet"]
    assert list(cfg.trainer.logger) == ["console", "wandb"]


def test_shared_values_follow_their_source():
    cfg = _compose([
        "data.max_prompt_length=77", "data.max_response_length=33", "actor_rollout_ref.model.path=/m",
        "actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=999",
        "actor_rollout_ref.actor.ppo_mini_batch_size=7", "actor_rollout_ref.rollout.n=5",
        "actor_rollout_ref.model.use_remove_padding=True", "critic.ppo_max_token_len_per_gpu=1234",
        "trainer.project_name=p", "trainer.experiment_name=e", "ray_init.num_cpus=3"
    ])
    r = cfg.actor_rollout_ref
    assert (r.rollout.prompt_length, r.rollout.response_length) == (77, 33)
    assert r.rollout.log_prob_use_dynamic_bsz is True and r.ref.log_prob_use_dynamic_bsz is True
    assert r.rollout.log_prob_max_token_len_per_gpu == 999 and r.ref.log_prob_max_token_len_per_gpu == 999
    assert r.actor.use_remove_padding is True
    assert cfg.critic.model.path == "/m" and cfg.critic.ppo_mini_batch_size == 7 and cfg.critic.rollout_n == 5
    assert cfg.critic.use_dynamic_bsz is True and cfg.critic.forward_max_token_len_per_gpu == 1234
    assert cfg.trainer.default_local_dir == "checkpoints/p/e"
    assert cfg.ray_kwargs.ray_init.num_cpus == 3
    # an explicit override of a derived key wins
    cfg = _compose(["actor_rollout_ref.rollout.prompt_length=5"])
    assert cfg.actor_rollout_ref.rollout.prompt_length == 5 and cfg.data.max_prompt_length == 512
