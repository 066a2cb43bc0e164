"""Checks of the Megatron actor / critic / weight generator / engine hybrid engines / dist checkpoint that need several
processes.

Run by ``test_megatron_dist.py`` as ``torchrun --nproc_per_node=N dist_checks.py CHECK TP PP OUT_DIR [EP [CP [VPP]]]``
(gloo on CPU, NCCL on GPUs). Each check compares against a plain Hugging Face model computed in the same process and
writes ``ok-<rank>`` into OUT_DIR when it passes (an assertion error fails the process, hence the test).
"""
from __future__ import annotations

import copy
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from verl.protocol import DataProto
from verl.utils.device import get_device, get_nccl_backend, is_cuda_available


def _megatron_cfg(tp: int, pp: int, **extra) -> dict:
    cfg = {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": None,
        "sequence_parallel": True,
        "use_distributed_optimizer": True,
        "seed": 1,
        "dtype": "float32",
        "override_transformer_config": {},
        "override_ddp_config": {},
    }
    cfg.update(extra)
    return cfg


def _batch(tokenizer_vocab: int, rows: int = 8, prompt: int = 6, response: int = 5, seed: int = 0) -> DataProto:
    """Left-padded prompts + right-padded responses with varied lengths (the rollout schema)."""
    g = torch.Generator().manual_seed(seed)
    total = prompt + response
    input_ids = torch.randint(3, tokenizer_vocab, (rows, total), generator=g)
    attention_mask = torch.ones(rows, total, dtype=torch.long)
    for i in range(rows):
        left = i % 3
        right = (i * 2) % 4
        attention_mask[i, :left] = 0
        attention_mask[i, total - right:] = 0
    input_ids = input_ids * attention_mask
    position_ids = torch.clamp(attention_mask.cumsum(-1) - 1, min=0)
    responses = input_ids[:, prompt:]
    response_mask = attention_mask[:, prompt:]
    advantages = torch.randn(rows, response, generator=g) * response_mask
    return DataProto.from_dict(
        tensors={
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "responses": responses,
            "response_mask": response_mask,
            "advantages": advantages,
            "returns": torch.randn(rows, response, generator=g) * response_mask,
        })


def _hf_log_probs(model, data: DataProto) -> torch.Tensor:
    from verl.utils import torch_functional as verl_F

    out = model(input_ids=data.batch["input_ids"],
                attention_mask=data.batch["attention_mask"],
                position_ids=data.batch["position_ids"]).logits
    length = data.batch["responses"].shape[-1]
    logits = out[:, -length - 1:-1]
    return verl_F.logprobs_from_logits(logits.reshape(-1, logits.shape[-1]),
                                       data.batch["responses"].reshape(-1)).view(logits.shape[:2])


def _setup(tp: int, pp: int, **extra):
    from transformers import AutoConfig

    from verl.models.tiny import get_tiny_model_path
    from verl.utils.megatron_utils import init_megatron_parallel

    if is_cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(get_nccl_backend())
    path = get_tiny_model_path()
    hf_config = AutoConfig.from_pretrained(path)
    mcfg = _megatron_cfg(tp, pp, **extra)
    info = init_megatron_parallel(mcfg, "actor_rollout_ref.actor.megatron")
    return path, hf_config, mcfg, info


