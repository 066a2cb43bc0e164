"""DataParallelPPOCritic on a tiny Qwen2 value model: values equal the plain HF computation on every path (and under
FSDP2 on 2 ranks), the update is invariant to micro-batching and to the number of ranks, value clipping is reported,
and the critic learns a constant return."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from transformers import AutoModelForTokenClassification, Qwen2Config

from verl.protocol import DataProto
from verl.utils.fsdp_utils import apply_fsdp2, create_device_mesh, get_full_state_dict
from verl.workers.critic import DataParallelPPOCritic

PROMPT, RESPONSE, VOCAB = 6, 5, 200


def _model(seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB,
                         hidden_size=64,
                         intermediate_size=128,
                         num_hidden_layers=2,
                         num_attention_heads=4,
                         num_key_value_heads=2,
                         max_position_embeddings=128,
                         num_labels=1,
                         classifier_dropout=0.0)
    return AutoModelForTokenClassification.from_config(config, attn_implementation="sdpa")


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, VOCAB, (n, PROMPT), generator=g)
    responses = torch.randint(1, VOCAB, (n, RESPONSE), generator=g)
    prompt_mask = torch.ones(n, PROMPT, dtype=torch.long)
    response_mask = torch.zeros(n, RESPONSE, dtype=torch.long)
    for i in range(n):
        prompt_mask[i, :int(torch.randint(0, PROMPT - 1, (1,), generator=g))] = 0
        response_mask[i, :int(torch.randint(1, RESPONSE + 1, (1,), generator=g))] = 1
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    return DataProto.from_dict(
        tensors={
            "responses": responses * response_mask,
            "input_ids": torch.cat([prompts * prompt_mask, responses * response_mask], dim=1),
            "attention_mask": attention_mask,
            "position_ids": torch.clamp(attention_mask.cumsum(-1) - 1, min=0),
            "response_mask": response_mask,
        })


def _config(**overrides):
    base = {
        "ppo_mini_batch_size": 8,
        "ppo_micro_batch_size_per_gpu": 8,
        "use_dynamic_bsz": False,
        "ppo_max_token_len_per_gpu": 24,
        "ppo_epochs": 1,
        "shuffle": False,
        "grad_clip": 1.0,
        "cliprange_value": 0.5,
        "loss_agg_mode": "token-mean",
        "use_remove_padding": False,
    }
    base.update(overrides)
    return OmegaConf.create(base)


def _hf_values(model, data):
    b = data.batch
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])
    return out.logits[:, PROMPT - 1:-1, 0] * b["response_mask"]


def test_compute_values_matches_hf_on_every_path():
    model = _model()
    data = _batch()
    expected = _hf_values(model, data)
    for rmpad in (False, True):
        critic = DataParallelPPOCritic(_config(use_remove_padding=rmpad), model)
        for meta in ({"micro_batch_size": 3}, {"use_dynamic_bsz": True, "max_token_len": 20}):
            d = copy.copy(data)
            d.meta_info = meta
            values = critic.compute_values(d)
            assert values.shape == (8, RESPONSE)
            torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)


def _with_values_and_returns(data, returns=1.0):
    data.meta_info["micro_batch_size"] = 8
    data.batch["values"] = DataParallelPPOCritic(_config(), _model()).compute_values(data)
    data.batch["returns"] = torch.full_like(data.batch["values"], returns) * data.batch["response_mask"]
    return data


def test_update_is_invariant_to_micro_batching_and_reports_clipping():
    data = _with_values_and_returns(_batch(seed=1))
    data.batch["values"] = data.batch["values"] - 1.0  # stale values: the clipped term is active
    params = []
    for variant in (dict(), dict(ppo_micro_batch_size_per_gpu=3,
                                 use_remove_padding=True), dict(use_dynamic_bsz=True, ppo_max_token_len_per_gpu=14)):
        model = _model()
        critic = DataParallelPPOCritic(_config(ppo_mini_batch_size=4, ppo_epochs=2, **variant), model,
                                       torch.optim.SGD(model.parameters(), lr=0.3))
        metrics = critic.update_critic(data)
        assert len(metrics["critic/grad_norm"]) == 4 and metrics["critic/skipped_steps"] == [0.0]
        assert max(metrics["critic/vf_clipfrac"]) > 0
        assert {"critic/vf_loss", "critic/vpred_mean"} <= set(metrics)
        params.append([p.detach().clone() for p in model.parameters()])
    for other in params[1:]:
        for a, b in zip(params[0], other):
            torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


def test_critic_learns_constant_return():
    model = _model()
    critic = DataParallelPPOCritic(_config(use_remove_padding=True, cliprange_value=10.0), model,
                                   torch.optim.AdamW(model.parameters(), lr=3e-3))
    data = _batch(seed=2)
    data.meta_info["micro_batch_size"] = 8
    mask = data.batch["response_mask"].float()
    losses = []
    for _ in range(20):
        data.batch["values"] = critic.compute_values(data)
        data.batch["returns"] = torch.full_like(mask, 2.0) * mask
        losses.append(critic.update_critic(data)["critic/vf_loss"][0])
    values = critic.compute_values(data)
    assert losses[-1] < 0.05 * losses[0], losses
    assert float(((values - 2.0).abs() * mask).sum() / mask.sum()) < 0.2


def test_nonfinite_return_skips_step_and_clear_errors():
    data = _with_values_and_returns(_batch(seed=3))
    data.batch["returns"][0, 0] = float("inf")
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    metrics = DataParallelPPOCritic(_config(), model, torch.optim.SGD(model.parameters(), lr=0.1)).update_critic(data)
    assert metrics["critic/skipped_steps"] == [1.0]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(KeyError, match="returns"):
        DataParallelPPOCritic(_config(), model, torch.optim.SGD(model.parameters(), lr=0.1)).update_critic(_batch())
    with pytest.raises(KeyError, match="micro_batch_size"):
        DataParallelPPOCritic(_config(), model).compute_values(_batch())


# ------------------------------------------------------------------------------------------- 2 ranks, FSDP2 -----
WORLD = 2


def _fsdp_critic_worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ["VERL_DEVICE"] = "cpu"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        full = _with_values_and_returns(_batch(seed=4), returns=0.5)
        half = full.slice(rank * 4, rank * 4 + 4)
        mesh = create_device_mesh(WORLD, -1)
        model = apply_fsdp2(_model(), mesh)
        critic = DataParallelPPOCritic(
            _config(ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=3, use_remove_padding=True), model,
            torch.optim.SGD(model.parameters(), lr=0.3))
        half.meta_info = {"use_dynamic_bsz": True, "max_token_len": 16 + 4 * rank}
        torch.testing.assert_close(critic.compute_values(half), _hf_values(_model(), half), atol=1e-5, rtol=1e-5)
        critic.update_critic(half)
        reference = _model()
        DataParallelPPOCritic(_config(), reference, torch.optim.SGD(reference.parameters(), lr=0.3)).update_critic(full)
        state = get_full_state_dict(model)
        for name, value in reference.named_parameters():
            torch.testing.assert_close(state[name], value.detach(), atol=2e-5, rtol=1e-4, msg=name)
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_ranks_match_single_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_critic_worker, args=(port,), nprocs=WORLD, join=True)
