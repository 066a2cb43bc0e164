"""``python -m verl.model_merger``: a 2-rank FSDP2 checkpoint of the trained tiny model becomes a Hugging Face
directory whose weights, logits and greedy text equal those of the trained model's full state dict.

One spawned pair of gloo processes (module fixture) trains the tiny model 2 steps, saves the checkpoint with every
content (including ``hf_model``), and writes the reference: the full state dict gathered from the FSDP model and
the FSDP model's own logits on a fixed input.
"""
import json
import os
import runpy
import shutil
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from verl.model_merger import ModelMergerConfig, get_merger
from verl.model_merger.fsdp_model_merger import merge_shards

WORLD = 2
PROMPT = "What is 12 + 7? Let's think step by step."


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixed_ids(tokenizer):
    return tokenizer([PROMPT, "The sum of two numbers is 25."], return_tensors="pt", padding=True)


def _worker(rank, port, model_path, ckpt, ref_file, device="cpu"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    if device == "cpu":
        os.environ["VERL_DEVICE"] = "cpu"
    else:
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if device == "cpu" else "nccl", rank=rank, world_size=WORLD)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from verl.utils.checkpoint import FSDPCheckpointManager
        from verl.utils.fsdp_utils import apply_fsdp2, create_device_mesh, get_full_state_dict

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        apply_fsdp2(model, create_device_mesh(WORLD))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(rank)
        for _ in range(2):  # move the weights away from the tiny model's, so a merge of wrong files would show
            ids = torch.randint(0, model.config.vocab_size, (2, 12)).to(model.device)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        manager = FSDPCheckpointManager(model, optimizer, None, tokenizer,
                                        {"save_contents": ["model", "optimizer", "extra", "hf_model"]})
        manager.save_checkpoint(ckpt, global_step=2)
        full = get_full_state_dict(model, cpu_offload=True, rank0_only=True)
        batch = _fixed_ids(tokenizer).to(model.device)
        with torch.no_grad():
            logits = model(**batch).logits.float().cpu()
        if rank == 0:
            torch.save({"state_dict": full, "fsdp_logits": logits}, ref_file)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from verl.models.tiny import get_tiny_model_path

    model_path = get_tiny_model_path()
    base = tmp_path_factory.mktemp("merger")
    ckpt = str(base / "global_step_2" / "actor")
    ref_file = str(base / "ref.pt")
    mp.spawn(_worker, args=(_free_port(), model_path, ckpt, ref_file), nprocs=WORLD, join=True)
    return {"model_path": model_path, "ckpt": ckpt, "base": base, "ref": torch.load(ref_file, weights_only=True)}


