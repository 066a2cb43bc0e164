"""The benchmark scripts (``benchmarks/grpo_step.py``, ``learning.py``, ``components.py``) at their smallest size:
each runs end to end (this library's real trainer and TRL's ``GRPOTrainer``, 2 steps, 1 repeat) and prints its
tables and writes JSON with sane values.

The three scripts run concurrently (independent processes, much of their time is process start-up), and the runs
of this library join one Ray cluster started here (``$RAY_ADDRESS``) instead of starting one each. When TRL is
not importable the TRL-half tests are skipped with the reason, and the scripts must say that they skipped it.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import os
import subprocess
import sys
import time

import pytest
import ray

from verl.single_controller.ray.utils import local_ray_init_kwargs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCH)

import _harness  # noqa: E402

TRL_MISSING = _harness.trl_unavailable_reason()
needs_trl = pytest.mark.skipif(TRL_MISSING is not None, reason=f"TRL half skipped: {TRL_MISSING}")

# the smallest workload: 2 prompts x 2 samples x 8 tokens, 2 steps (the first is the warm-up), 1 repeat
SMALL = ["--size", "tiny", "--batch", "2", "--n", "2", "--response-length", "8", "--micro-batch", "4", "--steps", "2"]
ROWS, RESPONSE = 4, 8
MEGATRON_MISSING = importlib.util.find_spec("megatron.core") is None
# run name -> (script, arguments)
SCRIPTS = {
    "grpo_step": ("grpo_step", SMALL + ["--repeats", "1", "--warmup", "1"]),
    "learning":
        ("learning", SMALL[2:] + ["--model", "tiny", "--eval-every", "2", "--eval-rows", "4", "--temperature", "0.7"]),
    "components": ("components", SMALL + ["--scales", "1", "--warmup", "1"]),
}
if not MEGATRON_MISSING:  # this library's half on the Megatron-core actor
    SCRIPTS["grpo_step_megatron"] = ("grpo_step", SMALL + [
        "--repeats", "1", "--warmup", "1", "--libs", "ours", "--ours-config", "ppo_megatron_trainer", "--ours-override",
        "actor_rollout_ref.actor.megatron.sequence_parallel=False"
    ])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the three scripts (concurrently) against one Ray cluster; ``{name: {"rc", "stdout", "json", "s"}}``."""
    root = tmp_path_factory.mktemp("benchmarks")
    ray.init(**local_ray_init_kwargs(num_cpus=8))
    try:
        env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1")
        procs = {}
        for name, (script, args) in SCRIPTS.items():
            out = root / f"{name}.json"
            cmd = [
                sys.executable,
                os.path.join(BENCH, f"{script}.py"), *args, "--out",
                str(out), "--work-dir",
                str(root / name)
            ]
            procs[name] = (subprocess.Popen(cmd,
                                            stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT,
                                            text=True,
                                            env=env,
                                            cwd=REPO), out, time.perf_counter())
        results = {}
        for name, (proc, out, start) in procs.items():
            try:
                stdout, _ = proc.communicate(timeout=900)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
            payload = json.loads(out.read_text()) if out.exists() else None
            results[name] = {"rc": proc.returncode, "stdout": stdout, "json": payload, "s": time.perf_counter() - start}
        yield results
    finally:
        ray.shutdown()


def _ok(runs, name):
    run = runs[name]
    assert run["rc"] == 0 and run["json"] is not None, f"{name}.py failed (exit {run['rc']}):\n{run['stdout'][-4000:]}"
    return run


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# ----------------------------------------------------------------------------------------------------------------------
# grpo_step.py


def _check_step_summary(s, steps_timed: int):
    assert s["runs"] == 1 and s["timed_steps"] == steps_timed
    for key in ("step_s", "gen_s", "train_s", "gen_tokens_per_s", "train_tokens_per_s", "peak_memory_gb"):
        assert _positive(s[key]), (key, s[key])
    assert s["step_s"] > s["gen_s"] and s["step_s_min"] <= s["step_s"] <= s["step_s_max"]
    assert s["gen_tokens_per_step"] == ROWS * RESPONSE  # fixed-length responses
    # every prompt of the arithmetic task is 20-30 tokens with the chat template
    assert ROWS * 20 <= s["prompt_tokens_per_step"] <= ROWS * 30
    assert 0.05 < s["peak_memory_gb"] < 16


