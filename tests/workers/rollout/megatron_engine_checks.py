"""The Megatron worker's hybrid engine with a real vLLM / SGLang engine: run by ``test_megatron_vllm.py`` and
``test_megatron_sglang.py`` as ``torchrun --nproc_per_node=N megatron_engine_checks.py ENGINE MEGATRON_TP ROLLOUT_TP
OUT_DIR [tied | moe [EP]]`` (a process of its own: megatron's CPU patches and parallel state, and the engine's
distributed state, stay out of the pytest process). ``tied``: the tiny model with tied embeddings; ``moe``: a tiny
Mixtral (4 experts, top-2) whose Megatron MoE layers spread over ``EP`` expert-parallel ranks (default 1), so the
weight generator gathers the experts over EP and streams them with HF checkpoint names
(``block_sparse_moe.experts.E.w1/w2/w3.weight``, ``block_sparse_moe.gate.weight``) into the engine.

Each rank builds ``verl.workers.megatron_workers.ActorRolloutRefWorker`` (role ``actor_rollout``, config composed from
``ppo_megatron_trainer.yaml`` with ``rollout.name=ENGINE``) as the worker group would, and checks:

1. after the first sync (from the engine's dummy weights), greedy generation equals the HF rollout of the checkpoint,
   token for token, and the engine's log-probs equal the Megatron actor's (``compute_log_prob``);
2. after one PPO update of the Megatron actor (``update_actor``, large lr), the sync makes greedy generation equal the
   HF rollout of an HF model built from the actor's new weights, and the engine's log-probs equal the updated actor's
   while differing from the old ones by far more than the tolerance (a stale engine fails);
3. each sync went in several buckets, none above the bound (unless a single tensor), and reported its metrics.

Writes ``ok-<rank>`` into OUT_DIR when every check passed.
"""
from __future__ import annotations

import copy
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

P, R = 24, 12
LOG_PROB_ATOL = 1e-3
BUCKET_MB = 0.5  # several buckets for the ~4.3 MB tiny model
TEXTS = [
    "What is 12 + 7?", "Natalia sold clips to 48 of her friends in April.", "hello", "Compute 7 * 8, then add 1.",
    "A train travels 60 miles per hour.", "x + 3 = 10", "Let's think step by step.", "The store sells pencils."
]


def _config(engine: str, tp: int, rollout_tp: int, model_path: str, ep: int = 1):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import verl
    overrides = [
        f"actor_rollout_ref.model.path={model_path}",
        f"data.max_prompt_length={P}",
        f"data.max_response_length={R}",
        f"actor_rollout_ref.rollout.name={engine}",
        f"actor_rollout_ref.rollout.tensor_model_parallel_size={rollout_tp}",
        f"actor_rollout_ref.rollout.update_weights_bucket_megabytes={BUCKET_MB}",
        "actor_rollout_ref.rollout.max_num_seqs=16",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.optim.lr=2e-2",
        "actor_rollout_ref.actor.optim.weight_decay=0.0",
        f"actor_rollout_ref.actor.megatron.tensor_model_parallel_size={tp}",
        f"actor_rollout_ref.actor.megatron.expert_model_parallel_size={ep}",
    ]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_megatron_trainer", overrides=overrides)
    OmegaConf.resolve(config)
    return config.actor_rollout_ref


def _prompts(tokenizer, rows: slice):
    from verl.protocol import DataProto
    from verl.utils.torch_functional import compute_position_id_with_mask

    encoded = [tokenizer(text)["input_ids"][-P:] for text in TEXTS[rows]]
    pad = tokenizer.pad_token_id
    ids = torch.full((len(encoded), P), pad, dtype=torch.long)
    mask = torch.zeros(len(encoded), P, dtype=torch.long)
    for i, row in enumerate(encoded):
        ids[i, P - len(row):] = torch.tensor(row)
        mask[i, P - len(row):] = 1
    return DataProto.from_dict(
        {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": compute_position_id_with_mask(mask)
        },
        non_tensors={"uid": np.array([f"u{i}" for i in range(len(encoded))], dtype=object)},
        meta_info={
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": pad,
            "do_sample": False,
            "calculate_log_probs": True
        })


