"""The HF fallback rollout server as a real process on 127.0.0.1: generation, weight updates, errors, death."""
import asyncio
import os
import signal
import time

import pytest
import torch

from verl.models.tiny import get_tiny_model_path
from verl.workers.rollout.async_server import (AsyncRolloutClient, RolloutServerError, get_json, launch_hf_server,
                                               post_json, push_weights)


@pytest.fixture(scope="module")
def model_path():
    return get_tiny_model_path()


@pytest.fixture(scope="module")
def server(model_path):
    process = launch_hf_server(model_path, num_threads=1)
    yield process
    process.stop()


def _generate(address, prompt, params, process=None, timeout=120.0):

    async def go():
        async with AsyncRolloutClient(address, timeout_s=timeout, process=process) as client:
            return await client.generate(prompt, params)

    return asyncio.run(go())


def test_generate_tokens_logprobs_and_n(server):
    out = _generate(server.address, [1, 5, 6, 7], {"max_new_tokens": 6, "temperature": 0})
    assert 1 <= len(out.token_ids) <= 6 and len(out.log_probs) == len(out.token_ids)
    assert all(lp <= 0 for lp in out.log_probs)
    assert out.stop_reason in ("stop", "length") and out.weight_version is not None
    # greedy is deterministic and n returns n samples
    twice = _generate(server.address, [1, 5, 6, 7], {"max_new_tokens": 6, "temperature": 0, "n": 2})
    assert [o.token_ids for o in twice] == [out.token_ids, out.token_ids]
    # ignore_eos + max_new_tokens bounds the length exactly
    sampled = _generate(server.address, [1, 5, 6, 7], {"max_new_tokens": 9, "temperature": 1.0, "ignore_eos": True})
    assert len(sampled.token_ids) == 9


def test_concurrent_requests_batch(server):

    async def go():
        async with AsyncRolloutClient(server.address, timeout_s=120) as client:
            return await asyncio.gather(*[
                client.generate([1, 5 + i, 6], {
                    "max_new_tokens": 4,
                    "temperature": 0,
                    "ignore_eos": True
                }) for i in range(8)
            ])

    outs = asyncio.run(go())
    assert [len(o.token_ids) for o in outs] == [4] * 8
    # batching with others gives the same greedy tokens as running alone
    alone = _generate(server.address, [1, 8, 6], {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert outs[3].token_ids == alone.token_ids


def test_bad_requests_are_clear_errors(server):
    with pytest.raises(RolloutServerError, match="context length"):
        _generate(server.address, [1] * 5000, {"max_new_tokens": 2})
    with pytest.raises(RolloutServerError, match="no parameters named"):
        push_weights(server.address, [[("not.a.weight", torch.zeros(2))]])
    for path in ("/flush_cache", "/release_memory_occupation", "/resume_memory_occupation"):
        assert post_json(server.address, path, {})["success"] is True


def test_weight_update_changes_outputs_and_disk_restores(server, model_path):
    prompt, params = [1, 5, 6, 7], {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}
    before = _generate(server.address, prompt, params)
    version = get_json(server.address, "/server_info")["weight_version"]
    info = get_json(server.address, "/server_info")
    vocab = 640
    hidden = 128
    up, down = [t for t in range(100, 110) if t not in before.token_ids][:2]
    # the final norm keeps only hidden unit 0, and the head maps its sign to `up` (+) or `down` (-)
    head = torch.zeros(vocab, hidden)
    head[up, 0], head[down, 0] = 1.0, -1.0
    norm = torch.zeros(hidden)
    norm[0] = 1.0
    # bucketed: two buckets of one tensor each
    stats = push_weights(server.address, [[("lm_head.weight", head)], [("model.norm.weight", norm)]])
    assert stats["buckets"] == 2 and stats["weight_version"] == version + 2
    after = _generate(server.address, prompt, params)
    assert set(after.token_ids) <= {up, down} and after.weight_version == version + 2
    assert info["context_length"] == 2048
    post_json(server.address, "/update_weights_from_disk", {"model_path": model_path})
    assert _generate(server.address, prompt, params).token_ids == before.token_ids


def test_pickled_payload_refused_without_flag(server):
    import base64
    import pickle

    blob = base64.b64encode(pickle.dumps([("lm_head.weight", torch.zeros(640, 128))])).decode()
    with pytest.raises(RolloutServerError, match="allow-pickle"):
        post_json(server.address, "/update_weights_from_tensor", {"serialized_named_tensors": [blob]})


def test_killed_server_mid_request_is_a_clear_error_not_a_hang(model_path):
    process = launch_hf_server(model_path, num_threads=1)
    try:

        async def go():
            async with AsyncRolloutClient(process.address, timeout_s=60, process=process) as client:
                tasks = [
                    asyncio.create_task(
                        client.generate([1, 5, 6], {
                            "max_new_tokens": 2000,
                            "temperature": 1.0,
                            "ignore_eos": True
                        })) for _ in range(4)
                ]
                while get_json(process.address, "/server_info")["running_rows"] == 0:
                    await asyncio.sleep(0.05)
                os.killpg(process.pid, signal.SIGKILL)
                return await asyncio.gather(*tasks)

        start = time.monotonic()
        with pytest.raises(RolloutServerError, match=r"exited with code -9"):
            asyncio.run(go())
        assert time.monotonic() - start < 30
        with pytest.raises(RolloutServerError, match="failed during /generate"):
            _generate(process.address, [1, 2], {"max_new_tokens": 2}, timeout=5)
    finally:
        process.stop()


def test_push_module_weights_makes_server_match_local_model(server, model_path):
    from transformers import AutoModelForCausalLM

    from verl.workers.rollout.async_server import push_module_weights

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    prompt = [1, 5, 6, 7]
    with torch.no_grad():
        local = model.generate(torch.tensor([prompt]),
                               attention_mask=torch.ones(1, 4, dtype=torch.long),
                               max_new_tokens=6,
                               min_new_tokens=6,
                               do_sample=False,
                               pad_token_id=0)[0, 4:].tolist()
    stats = push_module_weights(model, [server.address], bucket_bytes=256 << 10)
    assert stats["buckets"] > 1
    served = _generate(server.address, prompt, {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert served.token_ids == local
    post_json(server.address, "/update_weights_from_disk", {"model_path": model_path})