def test_grpo_step_ours_half(runs):
    run = _ok(runs, "grpo_step")
    payload, stdout = run["json"], run["stdout"]
    ours = payload["summary"]["ours"]
    _check_step_summary(ours, steps_timed=1)
    phases = ours["phases_s"]
    for key in ("gen", "weight_sync", "old_log_prob", "update_actor", "reward"):
        assert phases[key] >= 0, key
    assert phases["gen"] + phases["old_log_prob"] + phases["update_actor"] <= ours["step_s"] * 1.001
    assert payload["workload"]["batch"] == 2 and payload["workload"]["n"] == 2
    assert payload["environment"]["versions"]["torch"] and payload["environment"]["device"] in ("cpu", "cuda")
    assert len(payload["runs"]["ours"]) == 1 and len(payload["runs"]["ours"][0]["steps"]) == 2
    assert "| step time, s: median [min-max] |" in stdout and "ours, per phase" in stdout
    assert "old log-prob recompute" in stdout


@needs_trl
def test_grpo_step_trl_half_and_ratios(runs):
    run = _ok(runs, "grpo_step")
    payload, stdout = run["json"], run["stdout"]
    summary = payload["summary"]
    trl, ours = summary["trl"], summary["ours"]
    _check_step_summary(trl, steps_timed=1)
    # the same prompts, in the same order, of the same length: the same tokens on both sides
    assert trl["total_tokens_per_step"] == ours["total_tokens_per_step"]
    for key, value in summary["ratio_ours_over_trl"].items():
        assert _positive(value), (key, value)
    assert math.isclose(summary["ratio_ours_over_trl"]["step_s"], ours["step_s"] / trl["step_s"])
    assert math.isclose(summary["gap_s"]["total"], ours["step_s"] - trl["step_s"])
    assert "TRL, per phase" in stdout and "largest gap:" in stdout
    assert payload["skipped"] == {}


@pytest.mark.skipif(MEGATRON_MISSING, reason="megatron-core is not installed (pip install megatron-core==0.16.1)")
def test_grpo_step_ours_half_on_megatron(runs):
    run = _ok(runs, "grpo_step_megatron")
    payload, stdout = run["json"], run["stdout"]
    assert payload["workload"]["ours_config"] == "ppo_megatron_trainer"
    assert "ours: ppo_megatron_trainer" in stdout
    assert payload["runs"]["ours"][0]["actor_strategy"] == "megatron"
    _check_step_summary(payload["summary"]["ours"], steps_timed=1)
    assert "trl" not in payload["runs"] or not payload["runs"]["trl"]


def test_grpo_step_says_when_trl_is_skipped(runs):
    run = _ok(runs, "grpo_step")
    if TRL_MISSING is None:
        assert "TRL half skipped" not in run["stdout"]
        return
    assert "TRL half skipped" in run["stdout"] and run["json"]["skipped"].get("trl") == TRL_MISSING


# ----------------------------------------------------------------------------------------------------------------------
# learning.py


def _check_curve(curve, steps: int):
    assert len(curve["reward"]) == steps
    assert all(0.0 <= r <= 1.0 for r in curve["reward"])
    assert sorted(curve["greedy_accuracy"], key=int) == ["0", "2"]
    assert all(0.0 <= a <= 1.0 for a in curve["greedy_accuracy"].values())


def test_learning_ours_half(runs):
    run = _ok(runs, "learning")
    payload, stdout = run["json"], run["stdout"]
    assert payload["samples_per_step"] == ROWS and payload["eval_steps"] == [0, 2]
    assert payload["workload"]["temperature"] == 0.7 and "temperature 0.7" in stdout
    assert payload["runs"]["ours"][0]["spec"]["temperature"] == 0.7  # what the run was given
    _check_curve(payload["curves"]["ours"], steps=2)
    assert 0.0 <= payload["initial_accuracy"] <= 1.0
    assert payload["final_accuracy"]["ours"] == payload["curves"]["ours"]["greedy_accuracy"]["2"]
    assert "training reward" in stdout and "greedy test accuracy" in stdout and "final greedy test accuracy" in stdout
    # the starting model and the step-2 checkpoint's Hugging Face weights were evaluated
    assert set(payload["runs"]["ours"][0]["evals"]) == {"0", "2"}


@needs_trl
def test_learning_trl_half(runs):
    run = _ok(runs, "learning")
    payload = run["json"]
    _check_curve(payload["curves"]["trl"], steps=2)
    # the same number of generated samples on both sides
    assert len(payload["runs"]["trl"][0]["steps"]) == len(payload["runs"]["ours"][0]["steps"]) == 2
    # both evaluated the same starting weights with the same greedy evaluator
    starts = payload["initial_accuracy_per_run"]
    assert len(starts) == 2 and starts[0] == starts[1] == payload["initial_accuracy"]


# ----------------------------------------------------------------------------------------------------------------------
# components.py


