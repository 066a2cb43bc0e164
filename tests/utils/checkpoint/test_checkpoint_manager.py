"""Checkpoint helpers in one process: the tracker and latest-checkpoint lookup, atomic files, content options, RNG
capture, and FSDPCheckpointManager with world size 1 (a plain module without a process group, and FSDP2 over a
1-rank gloo group, whose checkpoint the merger turns into a Hugging Face directory)."""
import json
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist

from verl.utils.checkpoint import (BaseCheckpointManager, FSDPCheckpointManager, atomic_torch_save,
                                   find_latest_ckpt_path, get_checkpoint_tracker_filename,
                                   read_latest_checkpointed_iteration, should_save_ckpt_esi,
                                   write_latest_checkpointed_iteration)
from verl.utils.checkpoint import checkpoint_manager as cm


def _tiny_config(**overrides):
    from transformers import Qwen2Config

    kwargs = dict(vocab_size=96,
                  hidden_size=32,
                  intermediate_size=64,
                  num_hidden_layers=2,
                  num_attention_heads=4,
                  num_key_value_heads=2,
                  max_position_embeddings=64,
                  tie_word_embeddings=True)
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


# ------------------------------------------------------------------------------------------------ tracker -------
def test_find_latest_ckpt_path(tmp_path):
    root = str(tmp_path)
    assert find_latest_ckpt_path(None) is None
    assert find_latest_ckpt_path(root) is None  # no tracker yet
    write_latest_checkpointed_iteration(root, 7)
    assert read_latest_checkpointed_iteration(root) == 7
    with pytest.warns(UserWarning, match="global_step_7 does not exist"):
        assert find_latest_ckpt_path(root) is None
    os.makedirs(tmp_path / "global_step_7")
    assert find_latest_ckpt_path(root) == os.path.join(root, "global_step_7")
    os.makedirs(tmp_path / "step-7")
    assert find_latest_ckpt_path(root, directory_format="step-{}") == os.path.join(root, "step-7")
    assert get_checkpoint_tracker_filename(root) == os.path.join(root, "latest_checkpointed_iteration.txt")
    with open(get_checkpoint_tracker_filename(root), "w") as f:
        f.write("seven")
    with pytest.raises(ValueError, match="should hold one integer step"):
        find_latest_ckpt_path(root)


def test_tracker_write_crash_mock_keeps_old_value(tmp_path, monkeypatch):
    root = str(tmp_path)
    write_latest_checkpointed_iteration(root, 3)

    def failing_replace(src, dst):
        raise OSError("power cut (mock)")

    monkeypatch.setattr(cm.os, "replace", failing_replace)
    with pytest.raises(OSError, match="power cut"):
        write_latest_checkpointed_iteration(root, 4)
    with pytest.raises(OSError, match="power cut"):
        atomic_torch_save({"a": 1}, str(tmp_path / "data.pt"))
    monkeypatch.undo()
    assert read_latest_checkpointed_iteration(root) == 3
    assert sorted(os.listdir(root)) == ["latest_checkpointed_iteration.txt"]  # no temp files left behind
    atomic_torch_save({"a": 1}, str(tmp_path / "data.pt"))
    assert torch.load(tmp_path / "data.pt") == {"a": 1}


def test_should_save_ckpt_esi(monkeypatch):
    import time

    for key in ("MLP_CURRENT_CAPACITY_BLOCK_EXPIRATION_TIMESTAMP",
                "SAGEMAKER_CURRENT_CAPACITY_BLOCK_EXPIRATION_TIMESTAMP"):
        monkeypatch.delenv(key, raising=False)
    assert should_save_ckpt_esi(100) is False
    monkeypatch.setenv("MLP_CURRENT_CAPACITY_BLOCK_EXPIRATION_TIMESTAMP", str(time.time() + 120))
    assert should_save_ckpt_esi(max_steps_duration=100, save_ckpt_duration=60) is True
    assert should_save_ckpt_esi(max_steps_duration=10, save_ckpt_duration=10) is False
    monkeypatch.setenv("MLP_CURRENT_CAPACITY_BLOCK_EXPIRATION_TIMESTAMP", "soon")
    with pytest.raises(ValueError, match="unix timestamp"):
        should_save_ckpt_esi(10)


