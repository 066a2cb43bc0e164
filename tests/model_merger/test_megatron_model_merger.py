"""``python -m verl.model_merger merge --backend megatron``: a Megatron dist checkpoint of the tiny model, written by
2 gloo processes with tensor parallelism (TP=2) or with pipeline and virtual-pipeline parallelism (PP=2, VPP=2)
before any weight update, merges offline into a Hugging Face directory whose weights equal the tiny model's exactly
and whose logits are the same.

One spawned pair of processes (module fixture) builds, for each layout, the Megatron model from the tiny HF model and the distributed
optimizer, and saves the checkpoint (model, optimizer, extra) with verl's MegatronCheckpointManager, so the merger
must pick the model's tensors out of a checkpoint that also holds optimizer state.
"""
import importlib.util
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
from verl.model_merger.megatron_model_merger import unstack_layers

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron.core") is None,
                                reason="megatron-core is not installed (pip install megatron-core==0.16.1)")

WORLD = 2
# (tensor, pipeline, virtual pipeline) sizes of the checkpoints, written one after the other by the same 2 processes
LAYOUTS = {"tp2": (2, 1, None), "pp2_vpp2": (1, 2, 2)}
PROMPT = "What is 12 + 7? Let's think step by step."


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_checkpoint(model_path, ckpt, tp, pp, vpp):
    from megatron.core import parallel_state as mpu
    from transformers import AutoConfig, AutoTokenizer

    from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager
    from verl.utils.megatron_cpu import device_scope
    from verl.utils.megatron_utils import build_megatron_model, build_megatron_optimizer, init_megatron_parallel
    from verl.workers.actor.megatron_actor import megatron_optimizer_step, zero_megatron_grads

    mcfg = {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": vpp,
        "use_distributed_optimizer": True,
        "seed": 1,
        "dtype": "float32",
    }
    init_megatron_parallel(mcfg, "actor_rollout_ref.actor.megatron")
    try:
        hf_config = AutoConfig.from_pretrained(model_path)
        chunks, _, converter = build_megatron_model(hf_config, mcfg, model_path)
        optimizer = build_megatron_optimizer(chunks, {"lr": 1e-3, "weight_decay": 0.0}, mcfg, grad_clip=1.0)
        # megatron's distributed optimizer saves its state only once it has stepped; a step on zero gradients gives
        # it Adam moments (all zero) without moving any weight (the update is 0 / (sqrt(0) + eps))
        zero_megatron_grads(chunks, optimizer)
        with device_scope():
            _, stepped = megatron_optimizer_step(chunks, optimizer)
        assert stepped
        manager = MegatronCheckpointManager(chunks,
                                            optimizer,
                                            None,
                                            AutoTokenizer.from_pretrained(model_path),
                                            checkpoint_config={"save_contents": ["model", "optimizer", "extra"]},
                                            converter=converter,
                                            hf_config=hf_config)
        manager.save_checkpoint(ckpt, global_step=1)
    finally:
        mpu.destroy_model_parallel()


def _save_worker(rank, port, model_path, ckpts):
    os.environ.update(MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port),
                      RANK=str(rank),
                      LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD),
                      VERL_DEVICE="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for name, (tp, pp, vpp) in LAYOUTS.items():
            _save_checkpoint(model_path, ckpts[name], tp, pp, vpp)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from verl.models.tiny import get_tiny_model_path

    model_path = get_tiny_model_path()
    base = tmp_path_factory.mktemp("megatron_merger")
    ckpts = {name: str(base / name / "global_step_1" / "actor") for name in LAYOUTS}
    mp.spawn(_save_worker, args=(_free_port(), model_path, ckpts), nprocs=WORLD, join=True)
    return {"model_path": model_path, "ckpt": ckpts["tp2"], "ckpts": ckpts, "base": base}


