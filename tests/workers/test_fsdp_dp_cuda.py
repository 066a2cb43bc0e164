"""The FSDP2 actor/critic compute core on 2 CUDA GPUs with NCCL (skipped without them): bf16 mixed precision,
meta-device init + broadcast load, 2-rank update == 1-rank update, parameter / optimizer offload round trips and
FSDP2's CPU offload policy (gathers and the gradient norm over host-resident shards)."""
import copy
import datetime
import os
import socket
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, Qwen2Config

from verl.protocol import DataProto
from verl.utils.fsdp_utils import (apply_fsdp2, clip_grad_norm_, create_device_mesh, fsdp2_load_full_state_dict,
                                   get_full_state_dict, get_init_weight_context_manager, get_mixed_precision_policy,
                                   get_offload_policy, iter_full_params_in_buckets, load_fsdp_model_to_gpu,
                                   load_fsdp_optimizer, offload_fsdp_model_to_cpu, offload_fsdp_optimizer)
from verl.workers.actor import DataParallelPPOActor
from verl.workers.critic import DataParallelPPOCritic

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs")

WORLD, PROMPT, RESPONSE, VOCAB = 2, 16, 12, 512


def _qwen2(value=False, seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB,
                         hidden_size=128,
                         intermediate_size=256,
                         num_hidden_layers=2,
                         num_attention_heads=4,
                         num_key_value_heads=2,
                         max_position_embeddings=256,
                         num_labels=1,
                         classifier_dropout=0.0)
    cls = AutoModelForTokenClassification if value else AutoModelForCausalLM
    return cls.from_config(config, attn_implementation="sdpa")


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
    scores = torch.randn(n, generator=g)
    return DataProto.from_dict(
        tensors={
            "responses": responses * response_mask,
            "input_ids": torch.cat([prompts * prompt_mask, responses * response_mask], dim=1),
            "attention_mask": attention_mask,
            "position_ids": torch.clamp(attention_mask.cumsum(-1) - 1, min=0),
            "response_mask": response_mask,
            "advantages": 3 * ((scores - scores.mean()) / scores.std())[:, None] * response_mask,
        })


def _actor_config(**kw):
    base = dict(ppo_mini_batch_size=8,
                ppo_micro_batch_size_per_gpu=8,
                use_dynamic_bsz=False,
                ppo_max_token_len_per_gpu=64,
                clip_ratio=0.2,
                entropy_coeff=0.01,
                use_kl_loss=False,
                loss_agg_mode="token-mean",
                ppo_epochs=2,
                shuffle=False,
                grad_clip=1.0,
                use_remove_padding=True,
                policy_loss={"loss_mode": "vanilla"})
    base.update(kw)
    return OmegaConf.create(base)


def _hf_log_probs(model, data):
    b = data.batch.to("cuda")
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits[:, PROMPT - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, b["responses"].unsqueeze(-1)).squeeze(-1)


def _sharded(reference_cpu, rank, mesh, **kw):
    with get_init_weight_context_manager(use_meta_tensor=True, rank=rank):
        model = type(reference_cpu)(reference_cpu.config)
    apply_fsdp2(model, mesh, **kw)
    fsdp2_load_full_state_dict(model, reference_cpu.state_dict() if rank == 0 else None)
    return model


def _worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _checks(rank)
    except BaseException:
        # exit at once: a rank that waited in destroy_process_group for its stuck peer would hang the test
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