# ------------------------------------------------------------------------------------------------ options -------
def test_checkpoint_contents_options():
    model = torch.nn.Linear(2, 2)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    m = FSDPCheckpointManager(model, optim, None, None, {"save_contents": ["model", "optimizer", "hf_model"]})
    assert m.should_save_hf_model and m.should_load_optimizer and not m.should_save_extra
    m = FSDPCheckpointManager(model, optim, None, None, {"save_contents": ["model"], "load_contents": ["model"]})
    assert m.checkpoint_save_contents == ["model"] and not m.should_load_optimizer
    m = FSDPCheckpointManager(model, optim, checkpoint_contents=["model", "extra"])  # older keyword
    assert m.checkpoint_load_contents == ["model", "extra"]
    assert FSDPCheckpointManager(model, optim).checkpoint_save_contents == ["model", "optimizer", "extra"]
    with pytest.raises(ValueError, match=r"unknown entries \['weights'\]"):
        FSDPCheckpointManager(model, optim, checkpoint_config={"save_contents": ["model", "weights"]})
    with pytest.raises(ValueError, match="async_save"):
        FSDPCheckpointManager(model, optim, checkpoint_config={"async_save": True})
    with pytest.raises(ValueError, match="no optimizer was given"):
        FSDPCheckpointManager(model, None).save_checkpoint("/nonexistent/never/written")


def test_rng_state_roundtrip():
    state = BaseCheckpointManager.get_rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)
    BaseCheckpointManager.load_rng_state(state)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected


# ------------------------------------------------------------------------------------ world size 1, no dist ------
def _train(model, optim, sched, steps=1):
    for _ in range(steps):
        ids = torch.randint(0, 96, (2, 8))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        sched.step()
        optim.zero_grad()
    return loss.item()


def _fresh(seed):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config())
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=0.5)
    return model, optim, sched


