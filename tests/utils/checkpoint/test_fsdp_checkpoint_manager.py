"""FSDPCheckpointManager with 2 ranks (gloo, CPU): resume gives the same losses as not stopping, failed and crashed
saves leave the previous checkpoint as the latest, retention keeps the newest checkpoints.

One pair of processes serves the whole module (spawning is the slow part on 2 cores). Run A trains the tiny model 2
steps, saves, tries two failing saves, trains 3 more steps (the reference losses) and exercises retention. Then the
process group is destroyed and a fresh one created; run B builds a new model, optimizer and scheduler with other
initial weights and seeds, loads the step-2 checkpoint and trains 3 steps.
"""
import json
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from verl.utils.checkpoint import (CheckpointSaveError, FSDPCheckpointManager, find_latest_ckpt_path,
                                   read_latest_checkpointed_iteration, write_latest_checkpointed_iteration)
from verl.utils.checkpoint import fsdp_checkpoint_manager as fcm

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, port, device):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    if device == "cpu":
        os.environ["VERL_DEVICE"] = "cpu"
    else:  # bit-identical continuation needs deterministic CUDA kernels too
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True)
        torch.cuda.set_device(rank)
    from verl.utils.device import get_nccl_backend

    dist.init_process_group(get_nccl_backend(), rank=rank, world_size=WORLD)


def _worker(rank, device, ports, model_path, root, prune_root, out_a, out_b):
    _worker_a(rank, ports[0], device, model_path, root, prune_root, out_a)
    _worker_b(rank, ports[1], device, model_path, os.path.join(root, "global_step_2", "actor"), out_b)


