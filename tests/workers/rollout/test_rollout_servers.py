"""Server-mode rollouts through :mod:`verl.workers.rollout.server_adapters`, with the real HF rollout server process:

* a weight push over HTTP (colocated) and through a directory (disaggregated) both change what the server generates,
  to the same tokens for the same weights;
* a server killed while ``AgentLoopManager.generate_sequences`` runs gives a ``RolloutServerError`` naming the
  server and the end of its log, quickly (no hang), both for a server the manager launched (``ServerProcess``) and
  for one a worker launched (``ServerRef``: pid and log path, as the trainer's worker group reports them);
* ``rollout.placement`` / ``server_address`` / ``server_weights_dir`` are validated on the driver, naming the key.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from verl.experimental.agent_loop import AgentLoopManager
from verl.models.tiny import get_tiny_model_path
from verl.protocol import DataProto
from verl.utils.config import ConfigError, _check_rollout_placement
from verl.workers.config_helpers import load_tokenizer
from verl.workers.rollout.async_server import RolloutServerError, ServerRef
from verl.workers.rollout.server_adapters import HFServer, launch_rollout_server, push_weight_buckets

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model_path():
    return get_tiny_model_path()


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return load_tokenizer(model_path)


def _config(model_path, response_length=16, **rollout):
    return OmegaConf.create({
        "actor_rollout_ref": {
            "model": {
                "path": model_path
            },
            "rollout":
                dict(
                    {
                        "name": "hf",
                        "mode": "async",
                        "prompt_length": 32,
                        "response_length": response_length,
                        "temperature": 1.0,
                        "top_p": 1.0,
                        "top_k": -1,
                        "do_sample": True,
                        "calculate_log_probs": True,
                        "val_kwargs": {
                            "temperature": 0,
                            "do_sample": False
                        },
                        "agent": {
                            "default_agent_loop": "single_turn_agent"
                        },
                    }, **rollout)
        }
    })


def _prompts(tokenizer, texts):
    rows = [tokenizer.encode(t, add_special_tokens=False)[-32:] for t in texts]
    ids = torch.full((len(rows), 32), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, 32 - len(r):] = torch.tensor(r)
        mask[i, 32 - len(r):] = 1
    raw = np.empty(len(rows), dtype=object)
    raw[:] = [list(r) for r in rows]
    return DataProto.from_dict(tensors={
        "input_ids": ids,
        "attention_mask": mask
    },
                               non_tensors={"raw_prompt_ids": raw},
                               meta_info={"validate": True})


TEXTS = ["What is 3 plus 4?", "Hello there", "A train travels 60 miles.", "Let x = 7."]


@pytest.fixture(scope="module")
def server(model_path):
    server = launch_rollout_server("hf", _config(model_path).actor_rollout_ref.rollout, model_path)
    yield server
    server.stop()


def _perturbed_buckets(model_path, seed):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    items = list(model.state_dict().items())
    return [items[i:i + 5] for i in range(0, len(items), 5)]


def test_weight_push_by_tensor_and_by_disk_change_outputs_the_same_way(server, model_path, tokenizer, tmp_path):
    assert isinstance(server, HFServer) and server.api == "sglang" and server.info()["pid"] == server.process.pid
    manager = AgentLoopManager(_config(model_path), [server.address], tokenizer=tokenizer)
    before = manager.generate_sequences(_prompts(tokenizer, TEXTS)).batch["responses"]

    stats = push_weight_buckets([server], _perturbed_buckets(model_path, 1), mode="tensor")
    assert stats["buckets"] > 1 and stats["bytes"] > 0 and stats["weight_version"] >= 1
    by_tensor = manager.generate_sequences(_prompts(tokenizer, TEXTS)).batch["responses"]
    assert not torch.equal(before, by_tensor)

    push_weight_buckets([server], _perturbed_buckets(model_path, 2), mode="tensor")  # something else in between
    sync_dir = str(tmp_path / "weights")
    stats = push_weight_buckets([server],
                                _perturbed_buckets(model_path, 1),
                                mode="disk",
                                sync_dir=sync_dir,
                                model_path=model_path)
    assert os.path.exists(os.path.join(sync_dir, "config.json"))
    assert os.path.exists(os.path.join(sync_dir, "model.safetensors.index.json"))
    by_disk = manager.generate_sequences(_prompts(tokenizer, TEXTS)).batch["responses"]
    assert torch.equal(by_disk, by_tensor)
    with pytest.raises(ValueError, match="server_weights_dir"):
        push_weight_buckets([server], [], mode="disk")


def _run_and_kill(manager, prompts, kill):
    errors: list[BaseException] = []

    def target():
        try:
            manager.generate_sequences(prompts)
        except BaseException as exc:  # noqa: BLE001 - examined by the caller
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    thread.start()
    time.sleep(1.5)
    assert thread.is_alive(), "the rollout finished before the server could be killed; make it longer"
    kill()
    thread.join(timeout=60)
    assert not thread.is_alive(), "generate_sequences hangs after its server died"
    assert time.monotonic() - start < 60
    assert len(errors) == 1 and isinstance(errors[0], RolloutServerError), errors
    return str(errors[0])


def _long_batch(tokenizer):
    prompts = _prompts(tokenizer, TEXTS * 16)  # 64 rows x up to 256 tokens: many seconds on the tiny model
    prompts.meta_info = {"temperature": 1.0}
    return prompts


def test_server_killed_mid_rollout_is_a_clear_error(model_path, tokenizer):
    config = _config(model_path, response_length=256)
    server = launch_rollout_server("hf", config.actor_rollout_ref.rollout, model_path)
    info = server.info()
    try:
        config.actor_rollout_ref.rollout.ignore_eos = True
        manager = AgentLoopManager(config, [server.address], tokenizer=tokenizer, server_processes=[server.process])
        message = _run_and_kill(manager, _long_batch(tokenizer), server.process.popen.kill)
    finally:
        server.stop()
    assert server.address.split("//")[1] in message
    assert "exited with code -9" in message and f"last lines of {info['log_path']}" in message
    assert f"serving on 127.0.0.1:{info['address'].rsplit(':', 1)[1]}" in message  # the log's tail is quoted


def test_worker_launched_server_killed_mid_rollout_names_pid_and_log(server, model_path, tokenizer):
    """The trainer's path: the manager knows the server only from the worker group's get_rollout_server_info().
    (Kills the module's server: keep this the last test that uses it.)"""
    import socket

    config = _config(model_path, response_length=256, ignore_eos=True)
    info = server.info()

    class WorkerGroupStandIn:  # what RayWorkerGroup returns for the ONE_TO_ALL methods of two ranks

        def get_rollout_server_info(self):
            return [dict(server.info(), hostname=socket.gethostname()), None]

        def get_rollout_server_addresses(self):
            return [server.address, None]

    try:
        manager = AgentLoopManager(config, tokenizer=tokenizer, worker_group=WorkerGroupStandIn())
        assert isinstance(manager.server_processes[0], ServerRef) and manager.server_apis == ["sglang"]

        def kill():
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.popen.wait(timeout=10)  # reap it (the worker, its parent, would)

        message = _run_and_kill(manager, _long_batch(tokenizer), kill)
    finally:
        server.stop()
    assert server.address.split("//")[1] in message
    assert f"pid {info['pid']}" in message and f"is gone; last lines of {info['log_path']}" in message
    assert "serving on" in message


@pytest.mark.parametrize("rollout,key", [
    ({
        "mode": "async",
        "placement": "nearby"
    }, "placement"),
    ({
        "mode": "async",
        "placement": "colocated",
        "server_address": "http://10.0.0.2:30000"
    }, "server_address"),
    ({
        "mode": "async",
        "placement": "disaggregated",
        "server_address": "10.0.0.2"
    }, "server_address"),
    ({
        "mode": "async",
        "placement": "colocated",
        "server_weights_dir": "/shared/w"
    }, "server_weights_dir"),
    ({
        "mode": "sync",
        "placement": "disaggregated"
    }, "placement"),
    ({
        "mode": "async",
        "placement": "disaggregated",
        "server_launch_timeout_s": 0
    }, "server_launch_timeout_s"),
])
def test_placement_config_errors_name_the_key(rollout, key):
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": rollout}})
    with pytest.raises(ConfigError, match=f"actor_rollout_ref.rollout.{key}"):
        _check_rollout_placement(config, rollout["mode"])


@pytest.mark.parametrize("rollout", [
    {
        "mode": "async",
        "placement": "colocated"
    },
    {
        "mode": "async",
        "placement": "disaggregated"
    },
    {
        "mode": "async",
        "placement": "disaggregated",
        "server_address": "http://10.0.0.2:30000",
        "server_weights_dir": "/shared/w"
    },
    {
        "mode": "sync"
    },
])
def test_placement_configs_that_work(rollout):
    _check_rollout_placement(OmegaConf.create({"actor_rollout_ref": {"rollout": rollout}}), rollout["mode"])
