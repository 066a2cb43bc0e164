"""SGLangRollout through the HTTP server engine: a real SGLang server process launched on 127.0.0.1 (CPU, float32,
dummy weights), driven with the same methods as the offline engine.

* after a sync over HTTP (``update_weights_from_tensor``, CPU tensors pickled into the request), greedy generation
  equals the HF rollout's;
* after the actor's weights change, the server generates what the updated HF model generates, through each
  weight-update endpoint: ``update_weights_from_tensor``, ``update_weights_from_disk`` and
  ``update_weights_from_distributed`` (a gloo group between this process and the server's scheduler);
* a second rollout given the running server's address (as a trainer would use a server started elsewhere) gets the
  same results, and leaves the server running when shut down;
* killing the server in the middle of a request gives an ``SGLangServerError`` naming the server, the request and
  the exit code, instead of a hang or a bare socket error.
"""
from __future__ import annotations

import importlib.util
import threading
import time

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip(
        "SGLang is not installed; run tests/workers/rollout/sglang in the SGLang venv "
        "(bash scripts/ci/setup_sglang_env.sh .venv-sglang)",
        allow_module_level=True)

import torch  # noqa: E402

from verl.workers.rollout import ROLLOUT_OUTPUT_KEYS  # noqa: E402
from verl.workers.rollout.sglang_rollout import HttpServerEngine, SGLangRollout, SGLangServerError  # noqa: E402
from verl.workers.sharding_manager.fsdp_sglang import FSDPSGLangShardingManager  # noqa: E402

BUCKET = 1 << 20


@pytest.fixture(scope="module")
def actor(load_hf):
    return load_hf()


@pytest.fixture(scope="module")
def rollout(tiny_path, rollout_config, tokenizer):
    config = rollout_config(http_server={"enable": True, "launch_timeout_s": 600})
    r = SGLangRollout(tiny_path, config, tokenizer=tokenizer, load_format="dummy")
    yield r
    r.shutdown()


def _assert_same(out, ref):
    for key in ROLLOUT_OUTPUT_KEYS:
        assert torch.equal(out.batch[key], ref.batch[key]), f"{key} differs"


def test_launched_server_is_local_and_healthy(rollout):
    engine = rollout.engine
    assert isinstance(engine, HttpServerEngine) and engine.launched and engine.is_local
    assert engine.address.startswith("http://127.0.0.1:")
    assert rollout.context_length == 64  # from rollout.max_model_len, as the server reports it


def test_greedy_after_sync_equals_hf_rollout(actor, rollout, make_prompts, hf_generate):
    prompts = make_prompts(do_sample=False)
    manager = FSDPSGLangShardingManager(actor, rollout.engine, bucket_bytes=BUCKET)
    with manager:
        out = rollout.generate_sequences(prompts)
    assert manager.metrics["perf/weight_sync_buckets"] > 1
    _assert_same(out, hf_generate(actor, prompts))


@pytest.mark.parametrize("mode,seed", [("tensor", 11), ("disk", 12), ("distributed", 13)])
def test_server_follows_actor_updates(actor, rollout, make_prompts, hf_generate, perturb, tmp_path, mode, seed):
    prompts = make_prompts(do_sample=False)
    before = hf_generate(actor, prompts)
    perturb(actor, seed)
    ref = hf_generate(actor, prompts)
    assert not torch.equal(ref.batch["responses"], before.batch["responses"])  # the update matters
    with FSDPSGLangShardingManager(actor,
                                   rollout.engine,
                                   bucket_bytes=BUCKET,
                                   weight_sync=mode,
                                   sync_dir=str(tmp_path / "weights"),
                                   model_path=rollout.model_path):
        out = rollout.generate_sequences(prompts)
    _assert_same(out, ref)


def test_existing_server_by_address(actor, rollout, tiny_path, rollout_config, tokenizer, make_prompts, hf_generate):
    config = rollout_config(http_server={"enable": True, "address": rollout.engine.address})
    other = SGLangRollout(tiny_path, config, tokenizer=tokenizer)
    assert not other.engine.launched
    prompts = make_prompts(do_sample=False, calculate_log_probs=True)
    out = other.generate_sequences(prompts)
    _assert_same(out, hf_generate(actor, prompts))  # the actor's weights, synced by the previous test
    assert out.batch["rollout_log_probs"].shape == out.batch["responses"].shape
    other.shutdown()
    assert rollout.engine._process.exit_code() is None  # not ours to stop


def test_server_killed_mid_request_is_a_clear_error(rollout, make_prompts):
    # a long request: 8 prompts x 64 samples of up to 48 tokens (clamped to the 64-token context)
    prompts = make_prompts(n=64, response_length=48)
    errors: list[BaseException] = []

    def generate():
        try:
            rollout.generate_sequences(prompts)
        except BaseException as exc:  # noqa: BLE001 - examined below
            errors.append(exc)

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive(), "the request finished before the server could be killed; make it longer"
    rollout.engine._process.popen.kill()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the client hangs after the server died"
    assert len(errors) == 1 and isinstance(errors[0], SGLangServerError), errors
    message = str(errors[0])
    assert rollout.engine.address in message and "/generate" in message and "exited with code -9" in message
