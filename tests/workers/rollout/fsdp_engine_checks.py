"""The FSDP worker's hybrid engine with a real vLLM / SGLang engine on a tiny Mixtral (MoE): run by
``test_fsdp_moe_vllm.py`` and ``test_fsdp_moe_sglang.py`` as ``torchrun --nproc_per_node=1 fsdp_engine_checks.py
ENGINE OUT_DIR`` (a process of its own: the actor's and the engine's distributed state stay out of the pytest
process).

transformers 5 holds Mixtral's experts fused in memory (``mlp.experts.gate_up_proj`` / ``down_proj``, router
``mlp.gate``); the engines' loaders take the checkpoint names (``block_sparse_moe.experts.E.w1/w2/w3.weight``,
``block_sparse_moe.gate.weight``). The rank builds ``verl.workers.fsdp_workers.ActorRolloutRefWorker`` (role
``actor_rollout``, FSDP2, config composed from ``ppo_trainer.yaml`` with ``rollout.name=ENGINE``) and checks:

1. after the first sync (from the engine's dummy weights), greedy generation equals the HF rollout of the checkpoint,
   token for token, and the engine's log-probs equal the FSDP actor's (``compute_log_prob``);
2. after one PPO update of the actor (``update_actor``, large lr), the sync makes greedy generation equal the HF
   rollout of an HF model holding the actor's new weights, and the engine's log-probs equal the updated actor's while
   differing from the old ones by far more than the tolerance (a stale engine fails);
3. each sync went in several buckets, none above the bound (unless a single tensor), and moved the model once.

Prints the measured differences and writes ``ok-0`` into OUT_DIR when every check passed.
"""
from __future__ import annotations

import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from megatron_engine_checks import (
    BUCKET_MB,
    LOG_PROB_ATOL,
    P,
    R,
    _check_sync_metrics,
    _hf_rollout,  # noqa: E402
    update_with_random_advantages)
from megatron_engine_checks import _prompts as _all_prompts  # noqa: E402


