"""Single-process pieces of the Megatron backend: the attention mask, vocab-parallel log-probs (TP=1), the lr
schedule on a megatron-style optimizer, the storage-level offload, the CPU device scope and the dispatch flags."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from verl.utils.megatron_utils import (MegatronLRScheduler, MegatronParallelInfo, causal_padding_mask,
                                       load_megatron_model, load_megatron_optimizer, offload_megatron_model,
                                       offload_megatron_optimizer, vocab_parallel_log_probs)


def test_causal_padding_mask_allows_only_earlier_valid_keys():
    am = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    masked = causal_padding_mask(am)[:, 0]
    allowed = ~masked
    assert torch.equal(allowed[1], torch.ones(4, 4, dtype=torch.bool).tril())
    # row 0: queries attend to keys 1..i only (plus their own position so no softmax row is empty)
    assert allowed[0, 2].tolist() == [False, True, True, False]
    assert allowed[0, 0].tolist() == [True, False, False, False]


def test_vocab_parallel_log_probs_match_log_softmax_and_ignore_padding_vocab():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 12, generator=g, requires_grad=True)
    labels = torch.randint(0, 10, (3, 5), generator=g)
    lp, ent = vocab_parallel_log_probs(logits, labels, vocab_size=10, calculate_entropy=True)
    ref = torch.log_softmax(logits[..., :10], dim=-1)
    assert torch.allclose(lp, ref.gather(-1, labels[..., None]).squeeze(-1), atol=1e-6)
    assert torch.allclose(ent, -(ref.exp() * ref).sum(-1), atol=1e-5)
    lp.sum().backward()
    assert logits.grad[..., 10:].abs().sum() == 0


def test_vocab_parallel_metrics_only_entropy_is_the_same_without_a_graph(monkeypatch):
    """entropy_grad=False (the update with entropy_coeff=0): same log-probs, log-prob gradient and entropy values;
    the entropy carries no graph (its sum(p * z) is taken in chunks, here 3 rows at a time)."""
    import verl.utils.megatron_utils as mu

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 12, generator=g, requires_grad=True)
    labels = torch.randint(0, 10, (2, 4), generator=g)
    lp, ent = vocab_parallel_log_probs(logits, labels, vocab_size=10, calculate_entropy=True)
    (grad,) = torch.autograd.grad(lp.sum(), logits)
    original = mu._sum_exp_times_logits_in_chunks
    monkeypatch.setattr(mu, "_sum_exp_times_logits_in_chunks", lambda e, z: original(e, z, chunk_rows=3))
    lp2, ent2 = vocab_parallel_log_probs(logits, labels, vocab_size=10, calculate_entropy=True, entropy_grad=False)
    assert not ent2.requires_grad and lp2.requires_grad
    (grad2,) = torch.autograd.grad(lp2.sum(), logits)
    torch.testing.assert_close(lp2, lp)
    torch.testing.assert_close(ent2, ent.detach())
    torch.testing.assert_close(grad2, grad)


class _FakeMegatronOptimizer:
    """Megatron optimizers are not torch Optimizers but expose param_groups."""

    def __init__(self):
        self.param_groups = [{"lr": 0.0}, {"lr": 0.0}]


def test_lr_scheduler_warms_up_then_decays_and_restores():
    opt = _FakeMegatronOptimizer()
    cfg = {"lr": 1.0, "lr_warmup_steps": 2, "lr_scheduler_type": "cosine", "total_training_steps": 6}
    sched = MegatronLRScheduler(opt, cfg)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(6):
        sched.step()
        lrs.append(opt.param_groups[1]["lr"])
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[3] < 1.0 and lrs[-1] == pytest.approx(0.0, abs=1e-9)
    other = MegatronLRScheduler(_FakeMegatronOptimizer(), cfg)
    other.load_state_dict(sched.state_dict())
    assert other.get_last_lr() == sched.get_last_lr()
    with pytest.raises(ValueError, match="total_training_steps"):
        MegatronLRScheduler(opt, {"lr": 1.0, "lr_scheduler_type": "cosine"})


def test_offload_frees_storage_and_restores_values_in_place():
    model = torch.nn.Linear(4, 3)
    weight = model.weight
    before = weight.detach().clone()
    store: dict = {}
    offload_megatron_model([model], store)
    assert weight.untyped_storage().size() == 0
    load_megatron_model([model], store)
    assert model.weight is weight and torch.equal(weight, before) and not store

    class Inner:

        def __init__(self):
            p = torch.nn.Parameter(torch.ones(3))
            self.optimizer = torch.optim.AdamW([p])
            p.grad = torch.ones(3)
            self.optimizer.step()

    opt = Inner()
    state = next(iter(opt.optimizer.state.values()))
    avg = state["exp_avg"].clone()
    offload_megatron_optimizer(opt, store)
    assert state["exp_avg"].untyped_storage().size() == 0
    load_megatron_optimizer(opt, store)
    assert torch.equal(state["exp_avg"], avg)


def test_only_tp0_of_the_last_stage_is_collected():
    flags = {(t, p): MegatronParallelInfo(t, 2, p, 2, 0, 1).is_collect for t in range(2) for p in range(2)}
    assert flags == {(0, 0): False, (1, 0): False, (0, 1): True, (1, 1): False}


def test_only_cp_rank_0_of_a_data_parallel_group_is_collected():
    flags = [MegatronParallelInfo(0, 1, 0, 1, 0, 1, cp_rank=c, cp_size=2).is_collect for c in range(2)]
    assert flags == [True, False]


def test_context_parallel_layout_is_megatrons_rotary_layout_and_the_mask_rows_are_the_full_masks():
    from verl.models.mcore.cp_attention import cp_causal_padding_mask, cp_local_index, cp_padded_length

    assert cp_padded_length(11, 2) == 12 and cp_padded_length(12, 2) == 12 and cp_padded_length(11, 2, 2) == 16
    # 2 * CP chunks, rank r holds chunks r and 2 CP - 1 - r (megatron's get_pos_emb_on_this_cp_rank)
    assert cp_local_index(8, 2, 0).tolist() == [0, 1, 6, 7] and cp_local_index(8, 2, 1).tolist() == [2, 3, 4, 5]
    held = torch.cat([cp_local_index(12, 3, r) for r in range(3)])
    assert sorted(held.tolist()) == list(range(12))
    with pytest.raises(ValueError, match="multiple of 2"):
        cp_local_index(10, 3, 0)
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    full = causal_padding_mask(attention_mask)
    for r in range(2):
        index = cp_local_index(8, 2, r)
        assert torch.equal(cp_causal_padding_mask(attention_mask, index), full[:, :, index])


@pytest.mark.skipif(importlib.util.find_spec("megatron.core") is None, reason="megatron-core is not installed")
def test_megatron_rotary_positions_per_cp_rank_are_the_tokens_cp_local_index_picks():
    """The rope table megatron slices for a CP rank holds the positions of the tokens this backend feeds it (on CPU
    only through device_scope: megatron builds the index with pin_memory=True)."""
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    from verl.models.mcore.cp_attention import cp_local_index
    from verl.utils.megatron_cpu import device_scope

    class Group:

        def __init__(self, rank):
            self._rank = rank

        def size(self):
            return 2

        def rank(self):
            return self._rank

    table = torch.arange(12.0).view(12, 1, 1, 1)
    for r in range(2):
        with device_scope():
            sliced = get_pos_emb_on_this_cp_rank(table, 0, Group(r))
        assert sliced.flatten().long().tolist() == cp_local_index(12, 2, r).tolist()


def test_context_parallelism_is_allowed_with_tp_or_pp_and_refused_with_both_or_with_ep():
    from verl.utils.megatron_utils import check_context_parallel_supported

    check_context_parallel_supported({"context_parallel_size": 2}, "x")
    check_context_parallel_supported({"context_parallel_size": 1, "tensor_model_parallel_size": 2}, "x")
    check_context_parallel_supported({"context_parallel_size": 2, "tensor_model_parallel_size": 2}, "x")
    check_context_parallel_supported(
        {
            "context_parallel_size": 2,
            "pipeline_model_parallel_size": 2,
            "virtual_pipeline_model_parallel_size": 2
        }, "x")
    with pytest.raises(NotImplementedError,
                       match=r"x.context_parallel_size=2 together with x.expert_model_parallel_size=2"):
        check_context_parallel_supported({"context_parallel_size": 2, "expert_model_parallel_size": 2}, "x")
    with pytest.raises(NotImplementedError,
                       match=r"x.context_parallel_size=2 together with x.tensor_model_parallel_size=2 and "
                       r"x.pipeline_model_parallel_size=2 is not supported yet .* set one of them to 1"):
        check_context_parallel_supported(
            {
                "context_parallel_size": 2,
                "tensor_model_parallel_size": 2,
                "pipeline_model_parallel_size": 2
            }, "x")


@pytest.mark.skipif(importlib.util.find_spec("megatron.core") is None, reason="megatron-core is not installed")
def test_device_scope_redirects_cuda_placement_on_cpu():
    from verl.utils.device import is_cuda_available
    from verl.utils.megatron_cpu import device_scope

    if is_cuda_available():
        pytest.skip("the scope is a no-op with CUDA")
    with device_scope():
        t = torch.zeros(2, device="cuda")
        assert t.device.type == "cpu" and t.type() == "torch.cuda.FloatTensor" and t.cuda() is t
        assert torch.cuda.current_device() == "cpu"
    assert torch.zeros(1).type() == "torch.FloatTensor"


@pytest.mark.skipif(importlib.util.find_spec("megatron.core") is None, reason="megatron-core is not installed")
def test_bf16_config_on_cuda_without_the_fused_softmax_kernel_uses_the_unfused_softmax_mocked_cuda(monkeypatch):
    """megatron's fused masked softmax imports the compiled ``scaled_masked_softmax_cuda`` (Apex / Megatron kernels)
    for bf16 attention: without it a bf16 run on a GPU crashed in its first forward. CUDA is mocked here (this machine
    has none); the real bf16 GPU run is in docs/megatron.md."""
    from transformers import AutoConfig

    from verl.models.tiny import get_tiny_model_path
    from verl.utils import megatron_utils

    monkeypatch.setattr(megatron_utils, "is_cuda_available", lambda: True)
    hf_config = AutoConfig.from_pretrained(get_tiny_model_path())
    cfg = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "sequence_parallel": False}
    kernel = importlib.util.find_spec("scaled_masked_softmax_cuda") is not None
    tf_config = megatron_utils._transformer_config(hf_config, cfg, torch.bfloat16)
    assert tf_config.masked_softmax_fusion is kernel
    assert tf_config.bias_activation_fusion  # a torch-jit fusion: kept on CUDA
    monkeypatch.setattr(megatron_utils, "is_cuda_available", lambda: False)
    assert not megatron_utils._transformer_config(hf_config, cfg, torch.bfloat16).masked_softmax_fusion


@pytest.mark.skipif(importlib.util.find_spec("megatron.core") is None, reason="megatron-core is not installed")
def test_sequence_parallelism_is_turned_off_with_context_parallelism_without_transformer_engine(monkeypatch):
    """With Apex norms but no Transformer Engine sequence parallelism would run under the CP attention of the local
    spec, a combination never tested: it is turned off (same results), and kept with CP = 1."""
    from transformers import AutoConfig

    from verl.models.tiny import get_tiny_model_path
    from verl.utils import megatron_utils

    monkeypatch.setattr(megatron_utils, "_fused_norm_available", lambda: True)  # as with Apex
    monkeypatch.setattr(megatron_utils, "_module_available", lambda name: name != "transformer_engine")
    hf_config = AutoConfig.from_pretrained(get_tiny_model_path())
    cfg = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1, "sequence_parallel": True}
    assert megatron_utils._transformer_config(hf_config, cfg, torch.float32).sequence_parallel
    cfg["context_parallel_size"] = 2
    assert not megatron_utils._transformer_config(hf_config, cfg, torch.float32).sequence_parallel