def test_components_cpu_parts(runs):
    run = _ok(runs, "components")
    payload, stdout = run["json"], run["stdout"]
    phases = payload["phases"]
    for key in ("decode_tokens_per_s", "update_tokens_per_s", "update_achieved_tflops", "log_prob_tokens_per_s",
                "weight_sync_s", "weight_sync_gb", "weight_sync_gb_per_s"):
        assert _positive(phases[key]), (key, phases[key])
    # the sync moves every parameter once (fp32 on CPU, bf16 on GPU)
    bytes_per_param = 2 if payload["environment"]["device"] == "cuda" else 4
    expected_gb = payload["model"]["parameters"] * bytes_per_param / 1024**3
    assert math.isclose(phases["weight_sync_gb"], expected_gb, rel_tol=0.05), (phases["weight_sync_gb"], expected_gb)
    assert list(payload["scaling"]) == ["1"] and _positive(payload["scaling"]["1"]["step_s"])
    assert "| rollout decode | tokens/s |" in stdout and "scaling" in stdout


def test_components_gpu_parts_run_or_skip_with_reason(runs):
    run = _ok(runs, "components")
    payload, stdout = run["json"], run["stdout"]
    if payload["environment"]["device"] == "cuda":
        rates = payload["device_rates"]
        assert _positive(rates["copy_bandwidth_gb_per_s"]) and _positive(rates["bf16_matmul_tflops"])
        assert 0 < payload["phases"]["decode_share_of_roof"] <= 1.5
        return
    assert payload["device_rates"] is None
    assert set(payload["skipped"]) == {"device_rates", "decode_roof", "update_mfu_vs_bf16_matmul"}
    assert "skipped (no CUDA device" in stdout


# logprob_head.py (no Ray, no TRL: its own processes)


def test_logprob_head_runs_every_mode(tmp_path, capsys):
    import logprob_head

    out = tmp_path / "head.json"
    payload = logprob_head.main(
        ["--rows", "8", "--vocab", "64", "--repeats", "1", "--device", "cpu", "--out",
         str(out)])
    assert json.loads(out.read_text())["results"] == payload["results"]
    assert set(payload["results"]) == {"log-probs", "metrics entropy", "entropy loss"}
    assert all(r["peak_gb"] >= 0 and r["s"] > 0 for r in payload["results"].values())
    assert "### Log-prob head" in capsys.readouterr().out


def test_actor_update_runs_every_side(tmp_path, capsys):
    """``actor_update.py``: this library's FSDP2 actor, the same actor unsharded and the plain loop, each trains the
    same batch (a fresh process each, one-rank torch.distributed for the FSDP side)."""
    import actor_update

    out = tmp_path / "update.json"
    payload = actor_update.main([
        "--rows", "4", "--prompt-length", "6", "--response-length", "5", "--micro-batch", "2", "--updates", "2",
        "--device", "cpu", "--profile", "--out",
        str(out)
    ])
    assert json.loads(out.read_text())["results"] == payload["results"]
    assert set(payload["results"]) == {"ours", "ours-unsharded", "plain"}
    for r in payload["results"].values():
        assert len(r["update_s_all"]) == 2 and r["update_s"] > 0 and r["peak_gb"] > 0
        assert r["phases_s"]["optimizer step"] > 0 and r["phases_s"]["gradient clip"] > 0
        assert r["top_ops"] and all(op["calls"] > 0 for op in r["top_ops"])
    stdout = capsys.readouterr().out
    assert "### Actor update (cpu" in stdout and "top operators of one update" in stdout
    with pytest.raises(ValueError, match="--sides 'ours,nope': unknown \\['nope'\\]"):
        actor_update.main(["--sides", "ours,nope"])


def test_rollout_throughput_hf_with_left_padded_prompts():
    """``rollout_throughput.py`` with the HF backend (the engines' halves run in their venvs) and prompts left-padded
    to a larger ``--max-prompt-length``, as the dataset pads them."""
    cmd = [
        sys.executable,
        os.path.join(BENCH, "rollout_throughput.py"), "--backends", "hf", "--batch", "4", "--prompt-length", "6",
        "--max-prompt-length", "20", "--response-length", "5", "--repeats", "1"
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "batch 4 x prompt 6 (left-padded to 20) + 5 new tokens = 20 generated tokens" in proc.stdout
    rate = re.search(r"^\| hf \|.*\| ([\d,]+) \| 1\.0x \|$", proc.stdout, re.MULTILINE)
    assert rate and int(rate.group(1).replace(",", "")) > 0, proc.stdout
    bad = subprocess.run(cmd[:-6] + ["--max-prompt-length", "3", "--repeats", "1"],
                         capture_output=True,
                         text=True,
                         timeout=300,
                         cwd=REPO)
    assert bad.returncode != 0 and "--max-prompt-length 3 is shorter than --prompt-length 6" in bad.stderr
