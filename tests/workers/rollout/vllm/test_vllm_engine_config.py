"""``build_engine_kwargs``: the ``actor_rollout_ref.rollout`` config (the real ``ppo_trainer.yaml`` tree) -> the
``vllm.LLM`` arguments, on CPU and, as computed for a GPU worker, on GPU; ``engine_kwargs.vllm`` wins; settings that
cannot work fail before an engine starts. Needs no vLLM (nothing here starts an engine)."""
from __future__ import annotations

import copy
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import Qwen2Config

import verl
from verl.workers.rollout.vllm_rollout.vllm_rollout_spmd import build_engine_kwargs, default_cpu_kv_cache_bytes

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
HF_CONFIG = Qwen2Config(vocab_size=640,
                        hidden_size=128,
                        intermediate_size=512,
                        num_hidden_layers=4,
                        num_attention_heads=4,
                        num_key_value_heads=2)
KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 32 * 4  # k and v, layers, kv heads, head dim, fp32


@pytest.fixture(scope="module")
def default_rollout():
    overrides = ["data.max_prompt_length=32", "data.max_response_length=16", "actor_rollout_ref.rollout.name=vllm"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    return config


def _rollout(config, **updates):
    """The resolved rollout node of the composed config, with ``updates`` (dotted keys under it) applied."""
    config = copy.deepcopy(config)
    for key, value in updates.items():
        OmegaConf.update(config, f"actor_rollout_ref.rollout.{key}", value, force_add=True)
    return OmegaConf.create(OmegaConf.to_container(config, resolve=True)).actor_rollout_ref.rollout


def test_cpu_engine_arguments_from_the_default_config(default_rollout, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    kwargs = build_engine_kwargs(_rollout(default_rollout, load_format="dummy_dtensor"), "/m", HF_CONFIG, on_gpu=False)
    assert kwargs["model"] == kwargs["tokenizer"] == "/m"
    assert kwargs["max_model_len"] == 48  # prompt + response
    assert kwargs["dtype"] == "float32"  # rollout.dtype=bfloat16 is for accelerators
    assert kwargs["load_format"] == "dummy"  # verl's old name mapped to vLLM's
    assert kwargs["enforce_eager"] is True and "enable_sleep_mode" not in kwargs
    assert kwargs["distributed_executor_backend"] == "uni" and kwargs["tensor_parallel_size"] == 1
    assert kwargs["enable_prefix_caching"] is True and kwargs["enable_chunked_prefill"] is True
    assert kwargs["max_num_batched_tokens"] == 8192 and kwargs["max_num_seqs"] == 1024
    assert kwargs["logprobs_mode"] == "processed_logprobs" and kwargs["seed"] == 0
    assert "swap_space" not in kwargs  # null engine_kwargs are not passed
    # the KV cache holds every sequence at full length (small model), at least two
    assert kwargs["kv_cache_memory_bytes"] == max(KV_BYTES_PER_TOKEN * 48 * 1024, 64 << 20)
    assert default_cpu_kv_cache_bytes(HF_CONFIG, 48, 1) >= KV_BYTES_PER_TOKEN * 48 * 2


def test_gpu_engine_arguments_mock_gpu(default_rollout):
    kwargs = build_engine_kwargs(_rollout(default_rollout, tensor_model_parallel_size=2, gpu_memory_utilization=0.6),
                                 "/m",
                                 HF_CONFIG,
                                 tokenizer_path="/tok",
                                 distributed=True,
                                 on_gpu=True)
    assert kwargs["dtype"] == "bfloat16" and kwargs["enable_sleep_mode"] is True
    assert kwargs["distributed_executor_backend"] == "external_launcher" and kwargs["tensor_parallel_size"] == 2
    assert kwargs["gpu_memory_utilization"] == 0.6 and kwargs["enforce_eager"] is False
    assert kwargs["tokenizer"] == "/tok" and "kv_cache_memory_bytes" not in kwargs


def test_engine_kwargs_win_and_kv_cache_space_env_is_respected(default_rollout, monkeypatch):
    rollout = _rollout(
        default_rollout, **{
            "engine_kwargs.vllm.kv_cache_memory_bytes": 12345678,
            "engine_kwargs.vllm.max_logprobs": 3,
            "engine_kwargs.vllm.enforce_eager": False,
            "max_model_len": 100
        })
    kwargs = build_engine_kwargs(rollout, "/m", HF_CONFIG, on_gpu=False)
    assert kwargs["kv_cache_memory_bytes"] == 12345678 and kwargs["max_logprobs"] == 3
    assert kwargs["enforce_eager"] is False and kwargs["max_model_len"] == 100
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert "kv_cache_memory_bytes" not in build_engine_kwargs(_rollout(default_rollout), "/m", HF_CONFIG, on_gpu=False)


def test_settings_that_cannot_work_are_refused(default_rollout):
    with pytest.raises(ValueError, match=r"max_model_len=40 is shorter than prompt_length \+ response_length = 48"):
        build_engine_kwargs(_rollout(default_rollout, max_model_len=40), "/m", HF_CONFIG, on_gpu=False)
    with pytest.raises(ValueError, match="enable_chunked_prefill=True or max_num_batched_tokens>=48"):
        build_engine_kwargs(_rollout(default_rollout, enable_chunked_prefill=False, max_num_batched_tokens=16),
                            "/m",
                            HF_CONFIG,
                            on_gpu=False)
    with pytest.raises(ValueError, match="prompt_length and actor_rollout_ref.rollout.response_length"):
        build_engine_kwargs({"name": "vllm"}, "/m", HF_CONFIG, on_gpu=False)
