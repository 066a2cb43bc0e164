"""DataParallelPPOActor on a tiny Qwen2: log-probs equal the plain HF computation (padded, remove-padding, dynamic
batch size, FSDP2 on 2 ranks); one update is the same whatever the micro-batching and the number of ranks; GRPO-style
steps improve the objective; non-finite gradients skip the step."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, Qwen2Config

from verl.protocol import DataProto
from verl.workers.actor import DataParallelPPOActor
from verl.workers.actor.dp_actor import logprobs_and_entropy_from_logits

PROMPT, RESPONSE, VOCAB = 6, 5, 200


def _model(seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB,
                         hidden_size=64,
                         intermediate_size=128,
                         num_hidden_layers=2,
                         num_attention_heads=4,
                         num_key_value_heads=2,
                         max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _batch(n=8, seed=0, temperature=1.0):
    """Rollout-shaped rows: left-padded prompts, right-padded responses of varied lengths, GRPO-like advantages."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, VOCAB, (n, PROMPT), generator=g)
    responses = torch.randint(1, VOCAB, (n, RESPONSE), generator=g)
    prompt_mask = torch.ones(n, PROMPT, dtype=torch.long)
    response_mask = torch.zeros(n, RESPONSE, dtype=torch.long)
    for i in range(n):
        prompt_mask[i, :int(torch.randint(0, PROMPT - 1, (1,), generator=g))] = 0
        response_mask[i, :int(torch.randint(1, RESPONSE + 1, (1,), generator=g))] = 1
    prompts, responses = prompts * prompt_mask, responses * response_mask
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    scores = torch.randn(n, generator=g)
    advantages = (scores - scores.mean()) / (scores.std() + 1e-6)
    return DataProto.from_dict(tensors={
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": torch.clamp(attention_mask.cumsum(-1) - 1, min=0),
        "response_mask": response_mask,
        "advantages": advantages[:, None] * response_mask,
    },
                               meta_info={"temperature": temperature})


def _config(**overrides):
    base = {
        "ppo_mini_batch_size": 8,
        "ppo_micro_batch_size_per_gpu": 8,
        "use_dynamic_bsz": False,
        "ppo_max_token_len_per_gpu": 24,
        "clip_ratio": 0.2,
        "clip_ratio_low": 0.2,
        "clip_ratio_high": 0.28,
        "clip_ratio_c": 3.0,
        "entropy_coeff": 0.0,
        "use_kl_loss": False,
        "kl_loss_coef": 0.001,
        "kl_loss_type": "low_var_kl",
        "loss_agg_mode": "token-mean",
        "ppo_epochs": 1,
        "shuffle": False,
        "grad_clip": 1.0,
        "use_remove_padding": False,
        "policy_loss": {
            "loss_mode": "vanilla"
        },
    }
    base.update(overrides)
    return OmegaConf.create(base)


def _hf_log_probs(model, data, temperature=1.0):
    b = data.batch
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits[:, PROMPT - 1:-1] / temperature
    logp = torch.log_softmax(logits.float(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, b["responses"].unsqueeze(-1)).squeeze(-1), entropy


def _with_old_log_probs(actor, data):
    data.meta_info.update(micro_batch_size=4)
    old, _ = actor.compute_log_prob(data)
    data.batch["old_log_probs"] = old
    return data


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_logprobs_and_entropy_helper():
    logits = torch.randn(7, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (7,))
    lp, ent = logprobs_and_entropy_from_logits(logits, labels, calculate_entropy=True)
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(lp, ref.gather(-1, labels[:, None]).squeeze(-1).float())
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1).float())
    with torch.no_grad():
        lp2, ent2 = logprobs_and_entropy_from_logits(logits, labels, calculate_entropy=True, chunk_rows=3)
    torch.testing.assert_close(lp2, lp)
    torch.testing.assert_close(ent2, ent)


