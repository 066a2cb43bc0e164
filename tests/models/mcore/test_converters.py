"""HF <-> Megatron-core weight conversion (verl.models.mcore), on CPU.

The layout claims are checked numerically, not only by round trips: each TP rank's shards are used the way Megatron
uses them (its QKV split rule re-implemented from ``megatron/core/transformer/attention.py``, column/row-parallel
matmuls, the vocab-parallel embedding and output layer) and the results compared with the HF modules' outputs.
Tests that need megatron-core itself are skipped with a visible reason when it is not installed.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from verl.models.mcore import (DenseDecoderWeightConverter, McoreLayout, bucket_named_tensors, get_gpt_model_kwargs,
                               get_weight_converter, hf_to_mcore, hf_to_mcore_config, hf_to_mcore_rank,
                               iter_hf_weights_in_buckets, mcore_to_hf, per_tensor_generator, register_mcore_model,
                               supported_architectures)
from verl.models.mcore import registry as mcore_registry

HAS_MCORE = importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None

# ------------------------------------------------------------------------------------------------ models -----


def _build(config: Any, seed: int) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        # HF zero-initialises biases and sets norms to one: randomise them so a mix-up cannot hide
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.normal_()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # as save_pretrained writes a tied model
    return model, sd


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[Any, Any, dict[str, torch.Tensor]]]:
    """name -> (hf_config, hf_model, hf_state_dict)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from verl.models.tiny import get_tiny_model_path

    out = {}
    path = get_tiny_model_path()
    cfg = AutoConfig.from_pretrained(path)
    out["tiny_qwen2"] = (cfg, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                         load_file(os.path.join(path, "model.safetensors")))
    configs = {
        # untied embeddings, as many kv heads as heads (plain MHA)
        "llama_untied":
            LlamaConfig(hidden_size=64,
                        intermediate_size=96,
                        num_hidden_layers=4,
                        num_attention_heads=4,
                        num_key_value_heads=4,
                        vocab_size=256,
                        tie_word_embeddings=False,
                        architectures=["LlamaForCausalLM"]),
        # GQA (8 heads, 2 kv heads), tied, odd vocabulary (padded for TP), biases on every linear layer
        "llama_gqa_tied_bias":
            LlamaConfig(hidden_size=64,
                        intermediate_size=96,
                        num_hidden_layers=2,
                        num_attention_heads=8,
                        num_key_value_heads=2,
                        head_dim=8,
                        vocab_size=250,
                        tie_word_embeddings=True,
                        attention_bias=True,
                        mlp_bias=True,
                        architectures=["LlamaForCausalLM"]),
        # Qwen2 with tied embeddings and a single kv head (MQA: kv heads < TP for every TP > 1)
        "qwen2_tied_mqa":
            Qwen2Config(hidden_size=64,
                        intermediate_size=128,
                        num_hidden_layers=4,
                        num_attention_heads=4,
                        num_key_value_heads=1,
                        vocab_size=200,
                        tie_word_embeddings=True,
                        architectures=["Qwen2ForCausalLM"]),
    }
    for seed, (name, config) in enumerate(configs.items()):
        model, sd = _build(config, seed)
        out[name] = (config, model, sd)
    return out


def _fits(shape: dict[str, int], tp: int, pp: int) -> bool:
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    kv_ok = kv % tp == 0 if kv >= tp else tp % kv == 0
    return heads % tp == 0 and kv_ok and shape["intermediate_size"] % tp == 0 and shape["num_hidden_layers"] % pp == 0


# (tp, pp) x model: every combination whose shapes divide (checked again inside, so a wrong guess fails loudly)
_SHAPES = {
    "tiny_qwen2":
        dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=512, num_hidden_layers=4),
    "llama_untied":
        dict(num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, num_hidden_layers=4),
    "llama_gqa_tied_bias":
        dict(num_attention_heads=8, num_key_value_heads=2, intermediate_size=96, num_hidden_layers=2),
    "qwen2_tied_mqa":
        dict(num_attention_heads=4, num_key_value_heads=1, intermediate_size=128, num_hidden_layers=4),
}
_GRID = [(name, tp, pp) for name, shape in _SHAPES.items() for tp in (1, 2, 4) for pp in (1, 2) if _fits(shape, tp, pp)]


def test_grid_covers_every_split_of_the_tiny_model():
    assert {(tp, pp) for name, tp, pp in _GRID if name == "tiny_qwen2"} == {(t, p) for t in (1, 2, 4) for p in (1, 2)}
    assert len(_GRID) >= 20