def _build(model_path, perturb_seed=None):
    """The tiny model sharded with FSDP2, AdamW and a decaying LR schedule (so a lost scheduler changes losses)."""
    from transformers import AutoModelForCausalLM

    from verl.utils.fsdp_utils import apply_fsdp2, create_device_mesh

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if perturb_seed is not None:  # different initial weights: the load must overwrite every parameter
        gen = torch.Generator().manual_seed(perturb_seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    apply_fsdp2(model, create_device_mesh(WORLD))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + step))
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler, vocab):
    """One step on a batch drawn from the python, numpy and torch RNGs of this rank (all three must be restored)."""
    from verl.utils.fsdp_utils import clip_grad_norm_

    length = random.randint(6, 12)
    offset = int(np.random.randint(0, 100))
    ids = ((torch.randint(0, vocab - 100, (2, length)) + offset) % vocab).to(model.device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.detach().clone()
    dist.all_reduce(value)
    return value.item() / WORLD


def _seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _SimulatedCrash(BaseException):
    """Stands for the process dying: not an Exception, so no error handling of the save runs."""


def _patched_save(raise_factory, ranks):
    original = torch.save

    def save(obj, path, *args, **kwargs):
        if "optim_world_size" in str(path) and dist.get_rank() in ranks:
            raise raise_factory()
        return original(obj, path, *args, **kwargs)

    return original, save


def _worker_a(rank, port, device, model_path, root, prune_root, out_file):
    _init(rank, port, device)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model, optimizer, scheduler = _build(model_path)
        vocab = model.config.vocab_size
        manager = FSDPCheckpointManager(model, optimizer, scheduler, tokenizer,
                                        {"save_contents": ["model", "optimizer", "extra"]})
        _seed(1000 + rank)
        losses = [_train_step(model, optimizer, scheduler, vocab) for _ in range(2)]
        manager.save_checkpoint(os.path.join(root, "global_step_2", "actor"), global_step=2)
        if rank == 0:
            write_latest_checkpointed_iteration(root, 2)
        dist.barrier()

        result = {}
        # (1) an ordinary error on rank 1 only (mock disk failure): every rank raises, nothing is published
        original, fcm.torch.save = _patched_save(lambda: OSError("disk full (mock)"), ranks={1})
        try:
            manager.save_checkpoint(os.path.join(root, "global_step_3", "actor"), global_step=3)
            result["soft_failure"] = "no error"
        except CheckpointSaveError as exc:
            result["soft_failure"] = str(exc)
        finally:
            fcm.torch.save = original
        dist.barrier()
        result["after_soft_failure"] = sorted(os.listdir(os.path.join(root, "global_step_3"))) if os.path.isdir(
            os.path.join(root, "global_step_3")) else None
        dist.barrier()

        # (2) a crash on every rank while the optimizer shards are written (mock of a killed process)
        original, fcm.torch.save = _patched_save(_SimulatedCrash, ranks={0, 1})
        try:
            manager.save_checkpoint(os.path.join(root, "global_step_3", "actor"), global_step=3)
        except _SimulatedCrash:
            pass
        finally:
            fcm.torch.save = original
        dist.barrier()
        result["after_crash"] = sorted(os.listdir(os.path.join(root, "global_step_3")))
        result["latest_after_crash"] = find_latest_ckpt_path(root)
        dist.barrier()

        # 3 steps: the third loss is the first to depend on the LR the restored scheduler set
        losses += [_train_step(model, optimizer, scheduler, vocab) for _ in range(3)]
        result["losses"] = losses

        # (3) retention: keep 2, and never the checkpoint the tracker names
        kept = []
        for step in (1, 2, 3):
            manager.save_checkpoint(os.path.join(prune_root, f"global_step_{step}", "actor"),
                                    global_step=step,
                                    max_ckpt_to_keep=2)
            if rank == 0:
                write_latest_checkpointed_iteration(prune_root, step)
            dist.barrier()
            kept.append(sorted(os.listdir(prune_root)))
        # step 4 saved with max 1 before the tracker moves past 3: step 3 must survive
        manager.save_checkpoint(os.path.join(prune_root, "global_step_4", "actor"), global_step=4, max_ckpt_to_keep=1)
        dist.barrier()
        kept.append(sorted(os.listdir(prune_root)))
        result["kept"] = kept
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _worker_b(rank, port, device, model_path, ckpt, out_file):
    _init(rank, port, device)
    try:
        model, optimizer, scheduler = _build(model_path, perturb_seed=77)
        manager = FSDPCheckpointManager(model, optimizer, scheduler, None,
                                        {"save_contents": ["model", "optimizer", "extra"]})
        _seed(5)  # other seeds: only the restored RNG state can reproduce run A's batches
        manager.load_checkpoint(ckpt)
        losses = [_train_step(model, optimizer, scheduler, model.config.vocab_size) for _ in range(3)]
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump({"losses": losses}, f)
    finally:
        dist.destroy_process_group()


def _run(base, device):
    from verl.models.tiny import get_tiny_model_path

    model_path = get_tiny_model_path()
    root, prune_root = str(base / "ckpts"), str(base / "prune")
    out_a, out_b = str(base / "a.json"), str(base / "b.json")
    mp.spawn(_worker,
             args=(device, (_free_port(), _free_port()), model_path, root, prune_root, out_a, out_b),
             nprocs=WORLD,
             join=True)
    with open(out_a) as fa, open(out_b) as fb:
        return {"root": root, "prune_root": prune_root, "a": json.load(fa), "b": json.load(fb)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("fsdp_ckpt"), "cpu")


def test_resume_two_ranks_gives_identical_losses(runs):
    a_losses, b_losses = runs["a"]["losses"], runs["b"]["losses"]
    assert len(a_losses) == 5 and len(b_losses) == 3
    # the checkpoint restores weights, Adam moments, LR schedule and every RNG: continuing is bit-identical
    assert b_losses == a_losses[2:], (a_losses, b_losses)
    assert a_losses[2] != a_losses[1]  # the comparison is not trivially about constant values


def test_checkpoint_files_and_layout(runs):
    ckpt = os.path.join(runs["root"], "global_step_2", "actor")
    names = set(os.listdir(ckpt))
    for rank in range(WORLD):
        for prefix in ("model", "optim", "extra_state"):
            assert f"{prefix}_world_size_{WORLD}_rank_{rank}.pt" in names
    assert {"fsdp_config.json", "huggingface"} <= names
    with open(os.path.join(ckpt, "fsdp_config.json")) as f:
        meta = json.load(f)
    assert meta["world_size"] == WORLD and meta["FSDP_version"] == 2
    assert meta["meshes"] == [{"ranks": [0, 1], "dim_names": ["fsdp"]}]
    assert meta["params"]["model.embed_tokens.weight"]["placements"] == ["S(0)"]
    hf = set(os.listdir(os.path.join(ckpt, "huggingface")))
    assert {"config.json", "tokenizer_config.json"} <= hf and not any(n.endswith(".safetensors") for n in hf)
    shard = torch.load(os.path.join(ckpt, "model_world_size_2_rank_1.pt"), weights_only=True)
    full_rows = meta["params"]["model.embed_tokens.weight"]["shape"][0]
    assert shard["model.embed_tokens.weight"].shape[0] == full_rows // 2


def test_failed_save_on_one_rank_mock_disk_error_publishes_nothing(runs):
    message = runs["a"]["soft_failure"]
    assert "rank 1" in message and "disk full (mock)" in message and "previous checkpoint is intact" in message
    assert runs["a"]["after_soft_failure"] == []  # temp dir removed, no actor/ published


def test_crash_mid_save_mock_leaves_previous_checkpoint_as_latest(runs):
    root = runs["root"]
    leftovers = runs["a"]["after_crash"]
    assert len(leftovers) == 1 and leftovers[0].startswith("actor.tmp-"), leftovers  # the half-written dir
    partial = os.listdir(os.path.join(root, "global_step_3", leftovers[0]))
    assert any(n.startswith("model_world_size") for n in partial) and not any(n.startswith("optim") for n in partial)
    assert runs["a"]["latest_after_crash"] == os.path.join(root, "global_step_2")
    assert read_latest_checkpointed_iteration(root) == 2
    assert find_latest_ckpt_path(root) == os.path.join(root, "global_step_2")
    assert not os.path.exists(os.path.join(root, "global_step_3", "actor"))


def test_max_ckpt_to_keep_prunes_oldest_but_not_the_tracked_one(runs):
    kept = runs["a"]["kept"]
    tracker = "latest_checkpointed_iteration.txt"
    assert kept[0] == ["global_step_1", tracker]
    assert kept[1] == ["global_step_1", "global_step_2", tracker]
    assert kept[2] == ["global_step_2", "global_step_3", tracker]
    assert kept[3] == ["global_step_3", "global_step_4", tracker]  # 3 is what the tracker names: kept


def test_loading_with_another_world_size_names_both(runs):
    from transformers import AutoModelForCausalLM, Qwen2Config

    ckpt = os.path.join(runs["root"], "global_step_2", "actor")
    config = Qwen2Config.from_pretrained(os.path.join(ckpt, "huggingface"))
    model = AutoModelForCausalLM.from_config(config)
    manager = FSDPCheckpointManager(model, None, None, None, {"save_contents": ["model"]})
    with pytest.raises(ValueError, match=r"world size 2, but this run has world size 1"):
        manager.load_checkpoint(ckpt)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < WORLD, reason="needs 2 CUDA GPUs")
def test_resume_crash_and_retention_on_cuda_nccl(tmp_path):
    """The same scenario with NCCL on 2 GPUs (bf16 compute, fp32 master weights)."""
    result = _run(tmp_path, "cuda")
    a_losses, b_losses = result["a"]["losses"], result["b"]["losses"]
    assert b_losses == a_losses[2:], (a_losses, b_losses)
    assert "rank 1" in result["a"]["soft_failure"] and result["a"]["after_soft_failure"] == []
    assert result["a"]["latest_after_crash"] == os.path.join(result["root"], "global_step_2")
    assert result["a"]["kept"][3] == ["global_step_3", "global_step_4", "latest_checkpointed_iteration.txt"]