def _ppo_actor(hf_config: Any, tf_config: Any, chunks: list, mcfg: Any) -> tuple[Any, Any]:
    """The Megatron PPO actor the checks train: AdamW lr 1e-3 without clipping, token-mean vanilla loss, one
    mini-batch of 8 rows in micro-batches of 2. Returns ``(actor, actor config)``."""
    from verl.utils.megatron_utils import build_megatron_optimizer
    from verl.workers.actor.megatron_actor import MegatronPPOActor

    optim = {"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999]}
    optimizer = build_megatron_optimizer(chunks, optim, mcfg, grad_clip=1e9)
    actor_cfg = OmegaConf.create({
        "ppo_mini_batch_size": 8,
        "ppo_micro_batch_size_per_gpu": 2,
        "ppo_epochs": 1,
        "clip_ratio": 0.2,
        "loss_agg_mode": "token-mean",
        "entropy_coeff": 0.0,
        "use_kl_loss": False,
        "policy_loss": {
            "loss_mode": "vanilla"
        },
    })
    return MegatronPPOActor(actor_cfg, hf_config, tf_config, chunks, optimizer), actor_cfg


def _check_update_matches_hf_and_sync(actor: Any,
                                      actor_cfg: Any,
                                      hf: Any,
                                      hf_config: Any,
                                      chunks: list,
                                      converter: Any,
                                      data: Any,
                                      lp: torch.Tensor,
                                      lp_after: torch.Tensor,
                                      label: str,
                                      tp: int,
                                      pp: int,
                                      grad_norm: float | None = None,
                                      grads: dict[str, torch.Tensor] | None = None) -> None:
    """After one PPO update of the actor (log-probs ``lp`` -> ``lp_after``): they equal one HF AdamW step on the
    same token-mean loss, and the trained weights, resharded into an HF rollout model, give the actor's log-probs.
    ``grad_norm``: the norm the actor reported, checked against HF's gradient norm of the loss; ``grads``: the actor's
    gradients in HF names and layout (:func:`_hf_layout_grads`), checked against HF's parameter by parameter."""
    from transformers import AutoModelForCausalLM

    from verl.trainer.ppo import core_algos
    from verl.workers.sharding_manager.megatron_hf import MegatronHFShardingManager

    mask = data.batch["response_mask"].bool()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.0)
    new_lp = _hf_log_probs(hf, data)
    loss, _ = core_algos.get_policy_loss_fn("vanilla")(old_log_prob=lp.clone(),
                                                       log_prob=new_lp,
                                                       advantages=data.batch["advantages"],
                                                       response_mask=mask.float(),
                                                       loss_agg_mode="token-mean",
                                                       config=actor_cfg)
    loss.backward()
    if grads is not None:
        hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
        assert set(grads) == set(hf_grads), sorted(set(grads) ^ set(hf_grads))
        rel = {n: ((grads[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in hf_grads.items()}
        worst = max(rel, key=rel.get)
        _report(f"{label}gradients of {len(rel)} parameters: worst |megatron - HF| / |HF| ({worst})", rel[worst], tp,
                pp)
        assert rel[worst] < 1e-4, {n: r for n, r in rel.items() if r >= 1e-4}
    # Adam's first step is nearly scale-free (about lr * sign(grad)): the norm checks the gradient's scale, and at
    # TP > 1 that megatron counts the TP-split weights on every TP rank (mark_tensor_parallel_weights)
    if grad_norm is not None:
        hf_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in hf.parameters() if p.grad is not None
                                                       ])).item()
        _report(f"{label}gradient norm: megatron {grad_norm:.6g}, HF {hf_norm:.6g}", abs(grad_norm - hf_norm), tp, pp)
        assert abs(grad_norm - hf_norm) < 1e-4 * max(1.0, hf_norm), (grad_norm, hf_norm)
    opt.step()
    with torch.no_grad():
        hf_after = _hf_log_probs(hf, data)
    moved = (lp_after - lp)[mask].abs().max().item()
    assert moved > 1e-4, "the update did not change the policy"
    err = (lp_after - hf_after)[mask].abs().max().item()
    _report(f"{label}after one update (moved {moved:.3g}): log-prob max |megatron - HF AdamW|", err, tp, pp)
    assert err < 5e-3 * max(1.0, moved), f"after one step megatron vs HF differ by {err} (moved {moved})"

    # the trained weights, resharded into a rollout model, give the actor's log-probs
    rollout = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).to(get_device())
    with MegatronHFShardingManager(chunks, converter, inference_module=rollout):
        with torch.no_grad():
            synced = _hf_log_probs(rollout, data.to(get_device())).cpu()
    err = (lp_after - synced)[mask].abs().max().item()
    _report(f"{label}after the update: log-prob max |megatron actor - synced HF rollout|", err, tp, pp)
    assert err < 2e-4, f"the rollout's log-probs differ from the trained actor's by {err}"


def _hf_layout_grads(chunks: list, converter: Any) -> dict[str, torch.Tensor]:
    """The accumulated gradients of the model chunks (``main_grad``, megatron's DDP gradient buffers) gathered over
    TP and PP into HF names and layout, on every rank, by the weight generator that streams the weights (the layouts
    are the same). Whole only where DP x CP is 1: the distributed optimizer's reduce-scatter leaves each DP x CP rank
    the sum of its own shard only."""
    from verl.utils.megatron_utils import unwrap_model
    from verl.workers.sharding_manager.megatron_hf import MegatronWeightGenerator

    class GradGenerator(MegatronWeightGenerator):

        def _local_params(self) -> list[dict[str, torch.Tensor]]:
            return [{n: p.main_grad for n, p in unwrap_model(c).named_parameters()} for c in self.actor_module]

    return {name: t.detach().cpu().clone() for name, t in GradGenerator(chunks, converter).iter_hf_weights()}