def test_logprobs_with_metrics_only_entropy_in_a_training_forward():
    """entropy_grad=False under autograd (the update's path when entropy_coeff=0): the same values, the same
    log-prob gradient, and an entropy without a graph, computed in chunks apart from the log-probs."""
    logits = torch.randn(9, 13, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 13, (9,))
    lp, ent = logprobs_and_entropy_from_logits(logits, labels, calculate_entropy=True, entropy_grad=False, chunk_rows=4)
    assert lp.requires_grad and not ent.requires_grad
    (grad,) = torch.autograd.grad(lp.sum(), logits)
    ref = torch.log_softmax(logits.detach().float(), -1)
    torch.testing.assert_close(lp.detach(), ref.gather(-1, labels[:, None]).squeeze(-1))
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1))
    joint = logits.detach().clone().requires_grad_()
    lp_joint, _ = logprobs_and_entropy_from_logits(joint, labels, calculate_entropy=True, entropy_grad=True)
    (grad_joint,) = torch.autograd.grad(lp_joint.sum(), joint)
    torch.testing.assert_close(grad, grad_joint)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_compute_log_prob_matches_hf_on_every_path(temperature):
    model = _model()
    data = _batch(temperature=temperature)
    expected_lp, expected_ent = _hf_log_probs(model, data, temperature)
    mask = data.batch["response_mask"].bool()
    for rmpad in (False, True):
        actor = DataParallelPPOActor(_config(use_remove_padding=rmpad), model)
        for meta in ({"micro_batch_size": 3}, {"use_dynamic_bsz": True, "max_token_len": 20}):
            d = copy.copy(data)
            d.meta_info = {**data.meta_info, **meta}
            lp, ent = actor.compute_log_prob(d, calculate_entropy=True)
            assert lp.shape == ent.shape == (8, RESPONSE)
            torch.testing.assert_close(lp[mask], expected_lp[mask], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ent[mask], expected_ent[mask], atol=1e-5, rtol=1e-5)
            lp_only, none = actor.compute_log_prob(d)
            assert none is None
            torch.testing.assert_close(lp_only, lp)


def _one_update(config, data, optimizer="sgd", model=None):
    model = model if model is not None else _model()
    optim = torch.optim.SGD(model.parameters(), lr=0.5) if optimizer == "sgd" else torch.optim.AdamW(model.parameters(),
                                                                                                     lr=1e-2)
    actor = DataParallelPPOActor(config, model, optim)
    metrics = actor.update_policy(data)
    return model, metrics


def test_update_is_invariant_to_micro_batching_padding_and_dynamic_bsz():
    data = _with_old_log_probs(DataParallelPPOActor(_config(), _model()), _batch(seed=3))
    data.batch["advantages"] = data.batch["advantages"] * 3  # push some ratios outside the clip range
    # two mini-batches x two epochs, so that old_log_probs matter and clipping happens in the second epoch
    common = dict(ppo_mini_batch_size=4, ppo_epochs=2, entropy_coeff=0.01)
    reference, ref_metrics = _one_update(_config(**common, ppo_micro_batch_size_per_gpu=4), data)
    assert len(ref_metrics["actor/grad_norm"]) == 4
    assert ref_metrics["actor/skipped_steps"] == [0.0]
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/entropy"):
        assert key in ref_metrics, key
    assert max(ref_metrics["actor/pg_clipfrac"]) > 0
    variants = [
        dict(ppo_micro_batch_size_per_gpu=1),
        dict(ppo_micro_batch_size_per_gpu=3, use_remove_padding=True),
        dict(use_dynamic_bsz=True, ppo_max_token_len_per_gpu=20),
        dict(use_dynamic_bsz=True, ppo_max_token_len_per_gpu=12, use_remove_padding=True),
    ]
    ref_params = _params(reference)
    for variant in variants:
        model, metrics = _one_update(_config(**common, **variant), data)
        for name, value in _params(model).items():
            torch.testing.assert_close(value, ref_params[name], atol=2e-5, rtol=1e-4, msg=f"{variant} {name}")
        torch.testing.assert_close(torch.tensor(metrics["actor/grad_norm"]),
                                   torch.tensor(ref_metrics["actor/grad_norm"]),
                                   rtol=1e-4,
                                   atol=1e-6)