def test_plain_module_without_process_group_roundtrip_and_errors(tmp_path):
    assert not dist.is_initialized()
    model, optim, sched = _fresh(0)
    _train(model, optim, sched, steps=2)
    ckpt = str(tmp_path / "global_step_2" / "actor")
    FSDPCheckpointManager(model, optim, sched, None, {
        "save_contents": ["model", "optimizer", "extra"]
    }).save_checkpoint(ckpt, global_step=2)
    assert {
        "model_world_size_1_rank_0.pt", "optim_world_size_1_rank_0.pt", "extra_state_world_size_1_rank_0.pt",
        "fsdp_config.json", "huggingface"
    } == set(os.listdir(ckpt))
    expected = _train(model, optim, sched)  # the step right after the save

    model2, optim2, sched2 = _fresh(1)  # other weights, and _fresh reseeds the RNG
    FSDPCheckpointManager(model2, optim2, sched2).load_checkpoint(ckpt)
    assert _train(model2, optim2, sched2) == expected  # weights, Adam state, LR and RNG all restored
    assert sched2.get_last_lr() == sched.get_last_lr()
    model3, optim3, sched3 = _fresh(2)

    # errors: wrong directory, content that was not saved, a missing file
    with pytest.raises(FileNotFoundError, match="expected fsdp_config.json"):
        FSDPCheckpointManager(model3, optim3, sched3).load_checkpoint(os.path.dirname(ckpt))
    only_model = str(tmp_path / "only_model")
    FSDPCheckpointManager(model, optim, sched, None, {"save_contents": ["model"]}).save_checkpoint(only_model)
    with pytest.raises(FileNotFoundError, match=r"optim_world_size_1_rank_0.pt \(it was saved with save_contents"):
        FSDPCheckpointManager(model3, optim3, sched3).load_checkpoint(only_model)
    FSDPCheckpointManager(model3, optim3, sched3, None, {"load_contents": ["model"]}).load_checkpoint(only_model)
    os.remove(os.path.join(ckpt, "extra_state_world_size_1_rank_0.pt"))
    with pytest.raises(FileNotFoundError, match="missing extra_state_world_size_1_rank_0.pt"):
        FSDPCheckpointManager(model3, optim3, sched3).load_checkpoint(ckpt)
    # a checkpoint of another model
    from transformers import AutoModelForCausalLM

    config = _tiny_config(num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"does not match the model: missing \['model.layers.2"):
        FSDPCheckpointManager(AutoModelForCausalLM.from_config(config), None, None, None, {
            "load_contents": ["model"]
        }).load_checkpoint(only_model)
    config = _tiny_config(intermediate_size=48)
    with pytest.raises(ValueError,
                       match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(64, 32\), the model's is \(48, 32\)"):
        FSDPCheckpointManager(AutoModelForCausalLM.from_config(config), None, None, None, {
            "load_contents": ["model"]
        }).load_checkpoint(only_model)

    # del_local_after_load removes the directory once loaded
    FSDPCheckpointManager(model3, None, None, None, {
        "load_contents": ["model"]
    }).load_checkpoint(only_model, del_local_after_load=True)
    assert not os.path.exists(only_model)


def test_resave_same_path_replaces_and_cleans_stale_temp_dirs(tmp_path):
    model = torch.nn.Linear(3, 3)
    path = str(tmp_path / "ckpt")
    os.makedirs(path + ".tmp-deadbeef")  # left by a crashed save
    manager = FSDPCheckpointManager(model, None, None, None, {"save_contents": ["model"]})
    with pytest.warns(UserWarning, match="no transformers config"):
        manager.save_checkpoint(path)
    with torch.no_grad():
        model.weight.fill_(3.0)
    with pytest.warns(UserWarning, match="--hf_model_config_path"):
        manager.save_checkpoint(path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    saved = torch.load(os.path.join(path, "model_world_size_1_rank_0.pt"), weights_only=True)
    assert torch.all(saved["weight"] == 3.0)


# ---------------------------------------------------------------------------------- world size 1, FSDP2 ------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_world_one(monkeypatch):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    from verl.utils.device import is_cuda_available

    monkeypatch.setenv("VERL_DEVICE", "cpu")  # gloo: CPU tensors even on a GPU machine
    is_cuda_available.cache_clear()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        monkeypatch.undo()
        is_cuda_available.cache_clear()


def test_fsdp2_world_size_one_save_load_and_merge(tmp_path, gloo_world_one):
    from transformers import AutoModelForCausalLM

    from verl.model_merger.fsdp_model_merger import merge_fsdp_checkpoint
    from verl.utils.fsdp_utils import apply_fsdp2, create_device_mesh, get_full_state_dict

    model, optim, sched = _fresh(0)  # tied embeddings: the merger must keep the tie
    apply_fsdp2(model, create_device_mesh(1))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=0.5)
    _train(model, optim, sched, steps=2)
    ckpt = str(tmp_path / "global_step_2" / "actor")
    FSDPCheckpointManager(model, optim, sched).save_checkpoint(ckpt, global_step=2)
    with open(os.path.join(ckpt, "fsdp_config.json")) as f:
        meta = json.load(f)
    assert meta["world_size"] == 1 and meta["params"]["lm_head.weight"]["placements"] == ["S(0)"]
    reference = {k: v.clone() for k, v in get_full_state_dict(model).items()}
    torch.manual_seed(123)
    expected = _train(model, optim, sched)

    model2, _, _ = _fresh(5)
    apply_fsdp2(model2, create_device_mesh(1))
    optim2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.StepLR(optim2, step_size=1, gamma=0.5)
    FSDPCheckpointManager(model2, optim2, sched2).load_checkpoint(ckpt)
    loaded = get_full_state_dict(model2)
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    torch.manual_seed(123)
    assert _train(model2, optim2, sched2) == expected

    out = merge_fsdp_checkpoint(ckpt, str(tmp_path / "hf"))
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    merged_sd = merged.state_dict()
    assert all(torch.equal(merged_sd[k], reference[k]) for k in reference)