# ------------------------------------------------------------------------------------------- round trips -----


@pytest.mark.parametrize("name,tp,pp", _GRID)
def test_hf_mcore_hf_round_trip_is_identity(models, name, tp, pp):
    config, _, sd = models[name]
    assert config.num_hidden_layers == _SHAPES[name]["num_hidden_layers"]
    shards = hf_to_mcore(sd, config, tp_size=tp, pp_size=pp)
    assert sorted(shards) == sorted((t, p) for t in range(tp) for p in range(pp))
    back = mcore_to_hf(shards, config, tp_size=tp, pp_size=pp)
    assert set(back) == set(sd)
    for key, tensor in sd.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize("name", ["tiny_qwen2", "llama_untied", "qwen2_tied_mqa"])
def test_round_trip_with_virtual_pipeline_and_local_layernorm_names(models, name):
    config, _, sd = models[name]
    layout = McoreLayout(tp_size=2, pp_size=2, vpp_size=2, fused_layernorm=False, make_vocab_size_divisible_by=64)
    shards = hf_to_mcore(sd, config, layout)
    assert all(len(chunks) == 2 for chunks in shards.values())
    names = set().union(*(sd_.keys() for chunks in shards.values() for sd_ in chunks))
    assert "decoder.layers.0.input_layernorm.weight" in names and "decoder.layers.0.pre_mlp_layernorm.weight" in names
    assert not any("layer_norm_weight" in n for n in names)
    back = mcore_to_hf(shards, config, layout)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_one_rank_conversion_equals_that_rank_of_the_full_conversion(models):
    config, _, sd = models["tiny_qwen2"]
    layout = McoreLayout(tp_size=4, pp_size=2)
    shards = hf_to_mcore(sd, config, layout)
    for tp_rank, pp_rank in layout.ranks():
        mine = hf_to_mcore_rank(sd, config, tp_rank, pp_rank, layout)
        assert len(mine) == 1 and mine[0].keys() == shards[(tp_rank, pp_rank)][0].keys()
        assert all(torch.equal(v, shards[(tp_rank, pp_rank)][0][k]) for k, v in mine[0].items())


# ------------------------------------------------------------------------------------------------ shapes -----


