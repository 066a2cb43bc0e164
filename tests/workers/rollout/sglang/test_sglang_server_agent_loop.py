"""``rollout.mode=async`` with ``rollout.name=sglang``: SGLang's real HTTP server (``python -m sglang.launch_server
--device cpu --attention-backend torch_native --disable-cuda-graph --dtype float32``) launched on 127.0.0.1 by
:func:`verl.workers.rollout.server_adapters.launch_rollout_server` through the rollout's ``HttpServerEngine``, one
server for the module, driven by the agent loop through ``/generate`` (token ids in and out):

* single-turn greedy rollouts equal the HF model's tokens, with log-probs, in the rollout schema;
* the tool agent loop with the calculator tool (scripted first turn, later turns sampled by the server);
* weight updates (``update_weights_from_tensor`` in a weight-update session, and ``update_weights_from_disk``) each
  change the outputs to exactly the updated HF model's;
* a killed server gives a ``RolloutServerError`` naming it and its log.

Needs SGLang (``bash scripts/ci/setup_sglang_env.sh .venv-sglang``; source its bin/activate); skipped without it.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip(
        "SGLang is not installed; run tests/workers/rollout/sglang in the SGLang venv "
        "(bash scripts/ci/setup_sglang_env.sh .venv-sglang)",
        allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import server_agent_loop_cases as cases  # noqa: E402
from verl.workers.rollout.async_server import RolloutServerError  # noqa: E402
from verl.workers.rollout.server_adapters import SGLangServer, launch_rollout_server  # noqa: E402

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def hf_model(load_hf):
    return load_hf()


@pytest.fixture(scope="module")
def server(tiny_path):
    config = cases.trainer_config(tiny_path, cases.rollout_node("sglang")).actor_rollout_ref.rollout
    server = launch_rollout_server("sglang", config, tiny_path, on_gpu=False, timeout_s=500)
    yield server
    server.stop()


def test_launched_with_the_cpu_flags(server):
    assert isinstance(server, SGLangServer) and server.api == "sglang" and server.launched
    kwargs = server.engine.engine_kwargs
    assert kwargs["device"] == "cpu" and kwargs["attention_backend"] == "torch_native"
    assert kwargs["disable_cuda_graph"] is True and kwargs["dtype"] == "float32"
    assert server.address.startswith("http://127.0.0.1:")


def test_single_turn_agent_loop_equals_hf(server, tokenizer, tiny_path, hf_model):
    cases.check_single_turn(server, tokenizer, tiny_path, hf_model)


def test_tool_agent_loop_with_calculator(server, tokenizer, tiny_path, tmp_path):
    cases.check_tool_agent(server, tokenizer, tiny_path, str(tmp_path))


def test_weight_updates_change_outputs(server, tokenizer, tiny_path, hf_model, tmp_path):
    cases.check_weight_updates(server, tokenizer, tiny_path, hf_model, str(tmp_path))


def test_killed_server_is_a_clear_error(server, tokenizer, tiny_path):
    """Last: it kills the module's server."""
    manager = cases.AgentLoopManager(cases.trainer_config(tiny_path, cases.rollout_node("sglang")), [server.address],
                                     tokenizer=tokenizer,
                                     server_processes=[server.process])
    log_path = server.process.log_path
    server.process.popen.kill()
    server.process.popen.wait(timeout=30)
    with pytest.raises(RolloutServerError) as info:
        manager.generate_sequences(cases.prompt_batch(tokenizer))
    message = str(info.value)
    assert server.address in message and "exited with code -9" in message and f"last lines of {log_path}" in message