def check_actor(tp: int, pp: int, cp: int = 1, vpp: int | None = None) -> None:
    """Log-probs equal the HF model's; one PPO update changes them and matches an HF update's log-probs; the hybrid
    engine then streams the trained weights into an HF rollout model whose log-probs equal the actor's. The reported
    gradient norm equals HF's, and (where DP x CP is 1) so does every parameter's gradient. Prints the measured
    differences (``[check_actor] ...``) for the record. ``cp``: context-parallel size (all-gathered K/V); ``vpp``:
    virtual pipeline stages (the interleaved schedule, which needs a multiple of PP micro-batches)."""
    from transformers import AutoModelForCausalLM

    from verl.utils.megatron_utils import build_megatron_model

    path, hf_config, mcfg, info = _setup(tp, pp, context_parallel_size=cp, virtual_pipeline_model_parallel_size=vpp)
    assert info.cp_size == cp and info.dp_size == dist.get_world_size() // (tp * pp * cp)
    chunks, tf_config, converter = build_megatron_model(hf_config, mcfg, path)
    assert len(chunks) == (vpp or 1)
    actor, actor_cfg = _ppo_actor(hf_config, tf_config, chunks, mcfg)
    data = _batch(hf_config.vocab_size)
    # 4 micro-batches of 2 rows (and 4 dynamic ones of <= 22 tokens) under the interleaved schedule, else 3
    data.meta_info.update({"micro_batch_size": 2 if vpp else 3, "temperature": 1.0})
    lp, ent = actor.compute_log_prob(data, calculate_entropy=True)

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ref = _hf_log_probs(hf, data)
    mask = data.batch["response_mask"].bool()
    err = (lp - ref)[mask].abs().max().item()
    _report("log-prob max |megatron - HF|", err, tp, pp)
    assert err < 2e-4, f"megatron vs HF log-probs differ by {err}"
    assert ent is not None and torch.isfinite(ent).all() and (ent[mask] > 0).all()

    # dynamic batching gives the same values in the original order
    dyn = copy.deepcopy(data)
    dyn.meta_info.update({"use_dynamic_bsz": True, "max_token_len": 22 if vpp else 25})
    lp_dyn, _ = actor.compute_log_prob(dyn)
    assert torch.allclose(lp_dyn[mask], lp[mask], atol=2e-4)

    # one PPO step = one HF AdamW step on the same token-mean loss
    data.batch["old_log_probs"] = lp.clone()
    grads: dict[str, torch.Tensor] = {}
    if info.dp_size * info.cp_size == 1:  # the mini-batch's gradients, taken just before the optimizer step
        step = actor._optimizer_step

        def capture_then_step() -> tuple[float, bool]:
            grads.update(_hf_layout_grads(chunks, converter))
            return step()

        actor._optimizer_step = capture_then_step
    metrics = actor.update_policy(data)
    assert "actor/pg_loss" in metrics or not info.is_last_stage
    assert metrics["actor/skipped_steps"] == [0.0] and all(torch.isfinite(torch.tensor(metrics["actor/grad_norm"])))
    lp_after, _ = actor.compute_log_prob(data)
    _check_update_matches_hf_and_sync(actor, actor_cfg, hf, hf_config, chunks, converter, data, lp, lp_after, "", tp,
                                      pp, metrics["actor/grad_norm"][0], grads or None)


def _report(what: str, value: float, tp: int, pp: int) -> None:
    if dist.get_rank() == 0:
        from megatron.core import parallel_state as mpu

        cp = mpu.get_context_parallel_world_size() if mpu.model_parallel_is_initialized() else 1
        vpp = mpu.get_virtual_pipeline_model_parallel_world_size() if mpu.model_parallel_is_initialized() else None
        print(
            f"[check_actor] tp={tp} pp={pp} vpp={vpp or 1} cp={cp} world={dist.get_world_size()} {what}: "
            f"{value:.3g}",
            flush=True)