@pytest.fixture(scope="module")
def merged_dirs(saved):
    """The TP checkpoint merged through the command line (runpy does what ``python -m`` does, in this interpreter),
    the pipeline one through the Python entry point."""
    from verl.model_merger import merge_megatron_checkpoint

    out = {name: str(saved["base"] / f"merged_{name}") for name in LAYOUTS}
    saved_argv = sys.argv
    sys.argv = [
        "verl.model_merger", "merge", "--backend", "megatron", "--local_dir", saved["ckpts"]["tp2"], "--target_dir",
        out["tp2"]
    ]
    try:
        runpy.run_module("verl.model_merger", run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved_argv
    assert merge_megatron_checkpoint(saved["ckpts"]["pp2_vpp2"], out["pp2_vpp2"]) == out["pp2_vpp2"]
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_checkpoint_is_sharded_with_optimizer(saved, name):
    with open(os.path.join(saved["ckpts"][name], "megatron_checkpoint.json")) as f:
        meta = json.load(f)
    tp, pp, vpp = LAYOUTS[name]
    assert (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"],
            meta["virtual_pipeline_model_parallel_size"]) == (tp, pp, vpp)
    assert "optimizer" in meta["contents"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_merged_weights_and_logits_equal_the_original(saved, merged_dirs, name):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = merged_dirs[name]
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(os.listdir(merged_dir))
    original_sd = load_file(os.path.join(saved["model_path"], "model.safetensors"))
    merged_sd = load_file(os.path.join(merged_dir, "model.safetensors"))
    assert set(merged_sd) == set(original_sd)
    for key, tensor in original_sd.items():
        assert merged_sd[key].dtype == tensor.dtype and torch.equal(merged_sd[key], tensor), key

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    original = AutoModelForCausalLM.from_pretrained(saved["model_path"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer(PROMPT)["input_ids"] == AutoTokenizer.from_pretrained(saved["model_path"])(PROMPT)["input_ids"]
    batch = tokenizer([PROMPT, "The sum of two numbers is 25."], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, original(**batch).logits, rtol=0, atol=0)


def test_test_operation_compares_with_a_reference(saved, merged_dirs, tmp_path):
    get_merger(
        ModelMergerConfig(operation="test", backend="megatron", local_dir=saved["ckpt"],
                          test_hf_dir=merged_dirs["tp2"])).test()
    other = tmp_path / "other"
    shutil.copytree(saved["model_path"], other)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1.0
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    bad = ModelMergerConfig(operation="test", backend="megatron", local_dir=saved["ckpt"], test_hf_dir=str(other))
    with pytest.raises(AssertionError, match="model.norm.weight: max abs difference"):
        get_merger(bad).test()


def test_bad_inputs_give_clear_errors(saved, tmp_path, capsys):
    from verl.model_merger import main

    def cli_error(local_dir, *extra):
        with pytest.raises(SystemExit) as exc:
            main([
                "merge", "--backend", "megatron", "--local_dir", local_dir, "--target_dir",
                str(tmp_path / "o"), *extra
            ])
        assert exc.value.code == 2
        return capsys.readouterr().err

    step_dir = os.path.dirname(saved["ckpt"])
    err = cli_error(step_dir)
    assert "expected dist_ckpt/" in err and f"did you mean --local_dir {saved['ckpt']}" in err

    fsdp_like = tmp_path / "fsdp_actor"
    fsdp_like.mkdir()
    (fsdp_like / "fsdp_config.json").write_text("{}")
    assert "use --backend fsdp" in cli_error(str(fsdp_like))
    assert "does not exist" in cli_error(str(tmp_path / "nowhere"))

    partial = tmp_path / "partial"
    shutil.copytree(saved["ckpt"], partial)
    os.remove(partial / "huggingface" / "config.json")
    err = cli_error(str(partial))
    assert "no config.json" in err and "--hf_model_config_path" in err
    # the original model's config is the fix
    cfg = ModelMergerConfig(operation="merge",
                            backend="megatron",
                            local_dir=str(partial),
                            target_dir=str(tmp_path / "o2"),
                            hf_model_config_path=saved["model_path"])
    get_merger(cfg).merge_and_save()
    assert os.path.isfile(tmp_path / "o2" / "model.safetensors")

    # an architecture the Megatron converters do not know
    foreign = tmp_path / "foreign_config"
    shutil.copytree(os.path.join(saved["ckpt"], "huggingface"), foreign)
    config = json.loads((foreign / "config.json").read_text())
    config["architectures"] = ["MysteryForCausalLM"]
    (foreign / "config.json").write_text(json.dumps(config))
    err = cli_error(saved["ckpt"], "--hf_model_config_path", str(foreign))
    assert "'MysteryForCausalLM'" in err and "Qwen2ForCausalLM" in err and "register_mcore_model" in err

    # a config of another model size
    config["architectures"] = ["Qwen2ForCausalLM"]
    config["num_hidden_layers"] = 2
    config.pop("layer_types", None)
    (foreign / "config.json").write_text(json.dumps(config))
    err = cli_error(saved["ckpt"], "--hf_model_config_path", str(foreign))
    assert "4 decoder layers" in err and "num_hidden_layers=2" in err

    shutil.rmtree(partial / "dist_ckpt")
    (partial / "dist_ckpt").mkdir()
    assert "incomplete megatron dist checkpoint" in cli_error(str(partial))


def test_unstack_layers_splits_stacked_and_joins_glu_halves():
    stacked = torch.arange(3 * 2 * 4, dtype=torch.float32).reshape(3, 2, 4)
    gate, up = torch.ones(6, 4), torch.zeros(6, 4)
    out = unstack_layers(
        {
            "decoder.layers.self_attention.linear_proj.weight": stacked,
            "decoder.layers.1.mlp.linear_fc1.weight_w": gate,
            "decoder.layers.1.mlp.linear_fc1.weight_v": up,
            "decoder.layers.0.mlp.linear_fc2.weight": gate,
            "decoder.layers.2.mlp.linear_fc2.weight": gate,
            "embedding.word_embeddings.weight": up,
        }, 3)
    for layer in range(3):
        assert torch.equal(out[f"decoder.layers.{layer}.self_attention.linear_proj.weight"], stacked[layer])
    assert torch.equal(out["decoder.layers.1.mlp.linear_fc1.weight"], torch.cat([gate, up]))
    assert "decoder.layers.1.mlp.linear_fc1.weight_w" not in out and "embedding.word_embeddings.weight" in out
    with pytest.raises(ValueError, match="num_hidden_layers=4"):
        unstack_layers({"decoder.layers.final.weight": stacked}, 4)
    with pytest.raises(ValueError, match="num_hidden_layers=4"):
        unstack_layers({"decoder.layers.0.x": gate, "decoder.layers.1.x": gate}, 4)