@pytest.fixture(scope="module")
def merged_dir(trained):
    """The merge through the command line: ``python -m verl.model_merger`` run in this interpreter (runpy does
    what ``-m`` does, without paying for a second interpreter's imports)."""
    out = str(trained["base"] / "merged_cli")
    argv = ["verl.model_merger", "merge", "--backend", "fsdp", "--local_dir", trained["ckpt"], "--target_dir", out]
    saved_argv = sys.argv
    sys.argv = argv
    try:
        runpy.run_module("verl.model_merger", run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved_argv
    return out


def _reference_model(trained):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(trained["model_path"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(trained["ref"]["state_dict"])
    return model.eval()


def _greedy_text(model, tokenizer):
    batch = tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:])


def test_merged_model_loads_and_matches_trained_fsdp_model(trained, merged_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(os.listdir(merged_dir))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    original_tokenizer = AutoTokenizer.from_pretrained(trained["model_path"])
    assert tokenizer(PROMPT)["input_ids"] == original_tokenizer(PROMPT)["input_ids"]

    reference = _reference_model(trained)
    merged_sd, ref_sd = merged.state_dict(), trained["ref"]["state_dict"]
    assert set(ref_sd) <= set(merged_sd)
    for name, tensor in ref_sd.items():
        assert torch.equal(merged_sd[name], tensor), name

    batch = _fixed_ids(tokenizer)
    with torch.no_grad():
        merged_logits = merged(**batch).logits
        reference_logits = reference(**batch).logits
    torch.testing.assert_close(merged_logits, reference_logits, rtol=0, atol=0)
    # the sharded model computes the same function (fp32 on CPU; only reduction order may differ)
    torch.testing.assert_close(merged_logits, trained["ref"]["fsdp_logits"], rtol=1e-5, atol=1e-5)

    text = _greedy_text(merged, tokenizer)
    assert text == _greedy_text(reference, tokenizer)
    assert len(text) > 0


def test_hf_model_content_in_checkpoint_equals_merge(trained, merged_dir):
    """``hf_model`` in save_contents writes the same full weights into <ckpt>/huggingface/."""
    from safetensors.torch import load_file

    hf_dir = os.path.join(trained["ckpt"], "huggingface")
    assert os.path.isfile(os.path.join(hf_dir, "model.safetensors"))
    saved, merged = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(
        os.path.join(merged_dir, "model.safetensors"))
    assert set(saved) == set(merged)
    assert all(torch.equal(saved[k], merged[k]) for k in saved)
    # the model's own generation config (two EOS ids, sampling on) is kept, not replaced by a default one
    with open(os.path.join(trained["model_path"], "generation_config.json")) as f:
        original = json.load(f)
    for directory in (hf_dir, merged_dir):
        with open(os.path.join(directory, "generation_config.json")) as f:
            kept = json.load(f)
        assert kept["eos_token_id"] == original["eos_token_id"] and kept["do_sample"] == original["do_sample"]


def test_scripts_wrapper_and_test_operation(trained, merged_dir, monkeypatch, tmp_path):
    out = str(tmp_path / "merged_script")
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "model_merger.py")
    monkeypatch.setattr(
        sys, "argv",
        ["model_merger.py", "merge", "--backend", "fsdp", "--local_dir", trained["ckpt"], "--target_dir", out])
    runpy.run_path(script, run_name="__main__")
    with open(os.path.join(out, "config.json")) as f, open(os.path.join(merged_dir, "config.json")) as g:
        assert json.load(f) == json.load(g)

    # `test` compares the merge with a reference directory: equal to the merged one, different from the untrained
    ok = ModelMergerConfig(operation="test", backend="fsdp", local_dir=trained["ckpt"], test_hf_dir=out)
    get_merger(ok).test()
    bad = ModelMergerConfig(operation="test",
                            backend="fsdp",
                            local_dir=trained["ckpt"],
                            test_hf_dir=trained["model_path"])
    with pytest.raises(AssertionError, match="max abs difference"):
        get_merger(bad).test()


def test_wrong_directories_give_clear_errors(trained, tmp_path, capsys):
    from verl.model_merger import main

    step_dir = os.path.dirname(trained["ckpt"])
    with pytest.raises(SystemExit) as exc:
        main(["merge", "--backend", "fsdp", "--local_dir", step_dir, "--target_dir", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "model_world_size_<W>_rank_<R>.pt" in err and "did you mean --local_dir" in err and trained["ckpt"] in err

    partial = tmp_path / "partial"
    shutil.copytree(trained["ckpt"], partial)
    os.remove(partial / "model_world_size_2_rank_1.pt")
    cfg = ModelMergerConfig(operation="merge", backend="fsdp", local_dir=str(partial), target_dir=str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="lacks \\['model_world_size_2_rank_1.pt'\\]"):
        get_merger(cfg).merge_and_save()

    os.remove(partial / "huggingface" / "config.json")
    os.remove(partial / "optim_world_size_2_rank_0.pt")  # irrelevant to merging
    shutil.copy(os.path.join(trained["ckpt"], "model_world_size_2_rank_1.pt"), partial)
    with pytest.raises(FileNotFoundError, match="--hf_model_config_path"):
        get_merger(cfg).merge_and_save()
    cfg_with_config = ModelMergerConfig(operation="merge",
                                        backend="fsdp",
                                        local_dir=str(partial),
                                        target_dir=str(tmp_path / "o2"),
                                        hf_model_config_path=os.path.join(trained["ckpt"], "huggingface"))
    get_merger(cfg_with_config).merge_and_save()
    assert os.path.isfile(tmp_path / "o2" / "model.safetensors")

    megatron = ModelMergerConfig(operation="merge", backend="megatron", local_dir=trained["ckpt"], target_dir="x")
    with pytest.raises(FileNotFoundError, match="this is an FSDP checkpoint: use --backend fsdp"):
        get_merger(megatron).merge_and_save()


def test_merge_shards_uneven_and_hsdp():
    full = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4)
    # FSDP2 over 3 ranks splits 5 rows as torch.chunk would, padded: 2, 2, 1
    shards = [full[0:2], full[2:4], full[4:5]]
    assert torch.equal(merge_shards(shards, [0, 1, 2], ["S(0)"]), full)
    # 4 rows over 3 ranks: the last rank holds none
    four = full[:4]
    assert torch.equal(merge_shards([four[0:2], four[2:4], four[4:4]], [0, 1, 2], ["S(0)"]), four)
    # HSDP mesh (ddp=2, fsdp=2): replicated across the first dim, sharded within the second
    hsdp = [full[0:3], full[3:5], full[0:3], full[3:5]]
    assert torch.equal(merge_shards(hsdp, [[0, 1], [2, 3]], ["R", "S(0)"]), full)
    # two split dimensions, column-wise inside row-wise
    grid = [full[:3, :2], full[:3, 2:], full[3:, :2], full[3:, 2:]]
    assert torch.equal(merge_shards(grid, [[0, 1], [2, 3]], ["S(0)", "S(1)"]), full)
    with pytest.raises(ValueError, match="unsupported placement"):
        merge_shards(shards, [0, 1, 2], ["P"])
    with pytest.raises(ValueError, match="2 placements"):
        merge_shards(shards, [0, 1, 2], ["S(0)", "R"])


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < WORLD, reason="needs 2 CUDA GPUs")
def test_merge_of_cuda_nccl_checkpoint(tmp_path):
    """A checkpoint written by 2 GPU ranks (NCCL, bf16 compute) merges to the gathered fp32 master weights."""
    from transformers import AutoModelForCausalLM

    from verl.model_merger.fsdp_model_merger import merge_fsdp_checkpoint
    from verl.models.tiny import get_tiny_model_path

    ckpt, ref_file = str(tmp_path / "global_step_2" / "actor"), str(tmp_path / "ref.pt")
    mp.spawn(_worker, args=(_free_port(), get_tiny_model_path(), ckpt, ref_file, "cuda"), nprocs=WORLD, join=True)
    ref = torch.load(ref_file, weights_only=True)
    merged = AutoModelForCausalLM.from_pretrained(merge_fsdp_checkpoint(ckpt, str(tmp_path / "hf"))).state_dict()
    for name, tensor in ref["state_dict"].items():
        assert torch.equal(merged[name], tensor), name
