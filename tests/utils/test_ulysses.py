"""Ulysses sequence parallelism on 2 ranks (gloo on CPU; NCCL when 2 GPUs are present): the all-to-all primitives
(real all-to-all and the all-gather fallback), and the FSDP2 actor / critic with sp=2 against the plain sp=1
computation on one process: log-probs, entropies and values equal to 1e-5, and one update (two mini-batches x two
epochs, fixed and dynamic micro-batches) lands on the same parameters (atol 2e-5, rtol 1e-4, as the other
invariance tests). Also: GQA models whose kv heads must be repeated, and the clear configuration errors."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, Qwen2Config

from verl.models.transformers.monkey_patch import apply_monkey_patch
from verl.protocol import DataProto
from verl.utils import ulysses
from verl.workers.actor import DataParallelPPOActor
from verl.workers.critic import DataParallelPPOCritic

PROMPT, RESPONSE, VOCAB, SP = 6, 5, 200, 2
# CPU (gloo): the sp=2 ranks and the sp=1 reference run the same kernels; CUDA (NCCL) is compared with a CPU
# reference, so its kernels' different summation orders get 10x the tolerance
LOGPROB_TOL = dict(atol=1e-5, rtol=1e-5)
PARAM_TOL = dict(atol=2e-5, rtol=1e-4)


def _qwen2_config(heads=4, kv_heads=2, **extra):
    return Qwen2Config(vocab_size=VOCAB,
                       hidden_size=64,
                       intermediate_size=128,
                       num_hidden_layers=2,
                       num_attention_heads=heads,
                       num_key_value_heads=kv_heads,
                       max_position_embeddings=128,
                       **extra)


def _lm(seed=0, heads=4, kv_heads=2, attn="sdpa"):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_qwen2_config(heads, kv_heads), attn_implementation=attn)


def _value_model(seed=0):
    torch.manual_seed(seed)
    return AutoModelForTokenClassification.from_config(_qwen2_config(num_labels=1, classifier_dropout=0.0),
                                                       attn_implementation="sdpa")


def _batch(n=8, seed=0):
    """Left-padded prompts, right-padded responses of varied lengths, advantages; 8 rows hold an odd number of
    valid tokens, so the packed sequence needs sp padding."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, VOCAB, (n, PROMPT), generator=g)
    responses = torch.randint(1, VOCAB, (n, RESPONSE), generator=g)
    prompt_mask = torch.ones(n, PROMPT, dtype=torch.long)
    response_mask = torch.zeros(n, RESPONSE, dtype=torch.long)
    for i in range(n):
        prompt_mask[i, :int(torch.randint(0, PROMPT - 1, (1,), generator=g))] = 0
        response_mask[i, :int(torch.randint(1, RESPONSE + 1, (1,), generator=g))] = 1
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    if int(attention_mask.sum()) % SP == 0:  # make the packed length odd
        attention_mask[0, 0] = 1 - attention_mask[0, 0]
        prompt_mask[0, 0] = attention_mask[0, 0]
    prompts, responses = prompts * prompt_mask, responses * response_mask
    scores = torch.randn(n, generator=g)
    advantages = 3 * (scores - scores.mean()) / (scores.std() + 1e-6)
    return DataProto.from_dict(
        tensors={
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": attention_mask,
            "position_ids": torch.clamp(attention_mask.cumsum(-1) - 1, min=0),
            "response_mask": response_mask,
            "advantages": advantages[:, None] * response_mask,
            "returns": torch.full((n, RESPONSE), 1.0) * response_mask,
        })


def _actor_config(**overrides):
    base = {
        "ppo_mini_batch_size": 4,
        "ppo_micro_batch_size_per_gpu": 2,
        "use_dynamic_bsz": False,
        "ppo_max_token_len_per_gpu": 20,
        "clip_ratio": 0.2,
        "clip_ratio_low": 0.2,
        "clip_ratio_high": 0.28,
        "clip_ratio_c": 3.0,
        "entropy_coeff": 0.01,
        "use_kl_loss": False,
        "loss_agg_mode": "token-mean",
        "ppo_epochs": 2,
        "shuffle": False,
        "grad_clip": 1.0,
        "use_remove_padding": True,
        "ulysses_sequence_parallel_size": 1,
        "policy_loss": {
            "loss_mode": "vanilla"
        },
        "cliprange_value": 0.5,
    }
    base.update(overrides)
    return OmegaConf.create(base)


def _params(state):
    return {k: v.detach().clone() for k, v in state.items()}


def _meta(data, **meta):
    d = copy.copy(data)
    d.meta_info = dict(meta)
    return d