def _checks(rank):
    mesh = create_device_mesh(WORLD, -1)
    assert mesh.device_type == "cuda"
    reference_cpu = _qwen2()
    reference = copy.deepcopy(reference_cpu).cuda()
    full = _batch()
    half = full.slice(rank * 4, rank * 4 + 4)
    mask = half.batch["response_mask"].bool().cuda()
    expected = _hf_log_probs(reference, half)

    # bf16 compute (default policy on CUDA) over fp32 shards, meta-init + broadcast load
    mixed = _sharded(reference_cpu, rank, mesh)
    assert get_mixed_precision_policy().param_dtype is torch.bfloat16
    actor = DataParallelPPOActor(_actor_config(), mixed)
    for meta in ({"micro_batch_size": 3}, {"use_dynamic_bsz": True, "max_token_len": 40 + 8 * rank}):
        d = copy.copy(half)
        d.meta_info = meta
        lp, _ = actor.compute_log_prob(d)
        err = (lp[mask] - expected[mask]).abs().max().item()
        assert err < 0.1, err
        print(f"[rank {rank}] bf16 log-prob max abs error vs fp32 HF: {err:.4f} ({meta})", flush=True)

    # fp32: 2 ranks x half the batch == 1 rank x all of it (mini-batch k = rows 2k, 2k+1 of each half)
    fp32 = get_mixed_precision_policy(param_dtype="fp32")
    d = copy.copy(full)
    d.meta_info = {"micro_batch_size": 8}
    old, _ = DataParallelPPOActor(_actor_config(), reference).compute_log_prob(d)
    full.batch["old_log_probs"] = old.cpu()
    half = full.slice(rank * 4, rank * 4 + 4)
    ref_model = copy.deepcopy(reference)
    DataParallelPPOActor(_actor_config(ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=4), ref_model,
                         torch.optim.SGD(ref_model.parameters(),
                                         lr=0.5)).update_policy(full.select_idxs([0, 1, 4, 5, 2, 3, 6, 7]))
    model = _sharded(reference_cpu, rank, mesh, mp_policy=fp32)
    actor = DataParallelPPOActor(_actor_config(ppo_mini_batch_size=2, use_dynamic_bsz=True), model,
                                 torch.optim.SGD(model.parameters(), lr=0.5))
    metrics = actor.update_policy(half)
    state = get_full_state_dict(model)
    worst = max((state[n] - p.detach().cpu()).abs().max().item() for n, p in ref_model.named_parameters())
    assert worst < 1e-4, worst
    print(
        f"[rank {rank}] 2-rank vs 1-rank update: max param diff {worst:.2e}; metrics "
        f"{ {k: round(v[0], 4) for k, v in metrics.items()} }",
        flush=True)

    print(f"[rank {rank}] parameter / optimizer offload", flush=True)
    # parameter / optimizer offload round trip does not change training
    results = []
    for offload in (False, True):
        m = _sharded(reference_cpu, rank, mesh, mp_policy=fp32)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        a = DataParallelPPOActor(_actor_config(ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2), m, opt)
        for _ in range(2):
            a.update_policy(half)
            if offload:
                offload_fsdp_model_to_cpu(m)
                offload_fsdp_optimizer(opt)
                assert all(p.to_local().device.type == "cpu" for p in m.parameters())
                assert all(v.device.type == "cpu" for s in opt.state.values() for v in s.values() if v.dim() > 0)
                load_fsdp_model_to_gpu(m)
                load_fsdp_optimizer(opt)
                assert all(p.to_local().device.type == "cuda" for p in m.parameters())
        results.append(get_full_state_dict(m))
    worst = max((results[0][k] - results[1][k]).abs().max().item() for k in results[0])
    assert worst < 1e-6, worst

    print(f"[rank {rank}] CPU offload policy", flush=True)
    # FSDP2 CPU offload policy: shards live on the host, compute on the GPU
    offloaded = _sharded(reference_cpu, rank, mesh, mp_policy=fp32, offload_policy=get_offload_policy(True))
    assert all(p.to_local().device.type == "cpu" for p in offloaded.parameters())
    on_gpu = _sharded(reference_cpu, rank, mesh, mp_policy=fp32)
    ids = full.batch["input_ids"][:2].cuda()
    for m in (offloaded, on_gpu):
        m(input_ids=ids).logits.float().pow(2).mean().backward()
    n1 = clip_grad_norm_(offloaded.parameters(), max_norm=None)
    n2 = clip_grad_norm_(on_gpu.parameters(), max_norm=None)
    assert torch.isfinite(n1) and abs(n1.item() - n2.item()) < 1e-4 * n2.item(), (n1, n2)
    for bucket in iter_full_params_in_buckets(offloaded, bucket_bytes=1 << 20):
        for name, tensor in bucket:
            assert torch.equal(tensor.cpu(), reference_cpu.state_dict()[name]), name

    print(f"[rank {rank}] critic", flush=True)
    # critic: bf16 values close to the fp32 HF values
    value_cpu = _qwen2(value=True)
    critic = DataParallelPPOCritic(OmegaConf.create({"use_remove_padding": True}), _sharded(value_cpu, rank, mesh))
    d = copy.copy(half)
    d.meta_info = {"micro_batch_size": 2}
    values = critic.compute_values(d)
    b = half.batch.to("cuda")
    with torch.no_grad():
        ref_values = value_cpu.cuda()(input_ids=b["input_ids"],
                                      attention_mask=b["attention_mask"],
                                      position_ids=b["position_ids"]).logits[:, PROMPT - 1:-1, 0]
    err = (values - ref_values * b["response_mask"]).abs().max().item()
    assert err < 0.05, err
    print(
        f"[rank {rank}] critic bf16 value max abs error: {err:.4f}; peak memory "
        f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB",
        flush=True)


def test_fsdp2_actor_critic_on_two_gpus():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port,), nprocs=WORLD, join=True)
