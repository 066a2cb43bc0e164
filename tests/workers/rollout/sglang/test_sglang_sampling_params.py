"""The mapping from ``actor_rollout_ref.rollout`` to SGLang's sampling parameters and server arguments (no SGLang
needed: the driver validates configs before any worker starts).

* our keys map to SGLang's names (``response_length`` -> ``max_new_tokens`` per request, greedy ->
  ``temperature=0``, ``top_k`` off -> ``-1``, EOS ids -> ``stop_token_ids``); ``val_kwargs`` and ``meta_info``
  overrides act as for the HF rollout;
* an unsupported or renamed parameter, a typo, a text-based parameter while the tokenizer is skipped, and an unknown
  ``engine_kwargs.sglang`` key are config errors naming the key and the fix;
* engine arguments on CPU and GPU.
"""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from verl.utils.config import ConfigError
from verl.workers.rollout.sglang_rollout.sampling import (CPU_DEFAULT_MAX_TOTAL_TOKENS, SGLANG_SAMPLING_PARAMS,
                                                          UNSUPPORTED_SAMPLING_PARAMS, engine_kwargs_from_config,
                                                          resolve_sampling, validate_sglang_rollout_config)

R = "actor_rollout_ref.rollout"


def test_our_keys_map_to_sglang_names(rollout_config):
    config = rollout_config(temperature=0.7, top_p=0.9, top_k=20, response_length=16)
    s = resolve_sampling(config, {}, eos_token_id=[2], pad_token_id=0)
    assert s.params == {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "ignore_eos": False, "stop_token_ids": [2]}
    assert s.request_params(5)["max_new_tokens"] == 5
    assert (s.response_length, s.n, s.return_logprob, s.eos_token_id, s.pad_token_id) == (16, 1, False, [2], 0)


def test_greedy_validation_and_meta_overrides(rollout_config):
    config = rollout_config(temperature=0.7, top_p=0.9, top_k=20, calculate_log_probs=True)
    greedy = resolve_sampling(config, {"do_sample": False}, [2], 0)
    assert (greedy.params["temperature"], greedy.params["top_p"], greedy.params["top_k"]) == (0.0, 1.0, -1)
    val = resolve_sampling(config, {"validate": True}, [2], 0)
    assert val.params["temperature"] == 0.0 and val.return_logprob
    config.val_kwargs.do_sample, config.val_kwargs.temperature, config.val_kwargs.top_p = True, 0.5, 0.8
    val = resolve_sampling(config, {"validate": True, "n": 3, "response_length": 4}, [2], 0)
    assert (val.params["temperature"], val.params["top_p"], val.n, val.response_length) == (0.5, 0.8, 3, 4)
    no_eos = resolve_sampling(rollout_config(ignore_eos=True), {}, [2], 0)
    assert no_eos.params["ignore_eos"] and "stop_token_ids" not in no_eos.params and no_eos.eos_token_id == []
    assert resolve_sampling(rollout_config(top_k=0), {}, [2], 0).params["top_k"] == -1


def test_extra_sglang_parameters_pass_through(rollout_config):
    config = rollout_config(repetition_penalty=1.1, min_p=0.05, stop_token_ids=[7])
    s = resolve_sampling(config, {}, [2], 0)
    assert s.params["repetition_penalty"] == 1.1 and s.params["min_p"] == 0.05
    assert s.params["stop_token_ids"] == [2, 7]
    validate_sglang_rollout_config(config)


@pytest.mark.parametrize("key,value,fix", [
    ("include_stop_str_in_output", True, "remove the key"),
    ("max_tokens", 32, "response_length"),
    ("min_tokens", 4, "min_new_tokens"),
    ("logprobs", 1, "calculate_log_probs=True"),
    ("best_of", 2, "best_of"),
    ("max_new_tokens", 8, "response_length"),
    ("temprature", 0.5, "correct the name"),
])
def test_unsupported_parameter_is_a_config_error_naming_it(rollout_config, key, value, fix):
    config = rollout_config(**{key: value})
    with pytest.raises(ConfigError, match=rf"{R}\.{key}: .*Fix: .*{fix}") as info:
        validate_sglang_rollout_config(config)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=key):
        resolve_sampling(config, {}, [2], 0)