def _all_rows(data):
    """The rollout output of every rank, in rank order (what the driver collects from the ``rollout`` mesh)."""
    from verl.protocol import DataProto

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, data.select(list(data.batch.keys()), [], []).to("cpu"))
    return DataProto.concat(parts)


def _actor_log_probs(worker, out):
    """``compute_log_prob`` on the ``actor`` mesh: each Megatron DP rank gets its chunk of all ranks' rows; the
    log-probs of this rank's own rows are returned."""
    everything = _all_rows(out)
    dp_rank, dp_size = worker.parallel.dp_rank, worker.parallel.dp_size
    chunk = everything.chunk(dp_size)[dp_rank]
    lp = worker.compute_log_prob(chunk).batch["old_log_probs"]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (dp_rank, lp))
    by_dp = {}
    for rank, piece in gathered:
        by_dp.setdefault(rank, piece)
    full = torch.cat([by_dp[d] for d in range(dp_size)])
    start = len(out) * dist.get_rank()
    return full[start:start + len(out)], everything


def _hf_rollout(worker, module, prompts):
    from verl.workers.rollout.hf import HFRollout

    return HFRollout(module, worker.config.rollout, tokenizer=worker.tokenizer).generate_sequences(prompts)


def _hf_from_actor(worker):
    """An HF model holding the Megatron actor's current weights (the HF rollout's hybrid engine: a collective)."""
    from transformers import AutoModelForCausalLM

    from verl.workers.sharding_manager.megatron_hf import MegatronHFShardingManager

    model = AutoModelForCausalLM.from_config(worker.hf_config, dtype=torch.float32, attn_implementation="sdpa")
    with MegatronHFShardingManager(worker.actor_module, worker.converter, inference_module=model):
        pass
    return model.eval()


def _check_sync_metrics(out, model) -> None:
    """The sync moved the whole model once, in several buckets, none above the bound but for a single tensor."""
    metrics = out.meta_info["metrics"]
    for key in ("perf/weight_sync_s", "perf/weight_sync_gb", "perf/weight_sync_buckets",
                "perf/weight_sync_max_bucket_mb", "timing_s/weight_sync"):
        assert key in metrics, f"missing {key}: {sorted(metrics)}"
    sizes = [v.numel() * v.element_size() for v in model.state_dict().values()]  # a tied lm_head is sent too
    assert metrics["perf/weight_sync_buckets"] > 2, metrics
    assert metrics["perf/weight_sync_max_bucket_mb"] <= max(BUCKET_MB, max(sizes) / float(1 << 20)) + 1e-9, metrics
    assert abs(metrics["perf/weight_sync_gb"] * (1 << 30) - sum(sizes)) < 1, (metrics, sum(sizes))


def update_with_random_advantages(worker, data) -> None:
    """One PPO update of the worker's actor on ``data`` (its rollout), with fixed random advantages: the policy
    moves, so a stale engine after the next sync fails the checks."""
    data.batch["old_log_probs"] = worker.compute_log_prob(data).batch["old_log_probs"]
    g = torch.Generator().manual_seed(0)
    data.batch["advantages"] = torch.randn(data.batch["response_mask"].shape, generator=g) * data.batch["response_mask"]
    metrics = worker.update_actor(data).meta_info["metrics"]
    assert metrics["actor/lr"] > 0


