"""Per-phase figures of this library's GRPO step, against what the hardware can do, and how the step scales with
the batch.

From real trainer runs (``verl.trainer.main_ppo.run_ppo``, one fresh process per run, fixed-length responses, the
logged ``timing_s/*`` / ``perf/*`` metrics; medians over the steps after ``--warmup``):

* rollout decode tokens/s (generation without the weight sync), and on GPU its share of the memory-bandwidth roof:
  ``rows / (bytes read per decode step / measured device copy bandwidth)``, where a decode step reads the rollout
  weights once (bf16) and the KV cache of every row (at the mean context length);
* actor update tokens/s and MFU: achieved TFLOP/s from ``verl.utils.flops_counter`` over the update time, against
  the worker's peak (``perf/mfu/actor``: the table peak on GPU, a quick fp32 matmul measurement on CPU) and, on GPU,
  against the measured bf16 matmul rate of this device (on CPU: against the best of a few fp32 matmul trials with
  this run's thread count);
* weight sync (FSDP actor -> rollout engine): seconds, GB and GB/s per step;
* log-prob pass (``compute_log_prob``, forward only) tokens/s;
* scaling: the same step at ``--scales`` x the batch (same micro-batch), step time and tokens/s.

The bandwidth roof and the bf16 matmul rate need a CUDA device: without one they are skipped with the reason
printed (and recorded under ``skipped`` in the JSON); everything else runs on CPU too.

    python benchmarks/components.py                          # tiny model on CPU, scales 1,2,4
    python benchmarks/components.py --size qwen0.5b --out components_h100.json       # GPU
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, replace
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402

NO_CUDA = "no CUDA device here: the memory-bandwidth roof and the bf16 matmul rate are GPU figures"


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_workload_args(parser, list(h.PRESETS), libs=False)
    parser.add_argument("--scales", default="1,2,4", help="batch multiples for the scaling table (first = phases)")
    parser.add_argument("--warmup", type=int, default=None, help="steps per run left out of the medians")
    return parser.parse_args(argv)


def measure_device_rates(repeats: int = 20) -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written per second) and dense bf16 matmul rate of this GPU."""
    import torch

    size = 1 << 30
    src = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    copy_gbps = 2 * size * repeats / (time.perf_counter() - start) / 1e9
    del src, dst
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    tflops = 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return {"copy_bandwidth_gb_per_s": copy_gbps, "bf16_matmul_tflops": tflops}


def measure_cpu_matmul_tflops(trials: int = 5, seconds: float = 0.2) -> float:
    """Best fp32 matmul rate of this process over a few trials (the best, because on a shared machine a trial can
    only be slowed down by other processes, never sped up)."""
    import torch

    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(trials):
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best / 1e12