def _config(engine: str, model_path: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import verl
    overrides = [
        f"actor_rollout_ref.model.path={model_path}",
        "actor_rollout_ref.model.enable_gradient_checkpointing=False",
        f"data.max_prompt_length={P}",
        f"data.max_response_length={R}",
        f"actor_rollout_ref.rollout.name={engine}",
        f"actor_rollout_ref.rollout.update_weights_bucket_megabytes={BUCKET_MB}",
        "actor_rollout_ref.rollout.max_num_seqs=16",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.use_torch_compile=False",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.optim.lr=2e-2",
        "actor_rollout_ref.actor.optim.weight_decay=0.0",
    ]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    OmegaConf.resolve(config)
    return config.actor_rollout_ref


def _hf_from_actor(worker):
    """An HF model holding the FSDP actor's current weights (in-memory names, as the actor has them)."""
    from transformers import AutoModelForCausalLM

    from verl.utils.fsdp_utils import get_full_state_dict

    model = AutoModelForCausalLM.from_config(worker.hf_config, dtype=torch.float32, attn_implementation="sdpa")
    model.load_state_dict(get_full_state_dict(worker.actor_module_fsdp), strict=True)
    return model.eval()


def _log_prob_diff(worker, out) -> tuple[float, torch.Tensor]:
    """Max |engine - actor| log-prob over the response tokens, and the actor's log-probs."""
    data = out.select(list(out.batch.keys()), [], [])
    actor = worker.compute_log_prob(data).batch["old_log_probs"]
    mask = out.batch["response_mask"].bool()
    return (out.batch["rollout_log_probs"] - actor).abs()[mask].max().item(), actor


def main() -> None:
    engine, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)  # the CI box has 2 cores for the actor and its engine
    if engine == "sglang" and not torch.cuda.is_available():
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")  # before anything imports SGLang
    from transformers import AutoModelForCausalLM

    from verl.models.tiny import build_tiny_mixtral
    from verl.workers.fsdp_workers import ActorRolloutRefWorker

    start = time.perf_counter()
    model_path = build_tiny_mixtral(os.path.join(out_dir, "mixtral"))  # 4 experts, top-2, decisive routers
    worker = ActorRolloutRefWorker(_config(engine, model_path), role="actor_rollout")
    worker.init_model()
    state = worker.actor_module_fsdp.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state, sorted(state)[:20]  # experts fused in memory
    prompts = _all_prompts(worker.tokenizer, slice(None))
    built = time.perf_counter()

    # 1. the first sync replaces the engine's dummy weights by the checkpoint's
    out0 = worker.generate_sequences(copy.deepcopy(prompts))
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    _check_sync_metrics(out0, hf)
    ref0 = _hf_rollout(worker, hf, prompts)
    greedy0 = torch.equal(out0.batch["responses"], ref0.batch["responses"])
    diff0, _ = _log_prob_diff(worker, out0)
    print(f"[fsdp moe {engine}] first sync: greedy equal {greedy0}, max |engine - actor| log-prob {diff0:.2e}",
          flush=True)
    assert greedy0, f"greedy output differs from the HF rollout:\n{out0.batch['responses']}\n{ref0.batch['responses']}"
    assert out0.batch["response_mask"].sum() > len(prompts)
    assert diff0 < LOG_PROB_ATOL, f"engine vs FSDP actor log-probs before the update: {diff0:.2e}"

    # 2. one PPO update of the actor, then the sync must carry the new weights into the engine
    data = out0.select(list(out0.batch.keys()), [], [])
    update_with_random_advantages(worker, data)

    out1 = worker.generate_sequences(copy.deepcopy(prompts))
    _check_sync_metrics(out1, hf)
    ref1 = _hf_rollout(worker, _hf_from_actor(worker), prompts)
    greedy1 = torch.equal(out1.batch["responses"], ref1.batch["responses"])
    diff1, lp_actor1 = _log_prob_diff(worker, out1)
    mask1 = out1.batch["response_mask"].bool()
    with torch.no_grad():  # the pre-update model scores the new responses differently: a stale engine would fail
        b = out1.batch
        logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
        old = torch.log_softmax(logits[:, P - 1:-1].float(), -1).gather(-1, b["responses"].unsqueeze(-1)).squeeze(-1)
    moved = (old - lp_actor1).abs()[mask1].max().item()
    print(
        f"[fsdp moe {engine}] after the update: greedy equal {greedy1}, max |engine - actor| log-prob {diff1:.2e}, "
        f"update moved log-probs by {moved:.2f}",
        flush=True)
    assert greedy1, f"after the update greedy output differs from the HF model of the actor's weights:\n" \
                    f"{out1.batch['responses']}\n{ref1.batch['responses']}"
    assert diff1 < LOG_PROB_ATOL, f"engine vs updated FSDP actor log-probs: {diff1:.2e}"
    assert moved > 50 * LOG_PROB_ATOL, f"the update moved the log-probs by only {moved:.2f}"

    print(f"[fsdp moe {engine}] build {built - start:.1f}s, checks {time.perf_counter() - built:.1f}s", flush=True)
    with open(os.path.join(out_dir, "ok-0"), "w") as f:
        f.write("ok")
    if engine == "sglang":
        worker.rollout.shutdown()  # its scheduler processes


def run_in_fresh_process(engine: str, out_dir: str, env: dict[str, str]) -> None:
    """Run these checks for ``engine`` under torchrun (one rank) in ``out_dir``; fails with the log's tail unless the
    rank passed, and prints the measured differences."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={port}",
        os.path.abspath(__file__), engine,
        str(out_dir)
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(out_dir))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"fsdp moe -> {engine} failed:\n{log[-8000:]}"
    assert os.path.isfile(os.path.join(out_dir, "ok-0")), log[-3000:]
    print("\n".join(line for line in log.splitlines() if line.startswith("[fsdp moe")))


if __name__ == "__main__":
    main()