# ------------------------------------------------------------------------------------------- single process -----
def test_clear_configuration_errors():
    with pytest.raises(ValueError, match="use_remove_padding"):
        DataParallelPPOActor(_actor_config(ulysses_sequence_parallel_size=2, use_remove_padding=False), _lm())
    with pytest.raises(ValueError, match="critic.model.use_remove_padding"):
        DataParallelPPOCritic(_actor_config(ulysses_sequence_parallel_size=2, use_remove_padding=False), _value_model())
    with pytest.raises(ValueError, match="use_remove_padding=True"):
        apply_monkey_patch(_lm(), ulysses_sp_size=2, use_remove_padding=False)
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        apply_monkey_patch(_lm(), ulysses_sp_size=3)
    with pytest.raises(ValueError, match="attn_implementation"):
        apply_monkey_patch(_lm(attn="eager"), ulysses_sp_size=2)
    # sp > 1 outside an sp group of that size: the forward says where the context is missing
    model = _lm()
    apply_monkey_patch(model, ulysses_sp_size=2)
    actor = DataParallelPPOActor(_actor_config(ulysses_sequence_parallel_size=2), model)
    with pytest.raises(RuntimeError, match="FSDPUlyssesShardingManager"):
        actor.compute_log_prob(_meta(_batch(), micro_batch_size=4))


def test_patched_model_without_sp_group_is_unchanged():
    """The patch is inert without an sp group: a patched model computes what an unpatched one does, also padded."""
    plain, patched = _lm(), _lm()
    apply_monkey_patch(patched, ulysses_sp_size=2)
    data = _meta(_batch(), micro_batch_size=3)
    for rmpad in (False, True):
        expected, _ = DataParallelPPOActor(_actor_config(use_remove_padding=rmpad), plain).compute_log_prob(data)
        got, _ = DataParallelPPOActor(_actor_config(use_remove_padding=rmpad), patched).compute_log_prob(data)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- 2 ranks ------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_primitives(group, device):
    rank = dist.get_rank(group)

    def local(r):  # (1, heads=4, local seq=3, d=2), distinct per rank
        return (torch.arange(24, dtype=torch.float32).view(1, 4, 3, 2) + 100 * r).to(device)

    full_seq = torch.cat([local(r) for r in range(SP)], dim=2)  # (1, 4, 6, 2)
    expected = full_seq.chunk(SP, dim=1)[rank]  # this rank's heads over the whole sequence
    for via_all_gather in (False, True):
        ulysses.set_all_to_all_via_all_gather(via_all_gather)
        try:
            x = local(rank).requires_grad_(True)
            y = ulysses.gather_seq_scatter_heads(x, seq_dim=2, head_dim=1, group=group)
            torch.testing.assert_close(y, expected, atol=0, rtol=0)
            back = ulysses.gather_heads_scatter_seq(y, head_dim=1, seq_dim=2, group=group)
            torch.testing.assert_close(back, x, atol=0, rtol=0)
            (back * (rank + 1)).sum().backward()  # the round trip's gradient is the identity's
            torch.testing.assert_close(x.grad, torch.full_like(x, rank + 1.0), atol=0, rtol=0)
        finally:
            ulysses.set_all_to_all_via_all_gather(False)
    gathered = ulysses.gather_outputs_and_unpad(local(rank), gather_dim=2, unpad_dim=2, padding_size=1, group=group)
    torch.testing.assert_close(gathered, full_seq[:, :, :-1], atol=0, rtol=0)


