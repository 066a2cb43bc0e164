"""``rollout.mode=async`` with ``rollout.name=vllm``: vLLM's real OpenAI-compatible server (``python -m
vllm.entrypoints.openai.api_server``, CPU build, float32) launched on 127.0.0.1 by
:func:`verl.workers.rollout.server_adapters.launch_rollout_server`, one server for the module, driven by the agent
loop through ``/v1/completions`` (token ids in and out):

* single-turn greedy rollouts equal the HF model's tokens, with log-probs, in the rollout schema;
* the tool agent loop with the calculator tool (scripted first turn, later turns sampled by the server);
* weight updates through our worker extension (``/collective_rpc``): over HTTP and from a directory, each changes
  the outputs to exactly the updated HF model's;
* a killed server gives a ``RolloutServerError`` naming it and its log.

Needs vLLM (``bash scripts/ci/setup_vllm_env.sh .venv-vllm``); skipped without it.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip(
        "vLLM is not installed; run tests/workers/rollout/vllm in the vLLM venv "
        "(bash scripts/ci/setup_vllm_env.sh .venv-vllm)",
        allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import server_agent_loop_cases as cases  # noqa: E402
from verl.models.tiny import get_tiny_model_path  # noqa: E402
from verl.workers.rollout.async_server import RolloutServerError  # noqa: E402
from verl.workers.rollout.server_adapters import VLLMServer, launch_rollout_server, vllm_server_cli_args  # noqa: E402

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def tiny_path():
    return get_tiny_model_path()


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def hf_model(tiny_path):
    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(tiny_path):
    config = cases.trainer_config(tiny_path, cases.rollout_node("vllm")).actor_rollout_ref.rollout
    server = launch_rollout_server("vllm", config, tiny_path, on_gpu=False, timeout_s=400)
    yield server
    server.stop()


def test_server_flags_come_from_the_rollout_config(tiny_path):
    node = cases.rollout_node("vllm", max_num_seqs=8, enable_prefix_caching=False)
    node["engine_kwargs"]["vllm"] = {"max_logprobs": 3}
    args = vllm_server_cli_args(cases.trainer_config(tiny_path, node).actor_rollout_ref.rollout, tiny_path, False)
    pairs = dict(zip(args, args[1:]))
    assert pairs["--model"] == tiny_path and pairs["--dtype"] == "float32" and pairs["--max-model-len"] == "512"
    assert pairs["--max-num-seqs"] == "8" and pairs["--max-logprobs"] == "3"
    assert pairs["--logprobs-mode"] == "processed_logprobs" and "--kv-cache-memory-bytes" in pairs
    assert "--no-enable-prefix-caching" in args and "--enforce-eager" in args
    assert pairs["--worker-extension-cls"].endswith("vllm_server.WeightSyncExtension")


def test_single_turn_agent_loop_equals_hf(server, tokenizer, tiny_path, hf_model):
    assert isinstance(server, VLLMServer) and server.api == "openai"
    cases.check_single_turn(server, tokenizer, tiny_path, hf_model)


def test_tool_agent_loop_with_calculator(server, tokenizer, tiny_path, tmp_path):
    cases.check_tool_agent(server, tokenizer, tiny_path, str(tmp_path))


def test_weight_updates_change_outputs(server, tokenizer, tiny_path, hf_model, tmp_path):
    cases.check_weight_updates(server, tokenizer, tiny_path, hf_model, str(tmp_path))


def test_killed_server_is_a_clear_error(server, tokenizer, tiny_path):
    """Last: it kills the module's server."""
    manager = cases.AgentLoopManager(cases.trainer_config(tiny_path, cases.rollout_node("vllm")), [server.address],
                                     tokenizer=tokenizer,
                                     server_processes=[server.process])
    log_path = server.process.log_path
    server.process.popen.kill()
    server.process.popen.wait(timeout=30)
    with pytest.raises(RolloutServerError) as info:
        manager.generate_sequences(cases.prompt_batch(tokenizer))
    message = str(info.value)
    assert server.address in message and "exited with code -9" in message and f"last lines of {log_path}" in message
