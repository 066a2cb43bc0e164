"""verl.models.moe_names on CPU, no engine: the in-memory -> checkpoint converter the FSDP engine syncs (vLLM, SGLang)
apply, for a transformers-5 Mixtral (fused experts) and the identity for dense models; and what the FSDP weight
source streams (names, bytes, bucket bound)."""
from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import torch
from torch import nn

from verl.models.moe_names import (checkpoint_name_converter, mixtral_tensor_to_checkpoint_names,
                                   mixtral_to_checkpoint_names, register_checkpoint_name_converter)
from verl.workers.rollout.sglang_rollout.engine import own_storage
from verl.workers.sharding_manager.fsdp_hf import FSDPWeightSource


def _mixtral() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A small transformers MixtralForCausalLM and its checkpoint as save_pretrained writes it."""
    from safetensors.torch import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=100,
                           hidden_size=64,
                           intermediate_size=32,
                           num_hidden_layers=2,
                           num_attention_heads=4,
                           num_key_value_heads=2,
                           num_local_experts=4,
                           num_experts_per_tok=2,
                           max_position_embeddings=128,
                           architectures=["MixtralForCausalLM"])
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        ckpt = load_file(os.path.join(tmp, "model.safetensors"))
    return model, ckpt


@pytest.fixture(scope="module")
def mixtral() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    return _mixtral()


def _convert_all(convert: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for name, tensor in state.items() for n, t in convert(name, tensor)}


def test_mixtral_in_memory_state_maps_to_the_checkpoint(mixtral):
    model, ckpt = mixtral
    state = model.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state  # transformers 5: fused in memory
    convert = checkpoint_name_converter(model)
    assert convert is mixtral_tensor_to_checkpoint_names
    for source in (model.config, model.config.to_dict()):  # the config (object or dict) chooses the same
        assert checkpoint_name_converter(source) is convert
    out = _convert_all(convert, state)
    assert set(out) == set(ckpt)
    for name, tensor in ckpt.items():
        assert torch.equal(out[name], tensor), name
    whole = mixtral_to_checkpoint_names(state)  # the whole-state-dict form (Megatron's converter) agrees
    assert list(whole) == list(out) and all(whole[k] is out[k] or torch.equal(whole[k], out[k]) for k in out)


def test_split_experts_are_views_so_a_bucket_holds_no_more_bytes(mixtral):
    model, _ = mixtral
    fused = model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    parts = mixtral_tensor_to_checkpoint_names("model.layers.1.mlp.experts.gate_up_proj", fused)
    assert len(parts) == 2 * fused.shape[0]
    assert all(t.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() for _, t in parts)
    assert sum(t.numel() for _, t in parts) == fused.numel()
    # a tensor already in checkpoint naming (transformers 4 kept it in memory) passes through
    name = "model.layers.0.block_sparse_moe.experts.2.w1.weight"
    [(same, tensor)] = mixtral_tensor_to_checkpoint_names(name, fused[0])
    assert same == name and tensor is not None and torch.equal(tensor, fused[0])


def test_dense_models_pass_through_unchanged():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64,
                         hidden_size=32,
                         intermediate_size=64,
                         num_hidden_layers=1,
                         num_attention_heads=2,
                         num_key_value_heads=1)
    model = Qwen2ForCausalLM(config)
    convert = checkpoint_name_converter(model)
    for name, tensor in model.state_dict().items():
        [(same, out)] = convert(name, tensor)
        assert same == name and out is tensor
    for source in (None, nn.Linear(2, 2), config.to_dict()):
        [(same, out)] = checkpoint_name_converter(source)("x", tensor)
        assert same == "x" and out is tensor


def test_other_architectures_register_their_converter():

    def rename(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [("renamed." + name, tensor)]

    register_checkpoint_name_converter("verl_test_moe", rename)
    assert checkpoint_name_converter({"model_type": "verl_test_moe"}) is rename


class _Source(FSDPWeightSource):

    def __init__(self, module: nn.Module, bucket_bytes: int) -> None:
        self.module, self.offload_param, self.bucket_bytes = module, False, bucket_bytes


def test_fsdp_weight_source_streams_checkpoint_names_within_the_bucket_bound(mixtral):
    """What the FSDP -> vLLM / SGLang managers send (the plain-module case of FSDPWeightSource)."""
    model, ckpt = mixtral
    bound = 40_000
    buckets = list(_Source(model, bound)._weight_buckets())
    sent = [name for bucket in buckets for name, _ in bucket]
    assert len(sent) == len(set(sent)) and set(sent) == set(ckpt)
    state = model.state_dict()
    largest = max(t.numel() * t.element_size() for t in state.values())
    sizes = [sum(t.numel() * t.element_size() for _, t in bucket) for bucket in buckets]
    assert len(buckets) > 2 and max(sizes) <= max(bound, largest)
    assert sum(sizes) == sum(t.numel() * t.element_size() for t in state.values())
    for bucket in buckets:
        for name, tensor in bucket:
            assert torch.equal(tensor, ckpt[name]), name


def test_own_storage_copies_views_only():
    fused = torch.randn(4, 6, 3)
    view = fused[1, :3]
    alone = own_storage(view)
    assert torch.equal(alone, view) and alone.untyped_storage().nbytes() == view.numel() * view.element_size()
    plain = torch.randn(3, 3)
    assert own_storage(plain).data_ptr() == plain.data_ptr()  # no copy for a tensor that owns its storage