def _sp_worker(rank, port, backend):
    from verl.utils.fsdp_utils import apply_fsdp2, create_device_mesh, get_full_state_dict, get_mixed_precision_policy
    from verl.workers.sharding_manager.fsdp_ulysses import FSDPUlyssesShardingManager, create_ulysses_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(SP))
    if backend == "gloo":
        os.environ["VERL_DEVICE"] = "cpu"
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group(backend, rank=rank, world_size=SP)
    scale = 1 if backend == "gloo" else 10
    logprob_tol = {k: v * scale for k, v in LOGPROB_TOL.items()}
    param_tol = {k: v * scale for k, v in PARAM_TOL.items()}
    try:
        fsdp_mesh = create_device_mesh(SP, -1)
        sp_mesh = create_ulysses_device_mesh(SP, SP)
        manager = FSDPUlyssesShardingManager(sp_mesh)
        _check_primitives(manager.sp_group, device)
        # the data methods for one-chunk-per-rank dispatch: all-gather the sp group's rows, keep this rank's chunk
        chunk = _batch(n=2, seed=rank)
        gathered = manager.preprocess_data(chunk)
        expected_rows = DataProto.concat([_batch(n=2, seed=r) for r in range(SP)])
        assert torch.equal(gathered.batch["input_ids"], expected_rows.batch["input_ids"])
        assert torch.equal(manager.postprocess_data(gathered).batch["input_ids"], chunk.batch["input_ids"])
        fp32 = get_mixed_precision_policy(param_dtype="fp32", reduce_dtype="fp32")

        def sharded(model):
            apply_monkey_patch(model, ulysses_sp_size=SP)
            return apply_fsdp2(model.to(device), fsdp_mesh, mp_policy=fp32)

        data = _batch(seed=1)
        mask = data.batch["response_mask"].bool()

        # --- actor log-probs and entropies (also a GQA model whose single kv head is repeated)
        for heads, kv_heads in ((4, 2), (4, 1)):
            reference = DataParallelPPOActor(_actor_config(), _lm(heads=heads, kv_heads=kv_heads))
            expected_lp, expected_ent = reference.compute_log_prob(_meta(data, micro_batch_size=8), True)
            actor = DataParallelPPOActor(_actor_config(ulysses_sequence_parallel_size=SP),
                                         sharded(_lm(heads=heads, kv_heads=kv_heads)))
            for meta in ({"micro_batch_size": 3}, {"use_dynamic_bsz": True, "max_token_len": 16}):
                with manager:
                    lp, ent = actor.compute_log_prob(_meta(data, **meta), calculate_entropy=True)
                assert ulysses.get_ulysses_sequence_parallel_group() is None  # restored on exit
                torch.testing.assert_close(lp.cpu(), expected_lp, **logprob_tol)
                torch.testing.assert_close(ent.cpu(), expected_ent, **logprob_tol)

        # --- one actor update: sp=2 over 2 ranks (dp=1: both get all rows) == sp=1 on one process
        old, _ = DataParallelPPOActor(_actor_config(), _lm()).compute_log_prob(_meta(data, micro_batch_size=8))
        with_old = data.select(deepcopy=True)
        with_old.batch["old_log_probs"] = old
        ref_model = _lm()
        ref_metrics = DataParallelPPOActor(_actor_config(), ref_model, torch.optim.SGD(ref_model.parameters(),
                                                                                       lr=0.5)).update_policy(with_old)
        assert max(ref_metrics["actor/pg_clipfrac"]) > 0  # the clipped branch is exercised
        expected = _params(ref_model.state_dict())
        # micro-batches of one row (in row 1 all positions predicting response tokens lie on sp rank 1), and dynamic
        variants = [dict(ppo_micro_batch_size_per_gpu=1), dict(use_dynamic_bsz=True, ppo_max_token_len_per_gpu=10)]
        for variant in variants:
            model = sharded(_lm())
            actor = DataParallelPPOActor(_actor_config(ulysses_sequence_parallel_size=SP, **variant), model,
                                         torch.optim.SGD(model.parameters(), lr=0.5))
            with manager:
                metrics = actor.update_policy(with_old)
            state = get_full_state_dict(model)
            for name, value in expected.items():
                torch.testing.assert_close(state[name].cpu(), value, **param_tol, msg=f"{variant} {name}")
            torch.testing.assert_close(torch.tensor(metrics["actor/grad_norm"]),
                                       torch.tensor(ref_metrics["actor/grad_norm"]),
                                       rtol=1e-4 * scale,
                                       atol=1e-6 * scale)

        # --- critic values and one update
        values_ref = DataParallelPPOCritic(_actor_config(),
                                           _value_model()).compute_values(_meta(data, micro_batch_size=8))
        critic_model = sharded(_value_model())
        critic = DataParallelPPOCritic(_actor_config(ulysses_sequence_parallel_size=SP), critic_model,
                                       torch.optim.SGD(critic_model.parameters(), lr=0.3))
        with manager:
            values = critic.compute_values(_meta(data, micro_batch_size=3))
        torch.testing.assert_close(values.cpu(), values_ref, **logprob_tol)
        train = data.select(deepcopy=True)
        # stale values, 0.2 or 0.8 away from the current ones: value clipping (0.5) is active on part of the rows
        shift = torch.tensor([0.2, 0.8] * 4)[:, None] * data.batch["response_mask"]
        train.batch["values"] = values_ref - shift
        plain_model = _value_model()
        plain_metrics = DataParallelPPOCritic(_actor_config(), plain_model,
                                              torch.optim.SGD(plain_model.parameters(), lr=0.3)).update_critic(train)
        assert max(plain_metrics["critic/vf_clipfrac"]) > 0
        with manager:
            metrics = critic.update_critic(train)
        state = get_full_state_dict(critic_model)
        for name, value in plain_model.state_dict().items():
            torch.testing.assert_close(state[name].cpu(), value, **param_tol, msg=name)
        torch.testing.assert_close(torch.tensor(metrics["critic/vf_loss"]),
                                   torch.tensor(plain_metrics["critic/vf_loss"]),
                                   rtol=1e-4 * scale,
                                   atol=1e-6 * scale)
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_two_ranks_match_single_process_gloo():
    mp.spawn(_sp_worker, args=(_free_port(), "gloo"), nprocs=SP, join=True)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < SP, reason="needs 2 CUDA GPUs")
def test_sequence_parallel_two_ranks_match_single_process_nccl():
    mp.spawn(_sp_worker, args=(_free_port(), "nccl"), nprocs=SP, join=True)