def check_cp_attention(cp: int) -> None:
    """The context-parallel core attention (each rank: its query chunks against all-gathered K/V, GQA) gives the
    output and the q/k/v gradients of full causal attention with padding on the whole sequence."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from verl.models.mcore.cp_attention import ContextParallelAttention, cp_causal_padding_mask, cp_local_index
    from verl.utils.megatron_cpu import device_scope
    from verl.utils.megatron_utils import causal_padding_mask, init_megatron_parallel

    dist.init_process_group(get_nccl_backend())
    info = init_megatron_parallel(_megatron_cfg(1, 1, context_parallel_size=cp), "actor_rollout_ref.actor.megatron")
    assert info.cp_size == cp
    device = get_device() if is_cuda_available() else torch.device("cpu")
    heads, groups, dim, b, s = 4, 2, 8, 3, 16
    with device_scope():
        config = TransformerConfig(num_layers=1,
                                   hidden_size=heads * dim,
                                   num_attention_heads=heads,
                                   num_query_groups=groups,
                                   kv_channels=dim,
                                   context_parallel_size=cp,
                                   attention_dropout=0.0,
                                   params_dtype=torch.float32)
        attn = ContextParallelAttention(config, 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, b, n, dim, generator=g).to(device) for n in (heads, groups, groups))
    grad_out = torch.randn(s, b, heads * dim, generator=g).to(device)
    attention_mask = torch.ones(b, s, dtype=torch.long, device=device)
    attention_mask[1, :3] = 0  # left padding
    attention_mask[2, :5] = 0
    attention_mask[2, -2:] = 0  # right padding

    for mask_rows in (attention_mask, None):
        # reference: full-sequence attention (megatron's mask convention, True = masked) on every rank
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        rq, rk, rv = (t.permute(1, 2, 0, 3) for t in ref_in)
        rk, rv = rk.repeat_interleave(heads // groups, 1), rv.repeat_interleave(heads // groups, 1)
        scores = rq @ rk.transpose(-1, -2) / dim**0.5
        full_mask = (causal_padding_mask(mask_rows) if mask_rows is not None else torch.ones(
            s, s, dtype=torch.bool, device=device).tril().logical_not()[None, None])
        probs = torch.softmax(scores.masked_fill(full_mask, float("-inf")), -1)
        ref = (probs @ rv).permute(2, 0, 1, 3).reshape(s, b, heads * dim)
        (ref * grad_out).sum().backward()

        index = cp_local_index(s, cp, info.cp_rank, device)
        local_in = [t[index].clone().requires_grad_() for t in (q, k, v)]
        mask = cp_causal_padding_mask(mask_rows, index) if mask_rows is not None else None
        with device_scope():
            out = attn(*local_in, mask)
        (out * grad_out[index]).sum().backward()
        err = (out - ref[index]).abs().max().item()
        grad_err = max((a.grad - r.grad[index]).abs().max().item() for a, r in zip(local_in, ref_in))
        if dist.get_rank() == 0:
            print(f"[check_cp_attention] cp={cp} mask={mask_rows is not None} output {err:.3g} grads {grad_err:.3g}",
                  flush=True)
        assert err < 1e-5 and grad_err < 1e-5, (err, grad_err)


def _tiny_mixtral(out_dir: str) -> str:
    """A tiny Mixtral (4 experts, top-2, 2 layers, hidden 64) saved by rank 0 as an HF checkpoint (no hub): the MoE
    test model. Its router weights are drawn larger than the default init so that routing is decisive."""
    from transformers import MixtralConfig, MixtralForCausalLM

    path = os.path.join(out_dir, "tiny_mixtral")
    if dist.get_rank() == 0 and not os.path.isfile(os.path.join(path, "config.json")):
        config = MixtralConfig(vocab_size=256,
                               hidden_size=64,
                               intermediate_size=48,
                               num_hidden_layers=2,
                               num_attention_heads=4,
                               num_key_value_heads=2,
                               num_local_experts=4,
                               num_experts_per_tok=2,
                               max_position_embeddings=128,
                               initializer_range=0.05,
                               architectures=["MixtralForCausalLM"])
        torch.manual_seed(0)
        model = MixtralForCausalLM(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    param.normal_(0.0, 0.5)
        model.save_pretrained(path)
    dist.barrier()
    return path


def check_moe_actor(tp: int, pp: int, ep: int, out_dir: str) -> None:
    """Tiny Mixtral: Megatron's log-probs (MoE layers over ``ep`` expert-parallel ranks) equal the HF model's; one
    PPO update matches one HF AdamW step; the hybrid engine streams the trained experts (gathered over EP) into an
    HF rollout model (transformers' in-memory expert naming) whose log-probs equal the actor's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from verl.utils.megatron_utils import build_megatron_model, init_megatron_parallel

    if is_cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(get_nccl_backend())
    path = _tiny_mixtral(out_dir)
    hf_config = AutoConfig.from_pretrained(path)
    mcfg = _megatron_cfg(tp, pp, expert_model_parallel_size=ep)
    info = init_megatron_parallel(mcfg, "actor_rollout_ref.actor.megatron")
    assert info.ep_size == ep
    chunks, tf_config, converter = build_megatron_model(hf_config, mcfg, path)
    assert tf_config.num_moe_experts == 4 and converter.num_local_experts == 4 // ep
    actor, actor_cfg = _ppo_actor(hf_config, tf_config, chunks, mcfg)
    data = _batch(hf_config.vocab_size)
    data.meta_info.update({"micro_batch_size": 2, "temperature": 1.0})
    lp, _ = actor.compute_log_prob(data)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ref = _hf_log_probs(hf, data)
    mask = data.batch["response_mask"].bool()
    err = (lp - ref)[mask].abs().max().item()
    _report(f"moe ep={ep}: log-prob max |megatron - HF|", err, tp, pp)
    assert err < 2e-4, f"MoE megatron vs HF log-probs differ by {err}"
    # dynamic batching: the EP ranks' micro-batches hold different numbers of rows (all-to-all token dispatch)
    dyn = copy.deepcopy(data)
    dyn.meta_info.update({"use_dynamic_bsz": True, "max_token_len": 25 + 11 * info.dp_rank})
    lp_dyn, _ = actor.compute_log_prob(dyn)
    assert torch.allclose(lp_dyn[mask], lp[mask], atol=2e-4)

    data.batch["old_log_probs"] = lp.clone()
    metrics = actor.update_policy(data)
    assert metrics["actor/skipped_steps"] == [0.0]
    lp_after, _ = actor.compute_log_prob(data)
    _check_update_matches_hf_and_sync(actor, actor_cfg, hf, hf_config, chunks, converter, data, lp, lp_after,
                                      f"moe ep={ep}: ", tp, pp)


def check_moe_checkpoint(tp: int, pp: int, ep: int, out_dir: str) -> None:
    """Tiny Mixtral over ``ep`` expert-parallel ranks: the dist checkpoint (experts saved under their global index)
    resumes and replays the next update exactly; its HF export and the offline merger both give the saved policy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from verl.model_merger.megatron_model_merger import merge_megatron_checkpoint
    from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager
    from verl.utils.megatron_utils import (MegatronLRScheduler, build_megatron_model, build_megatron_optimizer,
                                           init_megatron_parallel)
    from verl.workers.actor.megatron_actor import MegatronPPOActor

    dist.init_process_group(get_nccl_backend())
    path = _tiny_mixtral(out_dir)
    hf_config = AutoConfig.from_pretrained(path)
    mcfg = _megatron_cfg(tp, pp, expert_model_parallel_size=ep)
    init_megatron_parallel(mcfg, "actor_rollout_ref.actor.megatron")
    optim = {"lr": 1e-3, "weight_decay": 0.01}
    actor_cfg = OmegaConf.create({"ppo_mini_batch_size": 8, "ppo_micro_batch_size_per_gpu": 4, "clip_ratio": 0.2})
    contents = ["model", "optimizer", "extra", "hf_model"]

    def build():
        chunks, tf_config, converter = build_megatron_model(hf_config, mcfg, path)
        optimizer = build_megatron_optimizer(chunks, optim, mcfg, grad_clip=1.0)
        scheduler = MegatronLRScheduler(optimizer, optim)
        manager = MegatronCheckpointManager(chunks,
                                            optimizer,
                                            scheduler,
                                            converter=converter,
                                            hf_config=hf_config,
                                            checkpoint_config={
                                                "save_contents": contents,
                                                "load_contents": contents
                                            })
        return MegatronPPOActor(actor_cfg, hf_config, tf_config, chunks, optimizer), manager

    data = _batch(hf_config.vocab_size)
    data.meta_info["micro_batch_size"] = 4
    actor, manager = build()
    actor.update_policy(data)
    ckpt = os.path.join(out_dir, "global_step_1", "actor")
    manager.save_checkpoint(ckpt, global_step=1)
    saved_lp, _ = actor.compute_log_prob(data)
    actor.update_policy(data)
    next_lp, _ = actor.compute_log_prob(data)

    resumed, resumed_manager = build()
    resumed_manager.load_checkpoint(ckpt)
    assert (resumed.compute_log_prob(data)[0] - saved_lp).abs().max() < 1e-6
    resumed.update_policy(data)
    replay = (resumed.compute_log_prob(data)[0] - next_lp).abs().max().item()
    assert replay < 1e-6, replay
    if dist.get_rank() == 0:
        mask = data.batch["response_mask"].bool()
        merged = merge_megatron_checkpoint(ckpt, os.path.join(out_dir, "merged"))
        for hf_dir in (os.path.join(ckpt, "huggingface"), merged):
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
            with torch.no_grad():
                err = (_hf_log_probs(hf, data) - saved_lp)[mask].abs().max().item()
            assert err < 2e-4, (hf_dir, err)


def check_critic(tp: int, pp: int) -> None:
    """The value head gives finite values; an update lowers the value loss on the same batch."""
    from verl.utils.megatron_utils import build_megatron_model, build_megatron_optimizer
    from verl.workers.critic.megatron_critic import MegatronPPOCritic

    path, hf_config, mcfg, _ = _setup(tp, pp)
    chunks, tf_config, _ = build_megatron_model(hf_config, mcfg, path, value_head=True)
    optimizer = build_megatron_optimizer(chunks, {"lr": 1e-3, "weight_decay": 0.0}, mcfg, grad_clip=1.0)
    cfg = OmegaConf.create({
        "ppo_mini_batch_size": 8,
        "ppo_micro_batch_size_per_gpu": 4,
        "ppo_epochs": 1,
        "cliprange_value": 100.0,
        "loss_agg_mode": "token-mean"
    })
    critic = MegatronPPOCritic(cfg, hf_config, tf_config, chunks, optimizer)
    data = _batch(hf_config.vocab_size)
    data.meta_info["micro_batch_size"] = 4
    values = critic.compute_values(data)
    mask = data.batch["response_mask"].float()
    assert values.shape == mask.shape and torch.isfinite(values).all()

    def vloss(v):
        return (((v - data.batch["returns"])**2) * mask).sum() / mask.sum()

    before = vloss(values).item()
    for _ in range(3):
        data.batch["values"] = critic.compute_values(data)
        critic.update_critic(data)
    after = vloss(critic.compute_values(data)).item()
    assert after < before, f"value loss did not decrease: {before} -> {after}"


def check_critic_vs_hf(tp: int, pp: int, cp: int = 1) -> None:
    """The critic's values equal the HF backbone's last hidden states times the value head, and one critic update
    (token-mean value loss) equals one HF AdamW step on the same loss (so the gradient, summed over CP ranks, is
    the full-sequence gradient)."""
    from transformers import AutoModelForCausalLM

    from verl.utils.megatron_utils import build_megatron_model, build_megatron_optimizer, unwrap_model
    from verl.workers.critic.base import ppo_value_loss
    from verl.workers.critic.megatron_critic import MegatronPPOCritic

    path, hf_config, mcfg, info = _setup(tp, pp, context_parallel_size=cp)
    assert info.cp_size == cp
    chunks, tf_config, _ = build_megatron_model(hf_config, mcfg, path, value_head=True)
    optimizer = build_megatron_optimizer(chunks, {"lr": 1e-3, "weight_decay": 0.0}, mcfg, grad_clip=1e9)
    cfg = OmegaConf.create({
        "ppo_mini_batch_size": 8,
        "ppo_micro_batch_size_per_gpu": 4,
        "ppo_epochs": 1,
        "cliprange_value": 100.0,
        "loss_agg_mode": "token-mean"
    })
    critic = MegatronPPOCritic(cfg, hf_config, tf_config, chunks, optimizer)
    data = _batch(hf_config.vocab_size)
    data.meta_info["micro_batch_size"] = 3
    head_weight = unwrap_model(chunks[-1]).output_layer.weight.detach().cpu().clone()
    values = critic.compute_values(data)

    backbone = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).model
    head = torch.nn.Linear(head_weight.shape[1], 1, bias=False)
    head.weight.data.copy_(head_weight)
    length = data.batch["responses"].shape[-1]
    mask = data.batch["response_mask"].bool()

    def hf_values() -> torch.Tensor:
        hidden = backbone(input_ids=data.batch["input_ids"],
                          attention_mask=data.batch["attention_mask"],
                          position_ids=data.batch["position_ids"]).last_hidden_state
        return head(hidden)[:, -length - 1:-1, 0]

    with torch.no_grad():
        ref = hf_values()
    err = (values - ref)[mask].abs().max().item()
    _report("critic values max |megatron - HF backbone x head|", err, tp, pp)
    assert err < 2e-4, f"critic values differ from HF by {err}"

    data.batch["values"] = values.clone()
    metrics = critic.update_critic(data)
    after = critic.compute_values(data)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    loss, _ = ppo_value_loss(hf_values(), data.batch, 100.0, "token-mean")
    loss.backward()
    hf_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()
    norm = metrics["critic/grad_norm"][0]
    _report(f"critic gradient norm: megatron {norm:.6g}, HF {hf_norm:.6g}", abs(norm - hf_norm), tp, pp)
    assert abs(norm - hf_norm) < 1e-4 * max(1.0, hf_norm), (norm, hf_norm)
    opt.step()
    with torch.no_grad():
        hf_after = hf_values()
    moved = (after - values)[mask].abs().max().item()
    err = (after - hf_after)[mask].abs().max().item()
    _report(f"critic after one update (moved {moved:.3g}): values max |megatron - HF AdamW|", err, tp, pp)
    assert moved > 1e-4 and err < 5e-3 * max(1.0, moved), (moved, err)


def check_weights(tp: int, pp: int) -> None:
    """The sharding manager's generator yields the HF checkpoint's tensors, in bounded buckets, on every rank, and
    loads them into an HF rollout model."""
    from transformers import AutoModelForCausalLM

    from verl.utils.megatron_utils import build_megatron_model
    from verl.workers.sharding_manager.megatron_hf import MegatronHFShardingManager

    path, hf_config, mcfg, _ = _setup(tp, pp)
    chunks, tf_config, converter = build_megatron_model(hf_config, mcfg, path, wrap_ddp=False)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    rollout = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        for p in rollout.parameters():
            p.zero_()
    bucket_bytes = 300_000
    manager = MegatronHFShardingManager(chunks, converter, inference_module=rollout, bucket_bytes=bucket_bytes)
    seen = {}
    for bucket in manager.iter_weight_buckets():
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert size <= bucket_bytes or len(bucket) == 1, f"bucket of {size} bytes over the bound {bucket_bytes}"
        seen.update(bucket)
    assert set(seen) == {k for k in reference if not k.endswith("inv_freq")}, sorted(set(reference) ^ set(seen))
    for k, t in seen.items():
        assert torch.equal(t.cpu(), reference[k]), k
    with manager:
        pass
    for k, t in rollout.state_dict().items():
        assert torch.equal(t, reference[k]), k
    assert manager.metrics["perf/weight_sync_buckets"] > 1


def _checkpointed_actors(tp: int, pp: int, cp: int = 1):
    """``(build, data)``: ``build(save_contents, load_contents=None) -> (actor, scheduler, manager)`` makes a fresh
    Megatron actor with its optimizer, lr schedule and checkpoint manager (TP x PP over this job's ranks); several
    builds in one process stand for a run and its resumption."""
    from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager
    from verl.utils.megatron_utils import MegatronLRScheduler, build_megatron_model, build_megatron_optimizer
    from verl.workers.actor.megatron_actor import MegatronPPOActor

    path, hf_config, mcfg, _ = _setup(tp, pp, context_parallel_size=cp)
    optim = {"lr": 1e-3, "weight_decay": 0.01}
    actor_cfg = OmegaConf.create({"ppo_mini_batch_size": 8, "ppo_micro_batch_size_per_gpu": 4, "clip_ratio": 0.2})

    def build(save_contents: list, load_contents: list | None = None):
        chunks, tf_config, converter = build_megatron_model(hf_config, mcfg, path)
        optimizer = build_megatron_optimizer(chunks, optim, mcfg, grad_clip=1.0)
        scheduler = MegatronLRScheduler(optimizer, optim)
        ckpt_cfg = {"save_contents": save_contents, "load_contents": load_contents or save_contents}
        manager = MegatronCheckpointManager(chunks,
                                            optimizer,
                                            scheduler,
                                            converter=converter,
                                            hf_config=hf_config,
                                            checkpoint_config=ckpt_cfg)
        return MegatronPPOActor(actor_cfg, hf_config, tf_config, chunks, optimizer), scheduler, manager

    data = _batch(hf_config.vocab_size)
    data.meta_info["micro_batch_size"] = 8
    return build, data


def check_checkpoint(tp: int, pp: int, out_dir: str, cp: int = 1) -> None:
    """Megatron dist checkpoint: save after two updates, take a third; a fresh model and optimizer (a new process
    resuming) load the checkpoint, get the saved weights, lr step and Adam state back, and replay the third update
    exactly (Adam's step counter included: a restarted bias correction would move the weights differently)."""
    build, data = _checkpointed_actors(tp, pp, cp)
    contents = ["model", "optimizer", "extra", "hf_model"]
    actor, scheduler, manager = build(contents)
    for _ in range(2):
        actor.update_policy(data)
        scheduler.step()
    ckpt = os.path.join(out_dir, "global_step_2", "actor")
    manager.save_checkpoint(ckpt, global_step=2)
    saved_lp, _ = actor.compute_log_prob(data)
    actor.update_policy(data)
    scheduler.step()
    next_lp, _ = actor.compute_log_prob(data)
    assert not torch.allclose(next_lp, saved_lp)

    resumed, resumed_scheduler, resumed_manager = build(contents)
    resumed_manager.load_checkpoint(ckpt)
    assert resumed_scheduler.last_step == 2
    restored_lp, _ = resumed.compute_log_prob(data)
    assert torch.allclose(restored_lp, saved_lp, atol=1e-6)
    resumed.update_policy(data)
    replayed_lp, _ = resumed.compute_log_prob(data)
    assert (replayed_lp - next_lp).abs().max() < 1e-6, (replayed_lp - next_lp).abs().max()
    # the live optimizer can load too (in place), and replays the same update again
    manager.load_checkpoint(ckpt)
    actor.update_policy(data)
    assert (actor.compute_log_prob(data)[0] - next_lp).abs().max() < 1e-6
    if dist.get_rank() == 0:  # the HF export loads in transformers and equals the saved weights
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(os.path.join(ckpt, "huggingface"), dtype=torch.float32)
        with torch.no_grad():
            lp_hf = _hf_log_probs(hf, data)
        mask = data.batch["response_mask"].bool()
        assert (lp_hf - saved_lp)[mask].abs().max() < 2e-4


def check_reshard_save(tp: int, pp: int, out_dir: str) -> None:
    """First half of a resume with other TP / PP sizes: train, save, and keep the saved policy's log-probs."""
    build, data = _checkpointed_actors(tp, pp)
    actor, _, manager = build(["model", "optimizer", "extra"])
    actor.update_policy(data)
    manager.save_checkpoint(os.path.join(out_dir, "global_step_1", "actor"), global_step=1)
    log_probs, _ = actor.compute_log_prob(data)
    if dist.get_rank() == 0:
        torch.save(log_probs, os.path.join(out_dir, "saved_log_probs.pt"))


def check_reshard_load(tp: int, pp: int, out_dir: str) -> None:
    """Second half, with other sizes: the optimizer state cannot follow (a clear error naming the fix), the weights
    alone can (``load_contents=[model]``) and give the saved policy back; training goes on from there."""
    ckpt = os.path.join(out_dir, "global_step_1", "actor")
    build, data = _checkpointed_actors(tp, pp)
    _, _, manager = build(["model", "optimizer"])
    try:
        manager.load_checkpoint(ckpt)
    except ValueError as exc:
        assert "checkpoint.load_contents=[model]" in str(exc) and "parallel sizes" in str(exc), exc
    else:
        raise AssertionError("loading the optimizer state into other TP / PP sizes must fail with a clear error")
    actor, _, weights_only = build(["model", "optimizer"], load_contents=["model"])
    weights_only.load_checkpoint(ckpt)
    saved = torch.load(os.path.join(out_dir, "saved_log_probs.pt"))
    restored, _ = actor.compute_log_prob(data)
    assert (restored - saved).abs().max() < 1e-5, (restored - saved).abs().max()
    actor.update_policy(data)
    assert torch.isfinite(actor.compute_log_prob(data)[0]).all()


class _MockVLLMRollout:
    """The vLLMRollout surface the vLLM hybrid engine uses (a mock of the engine boundary): records the call order
    and every ``(name, tensor)`` that ``update_weights`` pulls, lazily, as vLLM's loaders do."""

    model_dtype = torch.bfloat16

    def __init__(self):
        self.calls, self.loaded, self.is_sleeping = [], {}, False

    def sleep(self, level=1):
        self.calls.append("sleep")
        self.is_sleeping = True

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up:{','.join(tags or [])}")
        self.is_sleeping = False

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def update_weights(self, weights):
        self.calls.append("update_weights")
        count = 0
        for name, tensor in weights:
            self.loaded[name] = tensor.clone()
            count += 1
        return {"tensors": count, "bytes": 0}


class _MockSGLangEngine:
    """The SGLang engine-adapter surface the SGLang hybrid engine uses (a mock of the engine boundary)."""

    kind = "engine"
    tp_size = 1

    def __init__(self):
        self.calls, self.loaded, self.buckets = [], {}, []

    def begin_weight_update(self):
        self.calls.append("begin")

    def update_weights_from_tensor(self, named, flush_cache=False):
        self.buckets.append(sum(t.numel() * t.element_size() for _, t in named))
        self.loaded.update({n: t.clone() for n, t in named})

    def end_weight_update(self):
        self.calls.append("end")

    def flush_cache(self):
        self.calls.append("flush_cache")

    def release_memory_occupation(self, tags=None):
        self.calls.append("release")

    def resume_memory_occupation(self, tags=None):
        self.calls.append("resume")


def check_engine_mock(tp: int, pp: int) -> None:
    """The Megatron vLLM / SGLang hybrid engines stream the HF checkpoint's tensors (cast to the engine's dtype, in
    bounded buckets, every rank) into mock engines around the engines' own wake/sleep calls, with the actor's
    parameters offloaded between syncs."""
    from transformers import AutoModelForCausalLM

    from verl.utils.megatron_utils import build_megatron_model, offload_megatron_model
    from verl.workers.sharding_manager.megatron_sglang import MegatronSGLangShardingManager
    from verl.workers.sharding_manager.megatron_vllm import MegatronVLLMShardingManager

    path, hf_config, mcfg, _ = _setup(tp, pp)
    chunks, _, converter = build_megatron_model(hf_config, mcfg, path, wrap_ddp=False)
    reference = {
        k: v
        for k, v in AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict().items()
        if not k.endswith("inv_freq")
    }
    bucket_bytes = 300_000
    largest = max(t.numel() for t in reference.values()) * 2  # bf16

    def check_loaded(loaded: dict, dtype: torch.dtype) -> None:
        assert set(loaded) == set(reference), sorted(set(loaded) ^ set(reference))
        for k, t in loaded.items():
            assert t.dtype == dtype, (k, t.dtype)
            assert torch.equal(t.cpu(), reference[k].to(dtype)), k

    store: dict = {}
    offload_megatron_model(chunks, store)  # param_offload: the parameters live in host memory between phases
    rollout = _MockVLLMRollout()
    vllm_manager = MegatronVLLMShardingManager(chunks,
                                               converter,
                                               rollout,
                                               bucket_bytes=bucket_bytes,
                                               offload_param=True,
                                               param_store=store)
    assert rollout.calls == ["sleep"]  # asleep until the first generation
    with vllm_manager:
        assert rollout.calls[1:] == ["wake_up:weights", "update_weights", "wake_up:kv_cache", "reset_prefix_cache"]
    assert rollout.calls[-1] == "sleep" and rollout.is_sleeping
    check_loaded(rollout.loaded, torch.bfloat16)
    assert all(size <= max(bucket_bytes, largest) for _, size in vllm_manager.last_buckets)
    assert len(vllm_manager.last_buckets) == vllm_manager.metrics["perf/weight_sync_buckets"] > 2
    assert all(p.untyped_storage().size() == 0 for c in chunks for p in c.parameters()), "not offloaded again"

    engine = _MockSGLangEngine() if dist.get_rank() == 0 else None  # one rank owns an engine, all take part
    sglang_manager = MegatronSGLangShardingManager(chunks,
                                                   converter,
                                                   engine,
                                                   bucket_bytes=bucket_bytes,
                                                   offload_param=True,
                                                   param_store=store,
                                                   dtype=torch.float32)
    with sglang_manager:
        pass
    assert sglang_manager.metrics["perf/weight_sync_buckets"] > 2
    if engine is not None:
        assert engine.calls == ["release", "resume", "begin", "end", "flush_cache", "release"], engine.calls
        check_loaded(engine.loaded, torch.float32)
        assert all(size <= max(bucket_bytes, largest * 2) for size in engine.buckets)


def main() -> None:
    check, tp, pp, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    ep = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    cp = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    vpp = int(sys.argv[7]) if len(sys.argv) > 7 else None
    if check == "moe_actor":
        check_moe_actor(tp, pp, ep, out_dir)
    elif check == "moe_checkpoint":
        check_moe_checkpoint(tp, pp, ep, out_dir)
    elif check == "actor":
        check_actor(tp, pp, cp, vpp)
    elif check == "critic_vs_hf":
        check_critic_vs_hf(tp, pp, cp)
    elif check == "cp_attention":
        check_cp_attention(cp)
    elif check == "critic":
        check_critic(tp, pp)
    elif check == "weights":
        check_weights(tp, pp)
    elif check == "checkpoint":
        check_checkpoint(tp, pp, out_dir, cp)
    elif check == "reshard_save":
        check_reshard_save(tp, pp, out_dir)
    elif check == "reshard_load":
        check_reshard_load(tp, pp, out_dir)
    elif check == "engine_mock":
        check_engine_mock(tp, pp)
    else:
        raise SystemExit(f"unknown check {check!r}")
    dist.barrier()
    with open(os.path.join(out_dir, f"ok-{check}-{dist.get_rank()}"), "w") as f:
        f.write("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