@pytest.mark.parametrize("loss_agg_mode", ["seq-mean-token-mean", "seq-mean-token-sum"])
def test_sequence_modes_are_invariant_to_micro_batching(loss_agg_mode):
    data = _batch(seed=4)
    reference, _ = _one_update(_config(loss_agg_mode=loss_agg_mode), data)
    model, _ = _one_update(_config(loss_agg_mode=loss_agg_mode, ppo_micro_batch_size_per_gpu=3), data)
    for name, value in _params(model).items():
        torch.testing.assert_close(value, _params(reference)[name], atol=2e-5, rtol=1e-4, msg=name)


def test_grpo_steps_improve_objective_and_kl_grows():
    model = _model()
    actor = DataParallelPPOActor(_config(use_kl_loss=True, kl_loss_coef=0.01, use_remove_padding=True), model,
                                 torch.optim.AdamW(model.parameters(), lr=3e-3))
    data = _batch(seed=5)
    mask = data.batch["response_mask"].float()
    data.meta_info.update(micro_batch_size=8)
    ref, _ = actor.compute_log_prob(data)
    data.batch["ref_log_prob"] = ref

    def objective():  # the policy-gradient objective: advantage-weighted log-likelihood of the responses
        lp, _ = actor.compute_log_prob(data)
        return float((data.batch["advantages"] * lp * mask).sum() / mask.sum()), lp

    start, _ = objective()
    values, kl = [start], []
    for _ in range(6):
        _, lp = objective()
        data.batch["old_log_probs"] = lp
        metrics = actor.update_policy(data)
        kl.append(metrics["actor/kl_loss"][0])
        values.append(objective()[0])
    assert values[-1] > start + 0.5, values
    assert sum(b > a for a, b in zip(values, values[1:])) >= 5, values
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 1e-4, kl


def test_nonfinite_gradient_skips_the_step():
    data = _batch(seed=6)
    data.batch["advantages"][0, 0] = float("nan")
    model = _model()
    before = _params(model)
    model, metrics = _one_update(_config(), data, model=model)
    assert metrics["actor/skipped_steps"] == [1.0]
    assert metrics["actor/grad_norm"][0] != metrics["actor/grad_norm"][0]  # nan
    for name, value in _params(model).items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())


def test_grad_clip_bounds_the_update():
    data = _batch(seed=7)
    model = _model()
    before = _params(model)
    model, metrics = _one_update(_config(grad_clip=1e-3), data, model=model)
    assert metrics["actor/grad_norm"][0] > 1e-2  # the unclipped norm is reported
    step = torch.sqrt(sum(((p - before[n])**2).sum() for n, p in _params(model).items()))
    assert float(step) == pytest.approx(0.5 * 1e-3, rel=1e-3)  # lr * grad_clip