def test_per_rank_shard_names_and_shapes_tp2_pp2(models):
    config, _, sd = models["tiny_qwen2"]  # hidden 128, 4 heads of 32, 2 kv heads, ffn 512, vocab 640, 4 layers
    tp, pp = 2, 2
    shards = hf_to_mcore(sd, config, tp_size=tp, pp_size=pp)
    h, ffn, vocab, hd = 128, 512, config.vocab_size, 32
    qkv_rows = (4 + 2 * 2) * hd
    per_layer = {
        "self_attention.linear_qkv.layer_norm_weight": (h,),
        "self_attention.linear_qkv.weight": (qkv_rows // tp, h),
        "self_attention.linear_qkv.bias": (qkv_rows // tp,),
        "self_attention.linear_proj.weight": (h, h // tp),
        "mlp.linear_fc1.layer_norm_weight": (h,),
        "mlp.linear_fc1.weight": (2 * ffn // tp, h),
        "mlp.linear_fc2.weight": (h, ffn // tp),
    }
    for (tp_rank, pp_rank), chunks in shards.items():
        got = {k: tuple(v.shape) for k, v in chunks[0].items()}
        want = {f"decoder.layers.{i}.{k}": s for i in range(2) for k, s in per_layer.items()}  # local indices
        if pp_rank == 0:
            want["embedding.word_embeddings.weight"] = (vocab // tp, h)
        else:
            want["decoder.final_layernorm.weight"] = (h,)
            want["output_layer.weight"] = (vocab // tp, h)
        assert got == want, (tp_rank, pp_rank)
    # stage 1 holds global layers 2 and 3 under local indices 0 and 1
    q = sd["model.layers.2.self_attn.q_proj.weight"]
    assert torch.equal(shards[(0, 1)][0]["decoder.layers.0.self_attention.linear_qkv.weight"][:2 * hd], q[:2 * hd])
    norm = sd["model.layers.3.input_layernorm.weight"]
    assert torch.equal(shards[(1, 1)][0]["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"], norm)


def test_tied_embeddings_output_layer_only_on_a_separate_last_stage(models):
    config, _, sd = models["qwen2_tied_mqa"]
    one = hf_to_mcore(sd, config, tp_size=2, pp_size=1)
    assert all("output_layer.weight" not in c[0] for c in one.values())
    two = hf_to_mcore(sd, config, tp_size=2, pp_size=2)
    for tp_rank in range(2):
        first, last = two[(tp_rank, 0)][0], two[(tp_rank, 1)][0]
        assert "output_layer.weight" not in first and "embedding.word_embeddings.weight" not in last
        assert torch.equal(last["output_layer.weight"], first["embedding.word_embeddings.weight"])
    # the last stage's copy is ignored on the way back: HF gets the embedding of the first stage
    two[(0, 1)][0]["output_layer.weight"] = torch.zeros_like(two[(0, 1)][0]["output_layer.weight"])
    back = mcore_to_hf(two, config, tp_size=2, pp_size=2)
    assert "lm_head.weight" not in back and torch.equal(back["model.embed_tokens.weight"],
                                                        sd["model.embed_tokens.weight"])


def test_vocab_is_padded_with_zero_rows_to_a_multiple_of_divisor_times_tp(models):
    config, _, sd = models["llama_gqa_tied_bias"]  # vocab 250
    layout = McoreLayout(tp_size=4, make_vocab_size_divisible_by=8)
    assert layout.padded_vocab_size(250) == 256
    assert McoreLayout(tp_size=4).padded_vocab_size(250) == 252  # divisor 1: only what TP needs
    assert McoreLayout(tp_size=2).padded_vocab_size(250) == 250
    assert get_gpt_model_kwargs(config, layout)["vocab_size"] == 256
    shards = hf_to_mcore(sd, config, layout)
    emb = torch.cat([shards[(t, 0)][0]["embedding.word_embeddings.weight"] for t in range(4)])
    assert emb.shape == (256, 64)
    assert torch.equal(emb[:250], sd["model.embed_tokens.weight"]) and not emb[250:].any()
    back = mcore_to_hf(shards, config, layout)
    assert back["model.embed_tokens.weight"].shape == (250, 64)


def test_layer_ownership_per_stage_and_virtual_chunk():
    lay = McoreLayout(tp_size=1, pp_size=2, vpp_size=2)
    # Megatron's interleaved order: chunk c = vp_stage * pp + pp_rank holds layers [c*n, (c+1)*n)
    assert [list(lay.layer_range(8, p, v)) for v in range(2) for p in range(2)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.layer_owner(8, 5) == (0, 1, 1)
    assert lay.is_first_stage(0, 0) and not lay.is_first_stage(0, 1)
    assert lay.is_last_stage(1, 1) and not lay.is_last_stage(1, 0)
    with pytest.raises(ValueError, match="pipeline_model_parallel_size"):
        lay.layers_per_chunk(6)
    with pytest.raises(ValueError, match="needs pipeline_model_parallel_size > 1"):
        McoreLayout(pp_size=1, vpp_size=2)


# -------------------------------------------------------------------------------------- numerical layout -----


def _megatron_qkv_split(mixed: list[torch.Tensor], rank: int, tp: int, heads: int, groups: int,
                        hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's ``get_query_key_value_tensors`` on TP rank ``rank``: ``mixed[r]`` is ``linear_qkv``'s output on
    rank ``r`` ([..., rows/tp]); returns this rank's (query [.., np, hn], key [.., ng_p, hn], value)."""
    heads_p = heads // tp
    groups_p = 1 if groups < tp else groups // tp
    q_per_group = heads // groups
    x = mixed[rank]
    if groups < tp:  # all-gather, then keep this rank's group
        x = torch.cat(mixed, dim=-1)
        idx, size = rank // (tp // groups), x.shape[-1] // groups
        x = x[..., idx * size:(idx + 1) * size]
    x = x.reshape(*x.shape[:-1], groups_p, (q_per_group + 2) * hd)
    q, k, v = torch.split(x, [q_per_group * hd, hd, hd], dim=-1)
    q = q.reshape(*q.shape[:-2], -1, hd)
    if groups < tp:
        idx = rank % (tp // groups)
        size = heads_p
        q = q[..., idx * size:(idx + 1) * size, :]
    return q, k, v


@pytest.mark.parametrize("name,tp", [("tiny_qwen2", 1), ("tiny_qwen2", 2), ("tiny_qwen2", 4), ("llama_untied", 4),
                                     ("llama_gqa_tied_bias", 2), ("llama_gqa_tied_bias", 4), ("qwen2_tied_mqa", 2),
                                     ("qwen2_tied_mqa", 4)])
def test_fused_qkv_split_by_megatron_rule_gives_hf_q_k_v(models, name, tp):
    config, model, sd = models[name]
    attn = model.model.layers[1].self_attn
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    shards = hf_to_mcore(sd, config, tp_size=tp, pp_size=1)
    x = torch.randn(2, 5, config.hidden_size, generator=torch.Generator().manual_seed(tp))
    mixed = []
    for r in range(tp):
        w = shards[(r, 0)][0]["decoder.layers.1.self_attention.linear_qkv.weight"]
        b = shards[(r, 0)][0].get("decoder.layers.1.self_attention.linear_qkv.bias")
        mixed.append(F.linear(x, w, b))
    with torch.no_grad():
        hf_q = attn.q_proj(x).reshape(2, 5, heads, hd)
        hf_k = attn.k_proj(x).reshape(2, 5, groups, hd)
        hf_v = attn.v_proj(x).reshape(2, 5, groups, hd)
    for r in range(tp):
        q, k, v = _megatron_qkv_split(mixed, r, tp, heads, groups, hd)
        hp = heads // tp
        torch.testing.assert_close(q, hf_q[:, :, r * hp:(r + 1) * hp])
        if groups >= tp:
            gp = groups // tp
            want_k, want_v = hf_k[:, :, r * gp:(r + 1) * gp], hf_v[:, :, r * gp:(r + 1) * gp]
        else:  # the rank's query heads all belong to one kv group
            g = r // (tp // groups)
            want_k, want_v = hf_k[:, :, g:g + 1], hf_v[:, :, g:g + 1]
        torch.testing.assert_close(k, want_k)
        torch.testing.assert_close(v, want_v)


@pytest.mark.parametrize("name,tp", [("tiny_qwen2", 4), ("llama_gqa_tied_bias", 2), ("llama_untied", 2)])
def test_tensor_parallel_mlp_attention_output_embedding_and_logits_match_hf(models, name, tp):
    """Column-parallel fc1 ([gate; up] per rank), row-parallel fc2 / linear_proj (partial sums + replicated bias),
    vocab-parallel embedding lookup and output layer, computed per rank and reduced as Megatron does."""
    config, model, sd = models[name]
    shards = hf_to_mcore(sd, config, tp_size=tp, pp_size=1)
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, config.hidden_size, generator=g)
    ranks = [shards[(r, 0)][0] for r in range(tp)]
    p = "decoder.layers.0."

    mlp = 0
    for sd_r in ranks:
        fc1 = F.linear(x, sd_r[p + "mlp.linear_fc1.weight"], sd_r.get(p + "mlp.linear_fc1.bias"))
        gate, up = torch.chunk(fc1, 2, dim=-1)
        mlp = mlp + F.linear(F.silu(gate) * up, sd_r[p + "mlp.linear_fc2.weight"])
    if p + "mlp.linear_fc2.bias" in ranks[0]:
        mlp = mlp + ranks[0][p + "mlp.linear_fc2.bias"]
    ctx = torch.randn(3,
                      config.num_attention_heads *
                      (config.hidden_size //
                       config.num_attention_heads if not getattr(config, "head_dim", None) else config.head_dim),
                      generator=g)
    proj = sum(
        F.linear(c, sd_r[p + "self_attention.linear_proj.weight"])
        for c, sd_r in zip(torch.chunk(ctx, tp, dim=-1), ranks))
    if p + "self_attention.linear_proj.bias" in ranks[0]:
        proj = proj + ranks[0][p + "self_attention.linear_proj.bias"]
    with torch.no_grad():
        torch.testing.assert_close(mlp, layer.mlp(x))
        torch.testing.assert_close(proj, layer.self_attn.o_proj(ctx))

    ids = torch.randint(0, config.vocab_size, (4, 6), generator=g)
    emb = 0
    for r, sd_r in enumerate(ranks):
        table = sd_r["embedding.word_embeddings.weight"]
        lo = r * table.shape[0]
        local = ids - lo
        mask = (local < 0) | (local >= table.shape[0])
        emb = emb + F.embedding(local.masked_fill(mask, 0), table).masked_fill(mask.unsqueeze(-1), 0.0)
    key = "output_layer.weight" if "output_layer.weight" in ranks[0] else "embedding.word_embeddings.weight"
    logits = torch.cat([F.linear(x, sd_r[key]) for sd_r in ranks], dim=-1)[:, :config.vocab_size]
    with torch.no_grad():
        torch.testing.assert_close(emb, model.model.embed_tokens(ids))
        torch.testing.assert_close(logits, model.lm_head(x))


# ------------------------------------------------------------------------------------ streaming/buckets -----


def test_per_tensor_generator_streams_every_hf_tensor_once_and_buckets_are_bounded(models):
    config, _, sd = models["tiny_qwen2"]
    layout = McoreLayout(tp_size=2, pp_size=2)
    shards = hf_to_mcore(sd, config, layout)
    stream = list(per_tensor_generator(shards, config, layout, dtype=torch.bfloat16))
    names = [n for n, _ in stream]
    assert len(names) == len(set(names)) and set(names) == set(sd)
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"  # stage order
    assert all(t.dtype == torch.bfloat16 for _, t in stream)
    assert all(torch.equal(t, sd[n].to(torch.bfloat16)) for n, t in stream)

    budget = 100_000  # bytes; the embedding (640 x 128 bf16 = 160 KiB) exceeds it and travels alone
    buckets = list(iter_hf_weights_in_buckets(shards, config, layout, bucket_bytes=budget, dtype=torch.bfloat16))
    assert [n for b in buckets for n, _ in b] == names
    for bucket in buckets:
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert size <= budget or len(bucket) == 1
    assert any(len(b) == 1 and b[0][0] == "model.embed_tokens.weight" for b in buckets)
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(bucket_named_tensors(iter([]), 0))


def test_converter_primitives_for_a_distributed_sharding_manager(models):
    config, _, sd = models["tiny_qwen2"]
    conv = get_weight_converter(config, McoreLayout(tp_size=2, pp_size=2))
    assert isinstance(conv, DenseDecoderWeightConverter)
    assert conv.tp_split_dim("decoder.layers.1.self_attention.linear_qkv.weight") == 0
    assert conv.tp_split_dim("decoder.layers.1.self_attention.linear_proj.weight") == 1
    assert conv.tp_split_dim("decoder.layers.1.mlp.linear_fc1.layer_norm_weight") is None
    assert conv.tp_split_dim("output_layer.weight") == 0
    assert conv.to_global_name("decoder.layers.1.mlp.linear_fc2.weight", pp_rank=1) == \
        "decoder.layers.3.mlp.linear_fc2.weight"
    assert conv.to_local_name("decoder.layers.3.mlp.linear_fc2.weight") == (1, 0,
                                                                            "decoder.layers.1.mlp.linear_fc2.weight")
    assert conv.to_local_name("output_layer.weight")[:2] == (1, 0)
    shards = conv.hf_to_mcore_param("decoder.layers.2.mlp.linear_fc1.weight", sd)
    pairs = dict(conv.mcore_to_hf_param("decoder.layers.2.mlp.linear_fc1.weight", shards))
    assert torch.equal(pairs["model.layers.2.mlp.gate_proj.weight"], sd["model.layers.2.mlp.gate_proj.weight"])
    assert torch.equal(pairs["model.layers.2.mlp.up_proj.weight"], sd["model.layers.2.mlp.up_proj.weight"])
    # every rank can list the names of every stage in the same order (to take part in the broadcasts)
    assert conv.mcore_param_names(1, local=False)[0] == "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"


# ------------------------------------------------------------------------------------------------ errors -----


def test_bad_inputs_raise_clear_errors(models):
    config, _, sd = models["tiny_qwen2"]
    with pytest.raises(ValueError, match="tensor_model_parallel_size=8 does not divide num_attention_heads=4"):
        hf_to_mcore(sd, config, tp_size=8)
    with pytest.raises(ValueError, match="num_hidden_layers=4 does not split evenly"):
        hf_to_mcore(sd, config, pp_size=3)
    broken = dict(sd)
    del broken["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        hf_to_mcore(broken, config)
    with pytest.raises(ValueError, match="does not hold"):
        hf_to_mcore({**sd, "model.extra.weight": torch.zeros(1)}, config)
    assert hf_to_mcore({**sd, "model.extra.weight": torch.zeros(1)}, config, strict=False)
    shards = hf_to_mcore(sd, config, tp_size=2)
    with pytest.raises(KeyError, match="missing ranks"):
        mcore_to_hf({(0, 0): shards[(0, 0)]}, config, tp_size=2)
    shards[(1, 0)][0]["decoder.layers.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="does not know"):
        mcore_to_hf(shards, config, tp_size=2)
    with pytest.raises(TypeError, match="either layout"):
        hf_to_mcore(sd, config, McoreLayout(), tp_size=2)


# ---------------------------------------------------------------------------------- registry and config -----


def test_registry_knows_qwen2_and_llama_and_accepts_new_architectures(models):
    assert {"Qwen2ForCausalLM", "LlamaForCausalLM"} <= set(supported_architectures())
    config, _, sd = models["llama_untied"]
    other = type(config).from_dict({**config.to_dict(), "architectures": ["MyLlamaForCausalLM"]})
    with pytest.raises(NotImplementedError, match="MyLlamaForCausalLM.*register_mcore_model"):
        hf_to_mcore(sd, other)
    try:

        @register_mcore_model("MyLlamaForCausalLM")
        def my_config(hf_config, **kwargs):
            return {"num_layers": hf_config.num_hidden_layers, **kwargs}

        assert hf_to_mcore_config(other, ffn_hidden_size=1) == {"num_layers": 4, "ffn_hidden_size": 1}
        back = mcore_to_hf(hf_to_mcore(sd, other, tp_size=2), other, tp_size=2)
        assert all(torch.equal(back[k], sd[k]) for k in sd)
        with pytest.raises(ValueError, match="already registered"):
            register_mcore_model("MyLlamaForCausalLM", my_config)
    finally:
        mcore_registry._REGISTRY.pop("MyLlamaForCausalLM", None)


def test_transformer_config_kwargs_from_hf_config(models):
    qwen, _, _ = models["tiny_qwen2"]
    kw = hf_to_mcore_config(qwen,
                            dtype="bf16",
                            parallel={
                                "tensor_model_parallel_size": 2,
                                "pipeline_model_parallel_size": 2
                            },
                            override_transformer_config={"recompute_granularity": "full"})
    assert kw["num_layers"] == 4 and kw["hidden_size"] == 128 and kw["ffn_hidden_size"] == 512
    assert kw["num_attention_heads"] == 4 and kw["num_query_groups"] == 2 and kw["kv_channels"] == 32
    assert kw["add_qkv_bias"] is True and kw["add_bias_linear"] is False and kw["gated_linear_unit"] is True
    assert kw["normalization"] == "RMSNorm" and kw["activation_func"] is F.silu
    assert kw["layernorm_epsilon"] == qwen.rms_norm_eps and kw["params_dtype"] is torch.bfloat16 and kw["bf16"]
    assert kw["tensor_model_parallel_size"] == 2 and kw["pipeline_model_parallel_size"] == 2
    assert kw["sequence_parallel"] is True and kw["recompute_granularity"] == "full"
    assert hf_to_mcore_config(qwen)["sequence_parallel"] is False  # TP 1: Megatron rejects sequence parallelism

    llama, _, _ = models["llama_gqa_tied_bias"]
    kw = hf_to_mcore_config(llama)
    assert kw["add_qkv_bias"] is True and kw["add_bias_linear"] is True and kw["kv_channels"] == 8
    model_kw = get_gpt_model_kwargs(llama)
    assert model_kw["share_embeddings_and_output_weights"] is True and model_kw["position_embedding_type"] == "rope"

    from transformers import LlamaConfig

    scaled = LlamaConfig(hidden_size=64,
                         num_attention_heads=4,
                         num_hidden_layers=2,
                         intermediate_size=96,
                         architectures=["LlamaForCausalLM"],
                         rope_parameters={
                             "rope_type": "llama3",
                             "rope_theta": 500000.0,
                             "factor": 32.0,
                             "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192
                         })
    model_kw = get_gpt_model_kwargs(scaled)
    assert model_kw["rotary_base"] == 500000.0 and model_kw["rope_scaling"] is True
    assert model_kw["rope_scaling_factor"] == 32.0
    yarn = LlamaConfig(hidden_size=64,
                       num_attention_heads=4,
                       num_hidden_layers=2,
                       intermediate_size=96,
                       architectures=["LlamaForCausalLM"],
                       rope_parameters={
                           "rope_type": "yarn",
                           "rope_theta": 10000.0,
                           "factor": 4.0,
                           "original_max_position_embeddings": 2048
                       })
    with pytest.raises(NotImplementedError, match="yarn"):
        get_gpt_model_kwargs(yarn)
    only_attn_bias = LlamaConfig(hidden_size=64,
                                 num_attention_heads=4,
                                 num_hidden_layers=2,
                                 intermediate_size=96,
                                 attention_bias=True,
                                 mlp_bias=False,
                                 architectures=["LlamaForCausalLM"])
    with pytest.raises(NotImplementedError, match="attention_bias"):
        hf_to_mcore_config(only_attn_bias)


# ------------------------------------------------------------------------------------------- megatron-core -----


def test_build_gpt_model_without_megatron_core_names_the_install_command(models, monkeypatch):
    """megatron-core made unimportable (a None entry in sys.modules), whether or not it is installed."""
    from verl.models.mcore import build_gpt_model

    for mod in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "megatron", None)
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[megatron\]"):
        build_gpt_model(models["tiny_qwen2"][0])


@pytest.mark.skipif(not HAS_MCORE, reason="megatron-core is not installed (pip install -e .[megatron])")
def test_state_dict_matches_a_real_megatron_gpt_model(models, tmp_path):
    """Names and shapes of megatron-core's own GPTModel (local layer spec, TP=PP=1) equal the converter's; it
    loads them strictly; with CUDA, its logits equal the HF model's."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from verl.models.mcore import build_gpt_model, layout_from_transformer_config, make_transformer_config
    from verl.utils.device import is_cuda_available

    config, model, sd = models["tiny_qwen2"]
    owns_pg = not dist.is_initialized()
    if owns_pg:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        tf = make_transformer_config(
            hf_to_mcore_config(config, dtype="fp32", use_cpu_initialization=True, gradient_accumulation_fusion=False))
        mc = build_gpt_model(config, tf, use_transformer_engine=False)
        theirs = {k: v for k, v in mc.state_dict().items() if not k.endswith("_extra_state")}
        mine = hf_to_mcore_rank(sd, config, 0, 0, layout_from_transformer_config(tf, False))[0]
        assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
        missing, unexpected = mc.load_state_dict(mine, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing)
        if is_cuda_available():
            from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(0)
            mc = mc.cuda().eval()
            ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
            pos = torch.arange(16).expand(2, -1)
            with torch.no_grad():
                got = mc(input_ids=ids.cuda(), position_ids=pos.cuda(), attention_mask=None).float().cpu()
                want = model(input_ids=ids).logits
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    finally:
        ps.destroy_model_parallel()
        if owns_pg:
            dist.destroy_process_group()


@pytest.mark.skipif(not HAS_MCORE, reason="megatron-core is not installed (pip install -e .[megatron])")
@pytest.mark.parametrize("name", ["tiny_qwen2", "llama_gqa_tied_bias"])
def test_tp_weights_built_without_init_are_marked_as_megatrons_init_marks_them(models, name, tmp_path):
    """Built without weight init (verl's ``perform_initialization=False``), the TP layers' weights carry the TP
    attributes that megatron's init gives them (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``),
    which its gradient norm reads to count split weights on every TP rank and replicated ones once; they agree with
    the converter's TP split of every parameter."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from verl.models.mcore import build_gpt_model, layout_from_transformer_config, make_transformer_config

    config = models[name][0]
    attrs = ("tensor_model_parallel", "partition_dim", "partition_stride")
    owns_pg = not dist.is_initialized()
    if owns_pg:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        marks = {}
        for init in (True, False):
            tf = make_transformer_config(
                hf_to_mcore_config(config,
                                   dtype="fp32",
                                   use_cpu_initialization=True,
                                   perform_initialization=init,
                                   gradient_accumulation_fusion=False))
            mc = build_gpt_model(config, tf, use_transformer_engine=False)
            marks[init] = {n: tuple(getattr(p, a, None) for a in attrs) for n, p in mc.named_parameters()}
        assert marks[False] == marks[True]
        assert marks[False]["decoder.layers.0.mlp.linear_fc1.weight"] == (True, 0, 2)  # gated: [gate, up] per rank
        converter = get_weight_converter(config, layout_from_transformer_config(tf, False))
        for param, (split, dim, _) in marks[False].items():
            assert (dim if split else None) == converter.tp_split_dim(param), param
    finally:
        ps.destroy_model_parallel()
        if owns_pg:
            dist.destroy_process_group()
