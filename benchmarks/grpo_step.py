"""One GRPO step, this library against TRL's ``GRPOTrainer``: the same model, data, batch, n, lengths, optimizer
and seed, alternating runs, several repeats.

Each run is a fresh process (``_harness.launch``): ours runs the real trainer (``verl.trainer.main_ppo.run_ppo``:
Ray, the FSDP actor/rollout worker, the HF rollout) and reads its logged ``timing_s/*`` / ``perf/*`` metrics; TRL runs
``GRPOTrainer.train()`` on its transformers-``generate`` path, timed by a callback. Runs alternate ours, TRL, TRL,
ours, ... so that slow drifts of a shared machine hit both sides alike. The first ``--warmup`` steps of every run
are left out; the figures are medians over the other steps of all runs:

* step time: one generation + one optimizer step (everything the trainer does for it);
* generation tokens/s: generated tokens / generation time (ours: ``timing_s/gen``, which includes the weight sync
  into the rollout engine; TRL: its ``generate`` call);
* training tokens/s: prompt + response tokens / (step time - generation time): scoring, log-prob passes, loss,
  backward and optimizer;
* peak memory: peak RSS of the training process on CPU (ours: the worker process), ``max_memory_allocated`` on GPU.

Every sample is exactly ``--response-length`` tokens (EOS disabled on both sides), so both count the same tokens.

    python benchmarks/grpo_step.py                              # tiny model on CPU, 3 repeats
    python benchmarks/grpo_step.py --size small --repeats 5 --out small.json
    python benchmarks/grpo_step.py --size qwen0.5b --out qwen05b_h100.json    # GPU: Qwen2.5-0.5B shape, random init
    python benchmarks/grpo_step.py --ours-override actor_rollout_ref.model.use_remove_padding=True   # try a knob
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402
from dataclasses import asdict  # noqa: E402

OURS_PHASES = (("gen", "generation (timing_s/gen)"), ("weight_sync", "  of which weight sync"), ("reward", "reward"),
               ("old_log_prob", "old log-prob recompute"), ("adv", "advantages"), ("update_actor",
                                                                                   "actor update (fwd+bwd+optim)"))
TRL_PHASES = (("gen", "generation (model.generate)"), ("score_and_prepare", "scoring, padding, advantages"),
              ("loss_backward_optimizer", "loss fwd+bwd+optim (rest of the step)"))


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_workload_args(parser, list(h.PRESETS))
    parser.add_argument("--repeats", type=int, default=None, help="runs per library (alternating)")
    parser.add_argument("--warmup", type=int, default=None, help="steps per run left out of the medians")
    return parser.parse_args(argv)


def phase_rows(summary: Optional[dict[str, Any]], phases: tuple) -> list[list[Any]]:
    """``[phase, median s, share of the median step]`` rows (per-phase medians need not add up to the step's)."""
    if summary is None:
        return []
    rows = []
    for key, label in phases + (("other", "other (driver, dispatch, data movement)"),):
        value = summary["phases_s"].get(key)
        if value is not None:
            rows.append([label, value, f"{100 * value / summary['step_s']:.0f}%"])
    return rows


def gap_analysis(ours: Optional[dict[str, Any]], trl: Optional[dict[str, Any]]) -> dict[str, float]:
    """Seconds per step by which ours is slower (positive) than TRL, attributed to comparable phases."""
    if ours is None or trl is None:
        return {}
    p, q = ours["phases_s"], trl["phases_s"]
    return {
        "generation (incl. weight sync)": p.get("gen", 0.0) - q.get("gen", 0.0),
        "old log-prob recompute (TRL skips it at one update per generation)": p.get("old_log_prob", 0.0),
        "update + scoring": (p.get("update_actor", 0.0) + p.get("reward", 0.0) + p.get("adv", 0.0) -
                             q.get("loss_backward_optimizer", 0.0) - q.get("score_and_prepare", 0.0)),
        "driver/dispatch overhead": p.get("other", 0.0),
        "total": ours["step_s"] - trl["step_s"],
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = _parse(argv)
    workload = h.workload_from_args(args, h.PRESETS)
    libs, skipped = h.runnable_libs(args.libs)
    device = h.resolve_device(args.device)
    env = h.environment_info(device)
    model_path, model_desc = h.resolve_model(workload.model)
    params = h.count_parameters(model_path)
    work_dir, temporary = h.make_work_dir(args.work_dir, "verl-bench-grpo-")
    print(
        f"model: {model_desc} ({params / 1e6:.1f}M parameters) at {model_path}\ndevice: {device}; work dir: "
        f"{work_dir}\nworkload: {workload.batch} prompts x n={workload.n} = {workload.rows} samples of "
        f"{workload.response_length} tokens per step, micro-batch {workload.micro_batch}, {workload.steps} steps "
        f"per run ({workload.warmup} warm-up), {workload.repeats} runs per library, alternating\nours: "
        f"{workload.ours_config} {' '.join(workload.ours_overrides)}",
        flush=True)
    files = h.task_files(work_dir, workload.train_rows)
    results: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
    try:
        for r in range(workload.repeats):
            for lib in (libs if r % 2 == 0 else list(reversed(libs))):
                spec = h.make_spec(lib, workload, model_path, files, work_dir, device, tag=f"-{r + 1}")
                result = h.launch(spec)
                results[lib].append(result)
                steps = ", ".join(f"{s['step_s']:.2f}" for s in result["steps"])
                print(
                    f"  run {r + 1}/{workload.repeats} {lib:>4}: step s [{steps}], peak "
                    f"{h.fmt(result['peak_memory_gb'])} GB, {result['process_wall_s']:.0f} s in all",
                    flush=True)
    finally:
        env["load_average_1m_at_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    summaries = {lib: h.summarize_runs(results.get(lib, []), workload.warmup) for lib in h.LIBS}
    ours, trl = summaries["ours"], summaries["trl"]

    def pick(s: Optional[dict[str, Any]], key: str) -> Optional[float]:
        return None if s is None else s.get(key)

    def spread(s: Optional[dict[str, Any]]) -> str:
        if s is None:
            return "-"
        return f"{h.fmt(s['step_s'])} [{h.fmt(s['step_s_min'])}-{h.fmt(s['step_s_max'])}]"

    pairs = h.paired_ratios(results.get("ours", []), results.get("trl", []), workload.warmup)
    paired = f"{h.fmt(h._median(pairs))} [{h.fmt(min(pairs))}-{h.fmt(max(pairs))}]" if pairs else "-"
    rows = [[
        "step time, s: median [min-max]",
        spread(ours),
        spread(trl),
        h.fmt(h.ratio(pick(ours, "step_s"), pick(trl, "step_s")))
    ], ["step time, ours/TRL per back-to-back pair of runs: median [min-max]", "", "", paired]]
    for label, key in (("generation, s", "gen_s"), ("generation tokens/s", "gen_tokens_per_s"),
                       ("rest of the step (training), s", "train_s"), ("training tokens/s", "train_tokens_per_s"),
                       ("peak memory, GB", "peak_memory_gb"), ("generated tokens / step", "gen_tokens_per_step"),
                       ("prompt + response tokens / step", "total_tokens_per_step"),
                       ("positions per step incl. padding", "padded_tokens_per_step"), ("startup + teardown per run, s",
                                                                                        "startup_and_teardown_s")):
        rows.append([label, pick(ours, key), pick(trl, key), h.ratio(pick(ours, key), pick(trl, key))])
    print(f"\n### GRPO step: ours vs TRL {env['versions']['trl'] or '(not installed)'} ({device}, "
          f"{args.size} preset, model {workload.model})\n")
    print(h.markdown_table(["", "ours (verl)", "TRL GRPOTrainer", "ours / TRL"], rows))
    print(f"\nmemory: ours = {pick(ours, 'memory_kind') or '-'}; TRL = {pick(trl, 'memory_kind') or '-'}")
    if ours is not None:
        padded = workload.rows * workload.prompt_length
        valid = ours["prompt_tokens_per_step"]
        print(f"ours pads every prompt to data.max_prompt_length={workload.prompt_length}: {valid:.0f} of {padded} "
              f"prompt positions are real tokens ({100 * (1 - valid / padded):.0f}% padding in the rollout's input); "
              "TRL pads to the longest prompt of the batch")
        print("\nours, per phase (median s per step):\n")
        print(h.markdown_table(["phase", "s", "share"], phase_rows(ours, OURS_PHASES)))
    if trl is not None:
        print("\nTRL, per phase (median s per step):\n")
        print(h.markdown_table(["phase", "s", "share"], phase_rows(trl, TRL_PHASES)))
    gaps = gap_analysis(ours, trl)
    if gaps:
        print("\nwhere ours spends more time than TRL (s per step; negative = ours faster):\n")
        print(h.markdown_table(["part", "s"], [[k, v] for k, v in gaps.items()]))
        biggest = max((k for k in gaps if k != "total"), key=lambda k: gaps[k])
        print(f"\nlargest gap: {biggest} ({gaps[biggest]:+.3f} s per step)")
        extra = h.ratio(pick(ours, "padded_tokens_per_step"), pick(trl, "padded_tokens_per_step"))
        if extra is not None and extra > 1.02:
            print(f"padding: ours runs {100 * (extra - 1):.0f}% more positions per step than TRL (prompts padded to "
                  "data.max_prompt_length); that cost is inside every phase above: rerun with --prompt-length set "
                  "to the longest prompt to measure it")
    for lib, reason in skipped.items():
        print(f"\n{lib}: skipped ({reason})")
    payload = {
        "benchmark": "grpo_step",
        "preset": args.size,
        "workload": asdict(workload),
        "model": {
            "path": model_path,
            "description": model_desc,
            "parameters": params
        },
        "environment": env,
        "summary": {
            "ours": ours,
            "trl": trl,
            "ratio_ours_over_trl": {
                key: h.ratio(pick(ours, key), pick(trl, key))
                for key in ("step_s", "gen_s", "train_s", "gen_tokens_per_s", "train_tokens_per_s", "peak_memory_gb")
            },
            "paired_step_ratios": pairs,
            "gap_s": gaps,
        },
        "skipped": skipped,
        "runs": results,
    }
    return h.finish(args, payload, work_dir, temporary)


if __name__ == "__main__":
    main()
