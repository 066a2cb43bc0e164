"""Learning, this library against TRL's ``GRPOTrainer``: reward and accuracy on the arithmetic task for the same
number of generated samples.

Both libraries train the same policy on the same rows in the same order with the same GRPO settings (see
``_harness``), with natural EOS (responses end when the model says so, up to ``--response-length``). Two curves come
out per library:

* training reward: the mean score of the ``batch x n`` samples generated at each step (the arithmetic reward is 1
  for the right number, else 0, so this is the sample accuracy while training);
* greedy test accuracy every ``--eval-every`` steps on ``--eval-rows`` test problems (never trained on), computed by
  one evaluator (``_harness.greedy_accuracy``: ``generate`` greedy, the same reward function) for both libraries'
  weights: ours from the Hugging Face weights its checkpoints save, TRL's from the live model.

The policy defaults to the SFT-warmed tiny model of the embedded default run (``--model warmed``) when this build
has ``verl.trainer.embedded_default.get_warmed_model_path``, else the tiny model, which starts near zero reward. The
default workload is the embedded default run's (``python -m verl.trainer.main_ppo`` with no data): 32 prompts x 4
samples of up to 48 tokens, temperature 0.6, lr 3e-5, 50 steps, except that both libraries take one optimizer step
per generation (the embedded run splits its batch into two mini-batches).
One seed is one sample of a noisy process: use ``--seeds 0,1,2`` to average curves over seeds.

    python benchmarks/learning.py                              # warmed tiny model, 50 steps, CPU
    python benchmarks/learning.py --steps 60 --seeds 0,1 --out learning.json
    python benchmarks/learning.py --model /path/to/Qwen2.5-0.5B-Instruct --response-length 64 --device cuda
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, replace
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402

PRESETS: dict[str, h.Workload] = {
    "tiny":
        h.Workload(model="warmed" if h.warmed_model_available() else "tiny",
                   batch=32,
                   n=4,
                   prompt_length=32,
                   response_length=48,
                   micro_batch=32,
                   lr=3e-5,
                   temperature=0.6,
                   steps=50,
                   warmup=0,
                   repeats=1,
                   fixed_length=False,
                   train_rows=2048),
}


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_workload_args(parser, list(PRESETS))
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: --seed, else 0)")
    parser.add_argument("--eval-every", type=int, default=10, help="greedy test accuracy every this many steps")
    parser.add_argument("--eval-rows", type=int, default=128, help="test problems per evaluation")
    return parser.parse_args(argv)


def _eval_steps(steps: int, every: int) -> list[int]:
    if every < 1:
        raise ValueError(f"--eval-every must be >= 1, got {every}")
    marks = list(range(every, steps + 1, every))
    if not marks or marks[-1] != steps:
        marks.append(steps)
    return marks


def _mean(values: list[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = _parse(argv)
    workload = h.workload_from_args(args, PRESETS)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [workload.seed]
    libs, skipped = h.runnable_libs(args.libs)
    device = h.resolve_device(args.device)
    env = h.environment_info(device)
    model_path, model_desc = h.resolve_model(workload.model)
    eval_steps = _eval_steps(workload.steps, args.eval_every)
    work_dir, temporary = h.make_work_dir(args.work_dir, "verl-bench-learning-")
    files = h.task_files(work_dir, workload.train_rows)
    samples_per_step = workload.rows
    print(
        f"model: {model_desc} at {model_path}\ndevice: {device}; work dir: {work_dir}\nworkload: {workload.batch} "
        f"prompts x n={workload.n} per step, up to {workload.response_length} tokens at temperature "
        f"{workload.temperature}, lr {workload.lr}, "
        f"{workload.steps} steps = {workload.steps * samples_per_step} samples per library, seeds {seeds}; greedy "
        f"test accuracy on {args.eval_rows} problems at steps {eval_steps}",
        flush=True)
    results: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
    for i, seed in enumerate(seeds):
        for lib in (libs if i % 2 == 0 else list(reversed(libs))):
            spec = h.make_spec(lib,
                               replace(workload, seed=seed),
                               model_path,
                               files,
                               work_dir,
                               device,
                               eval_steps=[0] + eval_steps,
                               eval_rows=args.eval_rows,
                               tag=f"-seed{seed}")
            result = h.launch(spec)
            results[lib].append(result)
            rewards = [s["reward_mean"] for s in result["steps"]]
            print(
                f"  seed {seed} {lib:>4}: reward {h.fmt(rewards[0])} -> {h.fmt(rewards[-1])}, greedy accuracy "
                f"{', '.join(f'{k}: {v:.3f}' for k, v in result['evals'].items())} "
                f"({result['process_wall_s']:.0f} s)",
                flush=True)

    # every run evaluates its starting policy too: the same weights, so one number (the runs must agree on it)
    starts = [r["evals"]["0"] for runs in results.values() for r in runs]
    initial = starts[0]
    if max(starts) - min(starts) > 1e-9:
        print(f"WARNING: the runs disagree on the starting policy's greedy accuracy: {starts}", flush=True)
    curves: dict[str, dict[str, list]] = {}
    for lib in h.LIBS:
        runs = results.get(lib, [])
        if not runs:
            curves[lib] = {}
            continue
        reward = [_mean([r["steps"][k]["reward_mean"] for r in runs]) for k in range(workload.steps)]
        accuracy = {}
        for step in [0] + eval_steps:
            accuracy[step] = _mean([r["evals"].get(str(step)) for r in runs])
        curves[lib] = {"reward": reward, "greedy_accuracy": accuracy}

    def col(lib: str, key: str, index: Any) -> Optional[float]:
        curve = curves.get(lib) or {}
        values = curve.get(key)
        if values is None:
            return None
        return values.get(index) if isinstance(values, dict) else values[index]

    print(f"\n### Learning on the arithmetic task: ours vs TRL {env['versions']['trl'] or '(not installed)'} "
          f"({device}, {len(seeds)} seed{'s' if len(seeds) > 1 else ''})\n")
    print("training reward (mean over the samples generated at each step):\n")
    print(
        h.markdown_table(["step", "samples", "ours", "TRL"],
                         [[k + 1, (k + 1) * samples_per_step,
                           col("ours", "reward", k),
                           col("trl", "reward", k)] for k in range(workload.steps)]))
    print("\ngreedy test accuracy (same evaluator for both):\n")
    print(
        h.markdown_table(
            ["step", "samples", "ours", "TRL"],
            [[step, step * samples_per_step,
              col("ours", "greedy_accuracy", step),
              col("trl", "greedy_accuracy", step)] for step in [0] + eval_steps]))
    final = {lib: col(lib, "greedy_accuracy", workload.steps) for lib in h.LIBS}
    tail = max(1, workload.steps // 5)
    final_reward = {lib: _mean(curves[lib]["reward"][-tail:]) if curves.get(lib) else None for lib in h.LIBS}
    print(
        f"\nfinal greedy test accuracy after {workload.steps * samples_per_step} samples: ours {h.fmt(final['ours'])}, "
        f"TRL {h.fmt(final['trl'])} (start {initial:.3f}); training reward over the last {tail} steps: ours "
        f"{h.fmt(final_reward['ours'])}, TRL {h.fmt(final_reward['trl'])}")
    wall = {lib: _mean([r["process_wall_s"] for r in results.get(lib, [])]) for lib in h.LIBS}
    print(
        f"wall time per run (incl. start-up and evaluations): ours {h.fmt(wall['ours'])} s, TRL {h.fmt(wall['trl'])} s")
    for lib, reason in skipped.items():
        print(f"\n{lib}: skipped ({reason})")
    env["load_average_1m_at_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    payload = {
        "benchmark": "learning",
        "preset": args.size,
        "workload": asdict(workload),
        "seeds": seeds,
        "samples_per_step": samples_per_step,
        "eval_steps": [0] + eval_steps,
        "eval_rows": args.eval_rows,
        "model": {
            "path": model_path,
            "description": model_desc
        },
        "environment": env,
        "initial_accuracy": initial,
        "initial_accuracy_per_run": starts,
        "curves": curves,
        "final_accuracy": final,
        "final_reward": final_reward,
        "wall_s": wall,
        "skipped": skipped,
        "runs": results,
    }
    return h.finish(args, payload, work_dir, temporary)


if __name__ == "__main__":
    main()
