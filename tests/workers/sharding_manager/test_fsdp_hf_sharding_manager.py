"""FSDPHFShardingManager: entering it makes the HF rollout model's weights equal to the actor's full weights (FSDP2
on 2 gloo ranks, and a plain module on 1 process, tied and untied embeddings), greedy generation follows the actor,
gathered buckets respect the byte bound, weight-sync metrics are reported, and mismatched models are refused."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, Qwen2Config

from verl.protocol import DataProto
from verl.utils.torch_functional import compute_position_id_with_mask
from verl.workers.rollout.hf import HFRollout
from verl.workers.sharding_manager import BaseShardingManager, FSDPHFShardingManager

VOCAB, R, WORLD = 200, 6, 2
BUCKET = 40_000  # bytes: the 51 kB embedding is a bucket of its own, the rest packs several tensors per bucket
METRICS = ("perf/weight_sync_s", "perf/weight_sync_gb", "perf/weight_sync_buckets", "perf/weight_sync_max_bucket_mb",
           "perf/weight_sync_peak_memory_gb", "perf/weight_sync_peak_memory_delta_gb")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed, tie=False, hidden=64):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB,
                         hidden_size=hidden,
                         intermediate_size=128,
                         num_hidden_layers=2,
                         num_attention_heads=4,
                         num_key_value_heads=2,
                         max_position_embeddings=128,
                         tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _prompts():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return DataProto.from_dict(
        {
            "input_ids": ids.masked_fill(mask == 0, 0),
            "attention_mask": mask,
            "position_ids": compute_position_id_with_mask(mask)
        },
        non_tensors={"uid": np.array(["a", "b", "c"], dtype=object)},
        meta_info={
            "do_sample": False,
            "eos_token_id": 1,
            "pad_token_id": 0
        })


def _greedy(module):
    return HFRollout(module, {"response_length": R}).generate_sequences(_prompts()).batch["responses"]


def _state_bytes(module):
    """Bytes of the module's state, a tied tensor once (the sync sends it once)."""
    unique = {v.data_ptr(): v for v in module.state_dict().values()}
    return sum(v.numel() * v.element_size() for v in unique.values())


def _check_sync(manager, rollout, full_state, expected_bytes):
    rollout_state = rollout.state_dict()
    assert set(rollout_state) == set(full_state)
    for name, value in full_state.items():
        # on CUDA the manager moves the rollout model to the GPU on entry; the actor may stay on the host
        torch.testing.assert_close(rollout_state[name].cpu(), value.cpu(), rtol=0, atol=0, msg=name)
    buckets = manager.last_buckets
    assert len(buckets) > 2
    assert all(size <= BUCKET or count == 1 for count, size in buckets), buckets
    assert any(count > 1 for count, _ in buckets)
    assert sum(size for _, size in buckets) == expected_bytes
    m = manager.metrics
    assert set(METRICS) <= set(m)
    assert m["perf/weight_sync_buckets"] == len(buckets)
    assert m["perf/weight_sync_gb"] * (1 << 30) == pytest.approx(expected_bytes)
    assert m["perf/weight_sync_max_bucket_mb"] * (1 << 20) == pytest.approx(max(s for _, s in buckets))
    assert m["perf/weight_sync_s"] > 0 and m["perf/weight_sync_peak_memory_gb"] > 0
    assert manager.timing["weight_sync"] == m["perf/weight_sync_s"]


@torch.no_grad()
def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        local.add_(0.5 * torch.randn(local.shape, generator=g))


# ----------------------------------------------------------------------------------------------------------------
# one process, plain nn.Module actor
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_plain_module_sync(tie):
    actor, rollout = _model(0, tie), _model(1, tie)
    _perturb(actor, 7)
    before = _greedy(rollout)
    expected = _greedy(actor)
    assert not torch.equal(before, expected)
    manager = FSDPHFShardingManager(actor, rollout, bucket_bytes=BUCKET, offload_param=True, offload_rollout=True)
    actor.train()
    with manager as entered:
        assert entered is manager
        _check_sync(manager, rollout, actor.state_dict(), _state_bytes(actor))
        assert not rollout.training
        assert torch.equal(_greedy(rollout), expected)
        if tie:
            assert rollout.lm_head.weight.data_ptr() == rollout.model.embed_tokens.weight.data_ptr()
            embedding = actor.model.embed_tokens.weight
            everything = sum(v.numel() * v.element_size() for v in actor.state_dict().values())
            assert _state_bytes(actor) == everything - embedding.numel() * embedding.element_size()
    assert actor.training  # the actor's mode is restored on exit

    # a later step: new actor weights reach the rollout model on the next entry
    _perturb(actor, 8)
    with manager:
        _check_sync(manager, rollout, actor.state_dict(), _state_bytes(actor))


def test_mismatched_rollout_model_is_refused():
    manager = FSDPHFShardingManager(_model(0), _model(1, hidden=32), bucket_bytes=BUCKET)
    with pytest.raises(ValueError, match="shape mismatches.*actor_rollout_ref.model.path"):
        with manager:
            pass


def test_same_module_and_base_class():
    actor = _model(0)
    manager = FSDPHFShardingManager(actor, actor)
    with manager:
        assert manager.metrics["perf/weight_sync_buckets"] == 0 and manager.last_buckets == []
    data = _prompts()
    base = BaseShardingManager()
    with base:
        assert base.preprocess_data(data) is data and base.postprocess_data(data) is data
    with pytest.raises(ValueError, match="update_weights_bucket_megabytes"):
        FSDPHFShardingManager(actor, actor, bucket_bytes=0)


# ----------------------------------------------------------------------------------------------------------------
# two gloo ranks, FSDP2 actor
# ----------------------------------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ["VERL_DEVICE"] = "cpu"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from verl.utils.fsdp_utils import apply_fsdp2, create_device_mesh, get_full_state_dict

        actor = apply_fsdp2(_model(0), create_device_mesh(WORLD, -1))
        _perturb(actor, 100 + rank)  # each rank changes its own shard
        full = get_full_state_dict(actor)
        reference = _model(2)
        reference.load_state_dict(full)
        expected = _greedy(reference)

        rollout = _model(1)
        assert not torch.equal(_greedy(rollout), expected)
        manager = FSDPHFShardingManager(module=actor, inference_module=rollout, bucket_bytes=BUCKET)
        actor.train()
        with manager:
            _check_sync(manager, rollout, full, _state_bytes(reference))
            assert torch.equal(_greedy(rollout), expected)  # generation follows the actor's current weights
        assert actor.training
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_ranks_sync():
    mp.spawn(_fsdp_worker, args=(_free_port(),), nprocs=WORLD, join=True)
