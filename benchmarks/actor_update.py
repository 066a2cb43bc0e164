"""The actor update alone (forward, backward, gradient clip, AdamW step over one GRPO batch): this library's
FSDP2 actor against the same work in a plain loop, to find where the training half of a GRPO step goes.

The GPU GRPO step (``grpo_step.py``) trains ~1.5x slower than TRL's. That comparison includes everything around the
update (Ray dispatch, data movement, the trainer). Here the update runs in one process, on one device, on the same
synthetic batch (random prompt and response tokens, left-padded prompts, group-normalised advantages), three ways:

* ``ours``: :class:`~verl.workers.actor.DataParallelPPOActor` over the model as the FSDP worker builds it
  (:func:`verl.workers.fsdp_workers.build_fsdp_model`: FSDP2 over a one-rank mesh, fp32 master weights, bf16
  compute on CUDA) with the worker's AdamW;
* ``ours-unsharded``: the same actor over the plain Hugging Face module (fp32 weights) under bf16 autocast on CUDA:
  the difference to ``ours`` is what FSDP2 costs on one device;
* ``plain``: a minimal hand-written loop of the same loss, the way TRL computes it (plain module, bf16 autocast,
  logits only at the completion positions, log-softmax of the picked token, clipped ratio, token-mean), then
  ``clip_grad_norm_`` and ``AdamW.step``: a floor for the work.

Each side runs in a fresh process (its own peak memory). ``--profile`` adds the top operators by device time (CPU
time on CPU) of one update per side.

    python benchmarks/actor_update.py                                   # tiny model, CPU or GPU
    python benchmarks/actor_update.py --size qwen0.5b --rows 128 --response-length 256 --micro-batch 16 --profile
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402

SIDES = ("ours", "ours-unsharded", "plain")


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", help="model: tiny | small | qwen0.5b | a model directory")
    parser.add_argument("--rows", type=int, default=32, help="rows (samples) in the update's one mini-batch")
    parser.add_argument("--prompt-length", type=int, default=32, help="prompt columns (left-padded)")
    parser.add_argument("--response-length", type=int, default=32, help="response columns (all valid)")
    parser.add_argument("--micro-batch", type=int, default=16, help="rows per forward/backward")
    parser.add_argument("--updates", type=int, default=4, help="updates per side; the first is warm-up")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    parser.add_argument("--ours-fsdp",
                        action="append",
                        default=[],
                        metavar="KEY=VALUE",
                        help="also run ours with this fsdp_config override (e.g. reshard_after_forward=False); "
                        "repeatable, one more side each")
    parser.add_argument("--profile", action="store_true", help="print the top operators of one more update")
    parser.add_argument("--empty-cache",
                        action="store_true",
                        help="release the allocator's cached device memory before every update, as the hybrid "
                        "engine's phases do between generation and training")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def _batch(spec: dict[str, Any], vocab: int) -> Any:
    """The synthetic GRPO batch (CPU tensors) every side trains on."""
    import torch

    from verl.protocol import DataProto

    rows, P, R = spec["rows"], spec["prompt_length"], spec["response_length"]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, vocab, (rows, P), generator=g)
    prompt_mask = torch.ones(rows, P, dtype=torch.long)
    for i in range(rows):  # left padding of 0..P/4 columns, as prompts of different lengths get
        prompt_mask[i, :int(torch.randint(0, P // 4 + 1, (1,), generator=g))] = 0
    responses = torch.randint(1, vocab, (rows, R), generator=g)
    response_mask = torch.ones(rows, R, dtype=torch.long)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    scores = torch.randn(rows, generator=g)
    return DataProto.from_dict(
        tensors={
            "responses": responses,
            "input_ids": torch.cat([prompts * prompt_mask, responses], dim=1),
            "attention_mask": attention_mask,
            "position_ids": torch.clamp(attention_mask.cumsum(-1) - 1, min=0),
            "response_mask": response_mask,
            "advantages": ((scores - scores.mean()) / scores.std())[:, None].expand(rows, R).contiguous(),
        })


def _actor_config(spec: dict[str, Any]) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "ppo_mini_batch_size": spec["rows"],
        "ppo_micro_batch_size_per_gpu": spec["micro_batch"],
        "use_dynamic_bsz": False,
        "clip_ratio": 0.2,
        "entropy_coeff": 0,
        "use_kl_loss": False,
        "loss_agg_mode": "token-mean",
        "ppo_epochs": 1,
        "shuffle": False,
        "grad_clip": 1.0,
        "use_remove_padding": False,
        "policy_loss": {
            "loss_mode": "vanilla"
        },
    })


def yaml_value(text: str) -> Any:
    """A command-line value as YAML reads it (``False`` -> bool, ``2`` -> int, ``bf16`` -> str)."""
    import yaml

    return yaml.safe_load(text)


def _optim_config() -> dict[str, Any]:
    return {"lr": 1e-6, "weight_decay": 0.01, "betas": [0.9, 0.999]}


def _plain_update(model: Any, optimizer: Any, data: Any, spec: dict[str, Any], device: str) -> None:
    """The loss as TRL computes it: completion logits only, picked-token log-softmax, clipped ratio, token-mean."""
    import torch

    R = spec["response_length"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)
    batch = data.batch.to(device)
    total_tokens = batch["response_mask"].sum()
    optimizer.zero_grad(set_to_none=True)
    for start in range(0, spec["rows"], spec["micro_batch"]):
        mb = {k: v[start:start + spec["micro_batch"]] for k, v in batch.items()}
        with autocast:
            logits = model(input_ids=mb["input_ids"],
                           attention_mask=mb["attention_mask"],
                           position_ids=mb["position_ids"],
                           use_cache=False,
                           logits_to_keep=R + 1).logits[:, :-1]
        logits = logits.float()
        log_probs = logits.gather(-1, mb["responses"].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        ratio = torch.exp(log_probs - log_probs.detach())
        adv = mb["advantages"]
        per_token = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
        loss = (per_token * mb["response_mask"]).sum() / total_tokens
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One side in this (fresh) process."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    import verl.utils.fsdp_utils as fsdp_utils
    from verl.workers.actor import DataParallelPPOActor
    from verl.workers.config_helpers import build_optimizer

    device, side = spec["device"], spec["side"].split(" ")[0]
    if device == "cpu":
        torch.set_num_threads(int(spec["threads"]))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    phases: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:

        def wrapper(*a: Any, **k: Any) -> Any:
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    if side == "ours":
        from verl.utils.fsdp_utils import create_device_mesh
        from verl.workers.fsdp_workers import build_fsdp_model
        from verl.workers.role_common import init_distributed

        init_distributed()
        from omegaconf import OmegaConf

        fsdp_config = OmegaConf.create({})
        for item in spec.get("fsdp_overrides", []):
            key, value = item.split("=", 1)
            OmegaConf.update(fsdp_config, key, yaml_value(value), force_add=True)
        model, _ = build_fsdp_model(spec["model_path"],
                                    AutoModelForCausalLM,
                                    create_device_mesh(1, -1),
                                    fsdp_config=fsdp_config,
                                    train=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model_path"],
                                                     dtype=torch.float32,
                                                     attn_implementation="sdpa").to(device)
        model.config.use_cache = False
        model.train()
    optimizer = build_optimizer(model.parameters(), _optim_config())
    optimizer.step = timed("optimizer step", optimizer.step)
    data = _batch(spec, model.config.vocab_size)

    if side == "plain":
        fsdp_clip = torch.nn.utils.clip_grad_norm_
        torch.nn.utils.clip_grad_norm_ = timed("gradient clip", fsdp_clip)

        def update() -> None:
            _plain_update(model, optimizer, data, spec, device)
    else:
        fsdp_utils.clip_grad_norm_ = timed("gradient clip", fsdp_utils.clip_grad_norm_)
        actor = DataParallelPPOActor(_actor_config(spec), model, optimizer)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if side == "ours-unsharded" and device == "cuda" else contextlib.nullcontext())

        def update() -> None:
            with autocast:
                actor.update_policy(data)

    times, phase_runs = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(spec["updates"]):
        phases.clear()
        sync()
        if spec["empty_cache"] and device == "cuda":
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        update()
        sync()
        times.append(time.perf_counter() - t0)
        phase_runs.append(dict(phases))
    peak = (torch.cuda.max_memory_allocated()
            if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
    timed_runs = times[1:] or times
    result = {
        "side": side,
        "update_s": statistics.median(timed_runs),
        "update_s_all": times,
        "phases_s": {
            k: statistics.median(r.get(k, 0.0) for r in (phase_runs[1:] or phase_runs))
            for k in ("gradient clip", "optimizer step")
        },
        "peak_gb": peak,
        "top_ops": [],
    }
    if spec["profile"]:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            update()
            sync()
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:15]
        result["host_syncs"] = sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")
        result["top_ops"] = [{
            "op": e.key[:60],
            "calls": e.count,
            "ms": getattr(e, key, 0.0) / 1e3,
        } for e in events]
    return result


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = _parse(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown or not sides:
        raise ValueError(f"--sides {args.sides!r}: unknown {unknown}; choose from {', '.join(SIDES)}")
    for item in args.ours_fsdp:
        if "=" not in item:
            raise ValueError(f"--ours-fsdp {item!r} must be KEY=VALUE (a key of fsdp_config)")
    variants = {side: [] for side in sides}
    variants.update({f"ours fsdp_config.{item}": [item] for item in args.ours_fsdp})
    if args.rows % args.micro_batch or args.updates < 1:
        raise ValueError(f"--micro-batch {args.micro_batch} must divide --rows {args.rows}, and --updates must be >= 1")
    device = h.resolve_device(args.device)
    model_path, description = h.resolve_model(args.size)
    tokens = args.rows * (args.prompt_length + args.response_length)
    print(f"model: {description}\ndevice: {device}; one update = {args.rows} rows x ({args.prompt_length} prompt + "
          f"{args.response_length} response) = {tokens:,} positions, micro-batch {args.micro_batch}; {args.updates} "
          "updates per side (the first is warm-up), each side in a fresh process" +
          ("; cached device memory released before every update" if args.empty_cache else ""),
          flush=True)
    results: dict[str, dict[str, Any]] = {}
    for side, fsdp_overrides in variants.items():
        spec = {
            "side": side,
            "fsdp_overrides": fsdp_overrides,
            "model_path": model_path,
            "device": device,
            "threads": args.threads,
            "rows": args.rows,
            "prompt_length": args.prompt_length,
            "response_length": args.response_length,
            "micro_batch": args.micro_batch,
            "updates": args.updates,
            "profile": args.profile,
            "empty_cache": args.empty_cache,
        }
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.pop("MASTER_PORT", None)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                               json.dumps(spec)],
                              capture_output=True,
                              text=True,
                              timeout=3600,
                              cwd=h.REPO_ROOT,
                              env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"side {side!r} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[side]
        print(f"  {side}: update s {[round(t, 3) for t in r['update_s_all']]}, peak {r['peak_gb']:.2f} GB", flush=True)

    base = results.get("plain")
    memory = "torch.cuda.max_memory_allocated" if device == "cuda" else "process peak RSS"
    print(f"\n### Actor update ({device}, {os.path.basename(model_path)}, {args.rows} x "
          f"{args.prompt_length + args.response_length})\n")
    rows = []
    for side, r in results.items():
        fwd_bwd = r["update_s"] - sum(r["phases_s"].values())
        rows.append([
            side, r["update_s"], tokens / r["update_s"], fwd_bwd, r["phases_s"]["gradient clip"],
            r["phases_s"]["optimizer step"], r["peak_gb"],
            h.ratio(r["update_s"], base["update_s"]) if base else None
        ])
    print(
        h.markdown_table([
            "side", "update s (median)", "tokens/s", "forward+backward s", "gradient clip s", "optimizer step s",
            f"peak GB ({memory})", "update s / plain"
        ], rows))
    for side, r in results.items():
        if r["top_ops"]:
            print(f"\n{side}: top operators of one update ({'device' if device == 'cuda' else 'CPU'} self time; "
                  f"{r['host_syncs']} host syncs (.item() and the like))\n")
            print(h.markdown_table(["op", "calls", "ms"], [[o["op"], o["calls"], o["ms"]] for o in r["top_ops"]]))
    payload = {
        "benchmark": "actor_update",
        "model": model_path,
        "environment": h.environment_info(device),
        "workload": {
            k: getattr(args, k) for k in ("rows", "prompt_length", "response_length", "micro_batch", "updates")
        },
        "results": results,
    }
    h.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