def test_clear_errors():
    with pytest.raises(ValueError, match="ulysses_sequence_parallel_size=2 .*use_remove_padding=True"):
        DataParallelPPOActor(_config(ulysses_sequence_parallel_size=2), _model())  # Ulysses splits packed sequences
    model = _model()
    actor = DataParallelPPOActor(_config(use_kl_loss=True), model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(KeyError, match="ref_log_prob"):
        actor.update_policy(_batch())
    with pytest.raises(KeyError, match="old_log_probs"):
        DataParallelPPOActor(_config(ppo_mini_batch_size=4), model, torch.optim.SGD(model.parameters(),
                                                                                    lr=0.1)).update_policy(_batch())
    with pytest.raises(KeyError, match="micro_batch_size"):
        actor.compute_log_prob(_batch())
    with pytest.raises(ValueError, match="optimizer"):
        DataParallelPPOActor(_config(), model).update_policy(_batch())


# ------------------------------------------------------------------------------------------- 2 ranks, FSDP2 -----
WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_actor_worker(rank, port):
    from verl.utils.fsdp_utils import apply_fsdp2, create_device_mesh, get_full_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ["VERL_DEVICE"] = "cpu"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = create_device_mesh(WORLD, -1)
        full = _with_old_log_probs(DataParallelPPOActor(_config(), _model()), _batch(seed=8))
        full.batch["advantages"] = full.batch["advantages"] * 3
        half = full.slice(rank * 4, rank * 4 + 4)  # the ranks' halves hold different numbers of tokens
        assert int(full.slice(0, 4).batch["response_mask"].sum()) != int(full.slice(4, 8).batch["response_mask"].sum())

        # log-probs of the sharded actor equal the plain HF model's
        sharded = apply_fsdp2(_model(), mesh)
        expected, _ = _hf_log_probs(_model(), half)
        mask = half.batch["response_mask"].bool()
        for rmpad in (False, True):
            actor = DataParallelPPOActor(_config(use_remove_padding=rmpad), sharded)
            for meta in ({"micro_batch_size": 3}, {"use_dynamic_bsz": True, "max_token_len": 20 + 8 * rank}):
                d = copy.copy(half)
                d.meta_info = {**half.meta_info, **meta}
                lp, _ = actor.compute_log_prob(d)
                torch.testing.assert_close(lp[mask], expected[mask], atol=1e-5, rtol=1e-5)

        # one update on 2 ranks with half the mini-batch each == one update on 1 rank with all of it
        # mini-batch k on 2 ranks = rows 2k, 2k+1 of each half; give the 1-rank reference the same mini-batches
        common = dict(ppo_epochs=2, entropy_coeff=0.01)
        interleaved = full.select_idxs([0, 1, 4, 5, 2, 3, 6, 7])
        reference, _ = _one_update(_config(**common, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=4),
                                   interleaved)
        for variant in (dict(ppo_micro_batch_size_per_gpu=2),
                        dict(use_dynamic_bsz=True, ppo_max_token_len_per_gpu=20, use_remove_padding=True)):
            cfg = _config(**common, ppo_mini_batch_size=2, **variant)  # per-GPU mini-batch: 4 rows / 2 ranks
            model = apply_fsdp2(_model(), mesh)
            actor = DataParallelPPOActor(cfg, model, torch.optim.SGD(model.parameters(), lr=0.5))
            metrics = actor.update_policy(half)
            assert len(metrics["actor/grad_norm"]) == 4
            state = get_full_state_dict(model)
            for name, value in _params(reference).items():
                torch.testing.assert_close(state[name], value, atol=2e-5, rtol=1e-4, msg=f"{variant} {name}")
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_ranks_match_single_rank():
    mp.spawn(_fsdp_actor_worker, args=(_free_port(),), nprocs=WORLD, join=True)


def _one_rank_deferral_worker(rank, port):
    import verl.workers.actor.dp_actor as dp_actor_module
    from verl.utils.dp_update import defer_gradient_reduction
    from verl.utils.fsdp_utils import apply_fsdp2, create_device_mesh, get_full_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", VERL_DEVICE="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = create_device_mesh(1, -1)
        data = _with_old_log_probs(DataParallelPPOActor(_config(), _model()), _batch(seed=9))
        results = []
        for defer in (True, False):
            calls = []

            def spy(module, last, dp, defer=defer, calls=calls):
                calls.append(last)
                if defer:
                    defer_gradient_reduction(module, last, dp)

            dp_actor_module.defer_gradient_reduction = spy
            model = apply_fsdp2(_model(), mesh)
            synced = []
            set_sync = model.set_requires_gradient_sync
            model.set_requires_gradient_sync = lambda flag, **kw: (synced.append(flag), set_sync(flag, **kw))
            actor = DataParallelPPOActor(_config(ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2), model,
                                         torch.optim.AdamW(model.parameters(), lr=1e-2))
            metrics = actor.update_policy(data)
            # 2 mini-batches of 2 micro-batches: only the last micro-batch of each optimizer step reduces
            assert calls == [False, True, False, True]
            assert synced == (calls if defer else [])
            results.append((get_full_state_dict(model), metrics["actor/grad_norm"]))
        (deferred, norms), (every, every_norms) = results
        assert norms == every_norms
        for name, value in every.items():
            assert torch.equal(deferred[name], value), name
    finally:
        dist.destroy_process_group()


def test_one_rank_fsdp_reduces_gradients_once_per_optimizer_step():
    """On a one-rank FSDP2 mesh the gradient reduce-scatter runs on the last micro-batch of each optimizer step only;
    the update is bit-identical to reducing after every micro-batch."""
    mp.spawn(_one_rank_deferral_worker, args=(_free_port(),), nprocs=1, join=True)