def test_text_parameters_need_the_tokenizer(rollout_config):
    config = rollout_config(stop=["\n\n"])
    with pytest.raises(ConfigError, match=r"stop: .*tokenizer.*skip_tokenizer_init=False"):
        resolve_sampling(config, {}, [2], 0)
    assert resolve_sampling(config, {}, [2], 0, allow_tokenizer_params=True).params["stop"] == ["\n\n"]
    validate_sglang_rollout_config(config)  # the engine is then started with its tokenizer
    assert engine_kwargs_from_config(config, "/m", on_gpu=False,
                                     server_arg_names=_NAMES)["skip_tokenizer_init"] is False
    config.engine_kwargs.sglang.skip_tokenizer_init = True
    with pytest.raises(ConfigError, match="stop"):
        validate_sglang_rollout_config(config)


_NAMES = {
    "model_path", "tp_size", "random_seed", "skip_tokenizer_init", "log_level", "context_length",
    "max_running_requests", "disable_radix_cache", "chunked_prefill_size", "dtype", "mem_fraction_static",
    "disable_cuda_graph", "enable_memory_saver", "device", "attention_backend", "max_total_tokens", "load_format",
    "trust_remote_code"
}


def test_engine_kwargs_cpu_and_gpu(rollout_config):
    config = rollout_config(max_num_seqs=128,
                            max_num_batched_tokens=4096,
                            enable_prefix_caching=False,
                            dtype="bf16",
                            gpu_memory_utilization=0.6,
                            enforce_eager=True)
    cpu = engine_kwargs_from_config(config,
                                    "/m",
                                    on_gpu=False,
                                    load_format="dummy",
                                    seed_offset=3,
                                    server_arg_names=_NAMES)
    assert cpu["device"] == "cpu" and cpu["dtype"] == "float32" and cpu["attention_backend"] == "torch_native"
    assert cpu["max_total_tokens"] == CPU_DEFAULT_MAX_TOTAL_TOKENS and cpu["disable_cuda_graph"]
    assert (cpu["context_length"], cpu["max_running_requests"], cpu["chunked_prefill_size"]) == (64, 128, 4096)
    assert cpu["disable_radix_cache"] and cpu["random_seed"] == 3 and cpu["load_format"] == "dummy"
    assert cpu["skip_tokenizer_init"] is True
    legacy = engine_kwargs_from_config(config, "/m", on_gpu=False, load_format="dummy_dtensor", server_arg_names=_NAMES)
    assert legacy["load_format"] == "dummy"  # verl's dummy_* formats
    gpu = engine_kwargs_from_config(config, "/m", on_gpu=True, server_arg_names=_NAMES)
    assert (gpu["dtype"], gpu["mem_fraction_static"], gpu["disable_cuda_graph"]) == ("bfloat16", 0.6, True)
    assert gpu["enable_memory_saver"] and "device" not in gpu
    config.engine_kwargs.sglang.attention_backend = "flashinfer"
    config.engine_kwargs.sglang.max_total_tokens = 1000
    gpu = engine_kwargs_from_config(config, "/m", on_gpu=True, server_arg_names=_NAMES)
    assert gpu["attention_backend"] == "flashinfer" and gpu["max_total_tokens"] == 1000
    with pytest.raises(ConfigError, match="tensor_model_parallel_size.*GPUs"):
        engine_kwargs_from_config(rollout_config(tensor_model_parallel_size=2),
                                  "/m",
                                  on_gpu=False,
                                  server_arg_names=_NAMES)


def test_unknown_engine_kwarg_is_a_config_error(rollout_config):
    config = rollout_config()
    config.engine_kwargs.sglang = OmegaConf.create({"attention_backed": "triton"})
    with pytest.raises(ConfigError, match=r"engine_kwargs\.sglang\.attention_backed: not an SGLang server argument"):
        engine_kwargs_from_config(config, "/m", on_gpu=True, server_arg_names=_NAMES)


def test_the_unsupported_list_names_no_sglang_parameter():
    assert not set(UNSUPPORTED_SAMPLING_PARAMS) & SGLANG_SAMPLING_PARAMS
