"""Mixtral (MoE) <-> Megatron-core conversion (verl.models.mcore.mixtral), on CPU: config, both HF namings, every
TP x PP (x VPP) x EP split, the expert numbering over EP ranks, and the names/shapes of megatron-core's own MoE
GPTModel. The numerical Megatron-vs-HF check runs in tests/workers/megatron (test_megatron_dist.py)."""
from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from verl.models.mcore import (McoreLayout, MixtralWeightConverter, get_weight_converter, hf_to_mcore,
                               hf_to_mcore_config, hf_to_mcore_rank, mcore_to_hf, mixtral_module_target,
                               mixtral_to_checkpoint_names, mixtral_to_in_memory_names, per_tensor_generator)

HAS_MCORE = importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None


def _config(**overrides: Any) -> Any:
    from transformers import MixtralConfig

    kwargs = dict(vocab_size=100,
                  hidden_size=64,
                  intermediate_size=32,
                  num_hidden_layers=4,
                  num_attention_heads=4,
                  num_key_value_heads=2,
                  num_local_experts=4,
                  num_experts_per_tok=2,
                  max_position_embeddings=128,
                  architectures=["MixtralForCausalLM"])
    kwargs.update(overrides)
    return MixtralConfig(**kwargs)


@pytest.fixture(scope="module")
def mixtral() -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, in-memory state dict, checkpoint state dict as save_pretrained writes it)."""
    import os
    import tempfile

    from safetensors.torch import load_file
    from transformers import MixtralForCausalLM

    config = _config()
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    memory = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        ckpt = load_file(os.path.join(tmp, "model.safetensors"))
    return config, memory, ckpt


def test_both_hf_namings_map_onto_each_other(mixtral):
    config, memory, ckpt = mixtral
    assert any(".block_sparse_moe.experts.3.w2.weight" in k for k in ckpt)  # what engines / checkpoints use
    as_ckpt = mixtral_to_checkpoint_names(memory)
    assert set(as_ckpt) == set(ckpt) and all(torch.equal(as_ckpt[k], ckpt[k]) for k in ckpt)
    as_memory = mixtral_to_in_memory_names(ckpt)
    assert set(as_memory) == set(memory) and all(torch.equal(as_memory[k], memory[k]) for k in memory)
    # one streamed tensor -> its slice of the fused in-memory parameter
    for name, tensor in ckpt.items():
        target = mixtral_module_target(name, config.intermediate_size)
        if target is None:
            assert name in memory
        else:
            assert torch.equal(memory[target[0]][target[1]], tensor), name


LAYOUTS = [
    McoreLayout(),
    McoreLayout(ep_size=2),
    McoreLayout(ep_size=4, fused_layernorm=False),
    McoreLayout(tp_size=2, ep_size=2),
    McoreLayout(tp_size=2, pp_size=2, ep_size=2),
    McoreLayout(pp_size=2, vpp_size=2, ep_size=2),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l.tp_size}pp{l.pp_size}vpp{l.num_chunks}ep{l.ep_size}")
@pytest.mark.parametrize("naming", ["checkpoint", "in_memory"])
def test_hf_mcore_hf_is_the_identity(mixtral, layout, naming):
    config, memory, ckpt = mixtral
    source = ckpt if naming == "checkpoint" else memory
    shards = hf_to_mcore(source, config, layout)
    assert set(shards) == set(layout.ranks())
    back = mcore_to_hf(shards, config, layout)
    assert set(back) == set(ckpt), sorted(set(back) ^ set(ckpt))
    for k, v in ckpt.items():
        assert torch.equal(back[k], v), k
    # the per-rank entry point gives the same shards
    for key in layout.ranks():
        ep_rank = key[2] if len(key) > 2 else 0
        mine = hf_to_mcore_rank(source, config, key[0], key[1], layout, ep_rank=ep_rank)
        assert [sorted(c) for c in mine] == [sorted(c) for c in shards[key]]
        for got, want in zip(mine, shards[key]):
            assert all(torch.equal(got[n], want[n]) for n in want)
    # streamed in the dtype asked for
    streamed = dict(per_tensor_generator(shards, config, layout, dtype=torch.bfloat16))
    assert set(streamed) == set(ckpt) and all(t.dtype == torch.bfloat16 for t in streamed.values())


def test_ep_rank_r_holds_global_experts_r_times_e_over_ep(mixtral):
    """Megatron's numbering: EP rank r's local expert k is global expert r * E/EP + k; experts split over TP like
    the dense MLP ([gate; up] per TP rank, fc2 by columns); the router is replicated."""
    config, _, ckpt = mixtral
    layout = McoreLayout(tp_size=2, ep_size=2, fused_layernorm=False)
    shards = hf_to_mcore(ckpt, config, layout)
    inter = config.intermediate_size
    for tp_rank in range(2):
        for ep_rank in range(2):
            sd = shards[(tp_rank, 0, ep_rank)][0]
            experts = {n for n in sd if ".local_experts." in n}
            assert len(experts) == 4 * 2 * 2  # 4 layers x 2 local experts x (fc1, fc2)
            for local in range(2):
                expert = ep_rank * 2 + local
                src = f"model.layers.1.block_sparse_moe.experts.{expert}."
                fc1 = sd[f"decoder.layers.1.mlp.experts.local_experts.{local}.linear_fc1.weight"]
                rows = slice(tp_rank * inter // 2, (tp_rank + 1) * inter // 2)
                assert torch.equal(fc1, torch.cat([ckpt[src + "w1.weight"][rows], ckpt[src + "w3.weight"][rows]]))
                fc2 = sd[f"decoder.layers.1.mlp.experts.local_experts.{local}.linear_fc2.weight"]
                assert torch.equal(fc2, ckpt[src + "w2.weight"][:, rows])
            assert torch.equal(sd["decoder.layers.1.mlp.router.weight"],
                               ckpt["model.layers.1.block_sparse_moe.gate.weight"])
    conv = get_weight_converter(config, layout)
    assert isinstance(conv, MixtralWeightConverter)
    name = "decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight"
    assert conv.expert_owner(name) == (1, 1)
    assert conv.to_local_name(name) == (0, 0, "decoder.layers.2.mlp.experts.local_experts.1.linear_fc1.weight")
    assert conv.to_global_name("decoder.layers.2.mlp.experts.local_experts.1.linear_fc1.weight", 0, 0, 1) == name
    assert conv.tp_split_dim("decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight") == 1
    assert conv.tp_split_dim("decoder.layers.0.mlp.router.weight") is None


def test_config_reproduces_hf_routing_and_refuses_what_megatron_cannot_express():
    kwargs = hf_to_mcore_config(_config(), dtype="fp32", parallel={"expert_model_parallel_size": 2})
    assert kwargs["num_moe_experts"] == 4 and kwargs["moe_router_topk"] == 2 and kwargs["moe_ffn_hidden_size"] == 32
    assert kwargs["moe_router_score_function"] == "softmax" and kwargs["moe_router_pre_softmax"] is False
    assert kwargs["moe_grouped_gemm"] is False and kwargs["expert_model_parallel_size"] == 2
    assert kwargs["moe_token_dispatcher_type"] == "alltoall" and kwargs["variable_seq_lengths"] is True
    # HF adds the aux loss only with output_router_logits
    assert kwargs["moe_aux_loss_coeff"] == 0.0 and kwargs["moe_router_load_balancing_type"] == "none"
    aux = hf_to_mcore_config(_config(output_router_logits=True, router_aux_loss_coef=0.02))
    assert aux["moe_aux_loss_coeff"] == 0.02 and aux["moe_router_load_balancing_type"] == "aux_loss"
    with pytest.raises(NotImplementedError, match="sliding_window"):
        hf_to_mcore_config(_config(sliding_window=64))
    with pytest.raises(NotImplementedError, match="router_jitter_noise"):
        hf_to_mcore_config(_config(router_jitter_noise=0.1))
    with pytest.raises(NotImplementedError, match="num_experts_per_tok=1"):
        hf_to_mcore_config(_config(num_experts_per_tok=1))
    with pytest.raises(ValueError, match="expert_model_parallel_size=3 does not divide"):
        hf_to_mcore_config(_config(), parallel={"expert_model_parallel_size": 3})
    with pytest.raises(ValueError, match="expert_model_parallel_size=3 does not divide the 4 experts"):
        get_weight_converter(_config(), McoreLayout(ep_size=3))


def test_megatron_routing_settings_equal_hf_mixtral_routing():
    """megatron-core's top-k of the logits then softmax over the k == HF's softmax over all, top-k, renormalise."""
    if not HAS_MCORE:
        pytest.skip("megatron-core is not installed (pip install -e .[megatron])")
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    probs, routing_map = topk_routing_with_score_function(logits, 2, use_pre_softmax=False, score_function="softmax")
    hf = torch.softmax(logits, dim=-1)
    top, idx = torch.topk(hf, 2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    want = torch.zeros_like(hf).scatter(1, idx, top)
    torch.testing.assert_close(probs, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(routing_map, want > 0)


def test_dense_models_refuse_expert_parallelism():
    from transformers import Qwen2Config

    cfg = Qwen2Config(vocab_size=64,
                      hidden_size=32,
                      intermediate_size=64,
                      num_hidden_layers=2,
                      num_attention_heads=4,
                      num_key_value_heads=2,
                      architectures=["Qwen2ForCausalLM"])
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        get_weight_converter(cfg, McoreLayout(ep_size=2))


@pytest.mark.skipif(not HAS_MCORE, reason="megatron-core is not installed (pip install -e .[megatron])")
def test_state_dict_matches_a_real_megatron_moe_model(mixtral, tmp_path):
    """Names and shapes of megatron-core's own MoE GPTModel (local spec, SequentialMLP, TP=PP=EP=1) equal the
    converter's; it loads them strictly and its logits equal the HF model's (CPU, float32)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from transformers import MixtralForCausalLM

    from verl.models.mcore import build_gpt_model, layout_from_transformer_config, make_transformer_config
    from verl.utils.megatron_cpu import device_scope

    config, memory, ckpt = mixtral
    owns_pg = not dist.is_initialized()
    if owns_pg:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with device_scope():
            ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
            model_parallel_cuda_manual_seed(0)
            tf = make_transformer_config(
                hf_to_mcore_config(config,
                                   dtype="fp32",
                                   use_cpu_initialization=True,
                                   gradient_accumulation_fusion=False,
                                   bias_activation_fusion=False,
                                   masked_softmax_fusion=False))
            mc = build_gpt_model(config, tf, use_transformer_engine=False).eval()
            theirs = {k: v for k, v in mc.state_dict().items() if not k.endswith("_extra_state")}
            mine = hf_to_mcore_rank(ckpt, config, 0, 0, layout_from_transformer_config(tf, False))[0]
            assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
            missing, unexpected = mc.load_state_dict(mine, strict=False)
            assert not unexpected and all(k.endswith("_extra_state") for k in missing)
            ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
            pos = torch.arange(12).expand(2, -1)
            mask = ~torch.ones(12, 12, dtype=torch.bool).tril()[None, None]
            with torch.no_grad():
                got = mc(input_ids=ids, position_ids=pos, attention_mask=mask).float()
        hf = MixtralForCausalLM(config).eval()
        hf.load_state_dict(memory)
        with torch.no_grad():
            want = hf(input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    finally:
        ps.destroy_model_parallel()
        if owns_pg:
            dist.destroy_process_group()