def decode_roof_tokens_per_s(config: Any,
                             params: int,
                             rows: int,
                             context: float,
                             bandwidth_gbps: float,
                             weight_bytes_per_param: int = 2) -> float:
    """Upper bound on decode tokens/s when every decode step must read the weights once and each row's KV cache."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    kv_bytes_per_token = 2 * int(config.num_hidden_layers) * kv_heads * head_dim * weight_bytes_per_param
    step_bytes = params * weight_bytes_per_param + rows * context * kv_bytes_per_token
    return rows / (step_bytes / (bandwidth_gbps * 1e9))


def phase_figures(summary: dict[str, Any], workload: h.Workload, model_path: str, params: int, device: str,
                  rates: Optional[dict[str, float]]) -> dict[str, Any]:
    """The per-phase table's numbers from the 1x run's medians."""
    from transformers import AutoConfig

    from verl.utils.flops_counter import FlopsCounter

    config = AutoConfig.from_pretrained(model_path)
    p = summary["phases_s"]
    rows = workload.rows
    gen_tokens = summary["gen_tokens_per_step"]
    total_tokens = summary["total_tokens_per_step"]
    generate_s = p.get("generate_sequences", p.get("gen", 0.0)) - p.get("weight_sync", 0.0)
    figures: dict[str, Any] = {"decode_tokens_per_s": gen_tokens / generate_s if generate_s > 0 else None}
    if rates is not None:
        context = total_tokens / rows - workload.response_length / 2  # mean of prompt .. prompt + response
        roof = decode_roof_tokens_per_s(config, params, rows, context, rates["copy_bandwidth_gb_per_s"])
        figures["decode_roof_tokens_per_s"] = roof
        figures[
            "decode_share_of_roof"] = figures["decode_tokens_per_s"] / roof if figures["decode_tokens_per_s"] else None
    update_s = p.get("update_actor")
    seqlens = [max(1, round(total_tokens / rows))] * rows
    if update_s:
        counter = FlopsCounter(config)
        achieved, _ = counter.estimate_flops(seqlens, update_s)
        figures["update_tokens_per_s"] = total_tokens / update_s
        figures["update_achieved_tflops"] = achieved
        mfu = [s.get("mfu_actor") for r in summary.get("_runs", []) for s in r["steps"]]
        figures["update_mfu_worker"] = h._median(mfu)
        if rates is not None:
            figures["update_mfu_vs_measured_bf16_matmul"] = achieved / rates["bf16_matmul_tflops"]
        else:
            cpu_peak = measure_cpu_matmul_tflops()
            figures["cpu_fp32_matmul_tflops"] = cpu_peak
            figures["update_mfu_vs_measured_fp32_matmul"] = achieved / cpu_peak if cpu_peak else None
    sync_s = p.get("weight_sync")
    sync_gb = h._median(s.get("weight_sync_gb") for r in summary.get("_runs", []) for s in r["steps"])
    figures["weight_sync_s"] = sync_s
    figures["weight_sync_gb"] = sync_gb
    figures["weight_sync_gb_per_s"] = sync_gb / sync_s if sync_s and sync_gb else None
    logp_s = p.get("old_log_prob")
    figures["log_prob_tokens_per_s"] = total_tokens / logp_s if logp_s else None
    figures["log_prob_s"] = logp_s
    figures["update_s"] = update_s
    figures["generate_s"] = generate_s
    return figures


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = _parse(argv)
    workload = h.workload_from_args(args, h.PRESETS)
    scales = [int(s) for s in args.scales.split(",") if s.strip()]
    if not scales or any(s < 1 for s in scales):
        raise ValueError(f"--scales must be positive integers, got {args.scales!r}")
    device = h.resolve_device(args.device)
    env = h.environment_info(device)
    model_path, model_desc = h.resolve_model(workload.model)
    params = h.count_parameters(model_path)
    skipped: dict[str, str] = {}
    rates = None
    if device == "cuda":
        rates = measure_device_rates()
        print(
            f"device rates: copy {rates['copy_bandwidth_gb_per_s']:.0f} GB/s (read + write), bf16 matmul "
            f"{rates['bf16_matmul_tflops']:.0f} TFLOP/s",
            flush=True)
    else:
        skipped["device_rates"] = skipped["decode_roof"] = skipped["update_mfu_vs_bf16_matmul"] = NO_CUDA
        print(f"device rates, decode roof, MFU vs bf16 matmul: skipped ({NO_CUDA})", flush=True)
        import torch

        torch.set_num_threads(workload.threads)  # the CPU matmul rate flops_counter measures uses this many threads
    work_dir, temporary = h.make_work_dir(args.work_dir, "verl-bench-components-")
    files = h.task_files(work_dir, max(workload.train_rows, workload.batch * max(scales) * workload.steps))
    print(
        f"model: {model_desc} ({params / 1e6:.1f}M parameters)\ndevice: {device}; work dir: {work_dir}\n"
        f"workload: {workload.batch} prompts x n={workload.n} x {workload.response_length} tokens per step at 1x, "
        f"scales {scales}, {workload.steps} steps per run ({workload.warmup} warm-up)",
        flush=True)
    by_scale: dict[int, dict[str, Any]] = {}
    results: dict[int, dict[str, Any]] = {}
    for scale in scales:
        scaled = replace(workload, batch=workload.batch * scale)
        spec = h.make_spec("ours", scaled, model_path, files, work_dir, device, tag=f"-x{scale}")
        result = h.launch(spec)
        results[scale] = result
        summary = h.summarize_runs([result], workload.warmup)
        summary["_runs"] = [result]
        by_scale[scale] = summary
        print(
            f"  x{scale}: step {summary['step_s']:.3f} s, peak {h.fmt(summary['peak_memory_gb'])} GB "
            f"({result['process_wall_s']:.0f} s in all)",
            flush=True)
    base = by_scale[scales[0]]
    figures = phase_figures(base, replace(workload, batch=workload.batch * scales[0]), model_path, params, device,
                            rates)

    print(f"\n### Components of ours' GRPO step ({device}, {args.size} preset, x{scales[0]} batch)\n")
    phase_rows = [
        ["rollout decode", "tokens/s", figures["decode_tokens_per_s"]],
        [
            "rollout decode", "share of the bandwidth roof",
            figures.get("decode_share_of_roof", f"skipped: {NO_CUDA}" if rates is None else None)
        ],
        ["rollout decode", "roof tokens/s",
         figures.get("decode_roof_tokens_per_s", "-")],
        ["actor update", "tokens/s", figures.get("update_tokens_per_s")],
        ["actor update", "achieved TFLOP/s (flops_counter)",
         figures.get("update_achieved_tflops")],
        ["actor update", "MFU (worker's perf/mfu/actor)",
         figures.get("update_mfu_worker")],
    ]
    if rates is not None:
        phase_rows.append(
            ["actor update", "MFU vs measured bf16 matmul",
             figures.get("update_mfu_vs_measured_bf16_matmul")])
    else:
        phase_rows.append(["actor update", "MFU vs measured bf16 matmul", f"skipped: {NO_CUDA}"])
        phase_rows.append([
            "actor update", f"fp32 matmul TFLOP/s here (best of 5 trials, {workload.threads} thread)",
            figures.get("cpu_fp32_matmul_tflops")
        ])
        phase_rows.append(
            ["actor update", "MFU vs that fp32 matmul rate",
             figures.get("update_mfu_vs_measured_fp32_matmul")])
    phase_rows += [
        ["weight sync", "s per step", figures["weight_sync_s"]],
        ["weight sync", "GB per step", figures["weight_sync_gb"]],
        ["weight sync", "GB/s", figures["weight_sync_gb_per_s"]],
        ["log-prob pass", "tokens/s", figures["log_prob_tokens_per_s"]],
    ]
    print(h.markdown_table(["phase", "figure", "value"], phase_rows))
    print("\nscaling (same micro-batch, more micro-batches per step):\n")
    scale_rows = []
    base_rate = base["total_tokens_per_step"] / base["step_s"]
    for scale in scales:
        s = by_scale[scale]
        rate = s["total_tokens_per_step"] / s["step_s"]
        scale_rows.append([
            f"x{scale}", workload.batch * scale, workload.rows * scale, s["step_s"], s["gen_tokens_per_s"],
            s["phases_s"].get("old_log_prob"), s["phases_s"].get("update_actor"), rate, f"{rate / base_rate:.2f}x",
            s["peak_memory_gb"]
        ])
    print(
        h.markdown_table([
            "batch", "prompts", "samples", "step s", "gen tokens/s", "log-prob s", "update s", "tokens/s",
            "tokens/s vs x1", "peak GB"
        ], scale_rows))
    for name, reason in skipped.items():
        print(f"\n{name}: skipped ({reason})")
    env["load_average_1m_at_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    for summary in by_scale.values():
        summary.pop("_runs", None)
    payload = {
        "benchmark": "components",
        "preset": args.size,
        "workload": asdict(workload),
        "model": {
            "path": model_path,
            "description": model_desc,
            "parameters": params
        },
        "environment": env,
        "device_rates": rates,
        "phases": figures,
        "scaling": {
            str(scale): by_scale[scale] for scale in scales
        },
        "skipped": skipped,
        "runs": {
            str(scale): results[scale] for scale in scales
        },
    }
    return h.finish(args, payload, work_dir, temporary)


if __name__ == "__main__":
    main()