def main() -> None:
    engine, tp, rollout_tp, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    variant = sys.argv[5] if len(sys.argv) > 5 else "dense"
    tied = variant == "tied"  # the tiny model with tie_word_embeddings (as Qwen2.5-0.5B .. 3B)
    moe = variant == "moe"  # tiny Mixtral, experts over EP ranks
    ep = int(sys.argv[6]) if moe and len(sys.argv) > 6 else 1
    torch.set_num_threads(1)  # the CI box has 2 cores for all ranks and their engines
    if engine == "sglang" and not torch.cuda.is_available():
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")  # before anything imports SGLang
    from transformers import AutoModelForCausalLM

    from verl.workers.megatron_workers import ActorRolloutRefWorker

    start = time.perf_counter()
    from verl.models.tiny import build_tiny_mixtral, build_tiny_model, get_tiny_model_path

    own_dir = os.path.join(out_dir, f"{variant}-{os.environ.get('RANK', '0')}")
    if tied:
        model_path = build_tiny_model(own_dir, tie_word_embeddings=True)
    elif moe:
        model_path = build_tiny_mixtral(own_dir)  # 4 experts, top-2, decisive routers
    else:
        model_path = get_tiny_model_path()
    config = _config(engine, tp, rollout_tp, model_path, ep=ep)
    worker = ActorRolloutRefWorker(config, role="actor_rollout")
    worker.init_model()
    if moe:  # MoE layers really are split over the EP ranks
        assert worker.tf_config.num_moe_experts == 4 and worker.converter.num_local_experts == 4 // ep
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = len(TEXTS) // world
    prompts = _prompts(worker.tokenizer, slice(rank * per_rank, (rank + 1) * per_rank))
    built = time.perf_counter()

    # 1. the first sync replaces the engine's dummy weights by the checkpoint's
    out0 = worker.generate_sequences(copy.deepcopy(prompts))  # the TP group's all-gather extends its argument
    hf = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=torch.float32, attn_implementation="sdpa")
    _check_sync_metrics(out0, hf)
    ref0 = _hf_rollout(worker, hf.eval(), prompts)
    assert torch.equal(out0.batch["responses"], ref0.batch["responses"]), \
        f"greedy output differs from the HF rollout:\n{out0.batch['responses']}\n{ref0.batch['responses']}"
    assert out0.batch["response_mask"].sum() > len(prompts)
    mask0 = out0.batch["response_mask"].bool()
    lp_actor0, everything0 = _actor_log_probs(worker, out0)
    diff0 = (out0.batch["rollout_log_probs"] - lp_actor0).abs()[mask0].max().item()
    assert diff0 < LOG_PROB_ATOL, f"engine vs Megatron actor log-probs before the update: {diff0:.2e}"

    # 2. one PPO update of the Megatron actor, then the sync must carry the new weights into the engine
    data = everything0.chunk(worker.parallel.dp_size)[worker.parallel.dp_rank]
    update_with_random_advantages(worker, data)

    out1 = worker.generate_sequences(copy.deepcopy(prompts))
    _check_sync_metrics(out1, hf)
    ref1 = _hf_rollout(worker, _hf_from_actor(worker), prompts)
    assert torch.equal(out1.batch["responses"], ref1.batch["responses"]), \
        f"after the update greedy output differs from the HF model of the actor's weights:\n" \
        f"{out1.batch['responses']}\n{ref1.batch['responses']}"
    mask1 = out1.batch["response_mask"].bool()
    lp_actor1, _ = _actor_log_probs(worker, out1)
    diff1 = (out1.batch["rollout_log_probs"] - lp_actor1).abs()[mask1].max().item()
    assert diff1 < LOG_PROB_ATOL, f"engine vs updated Megatron actor log-probs: {diff1:.2e}"
    with torch.no_grad():  # the pre-update model scores the new responses differently: a stale engine would fail
        b = out1.batch
        logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
        old = torch.log_softmax(logits[:, P - 1:-1].float(), -1).gather(-1, b["responses"].unsqueeze(-1)).squeeze(-1)
    moved = (old - lp_actor1).abs()[mask1].max().item()
    assert moved > 50 * LOG_PROB_ATOL, f"the update moved the log-probs by only {moved:.2e}"

    print(
        f"[rank {rank}] engine={engine} megatron tp={tp} rollout tp={rollout_tp}"
        f"{f' moe ep={ep}' if moe else ''}: build {built - start:.1f}s, "
        f"checks {time.perf_counter() - built:.1f}s; log-prob diff {diff0:.1e} / {diff1:.1e}, moved {moved:.2f}",
        flush=True)
    dist.barrier()
    with open(os.path.join(out_dir, f"ok-{rank}"), "w") as f:
        f.write("ok")
    if engine == "sglang":
        worker.rollout.shutdown()  # its scheduler processes
    # the process group stays: vLLM's exit hook destroys its own groups in it


if __name__ == "__main__":
    main()
