"""Every shell recipe under examples/ppo_trainer, examples/grpo_trainer and examples/generation runs as a user runs it
(``bash script.sh [overrides]``, a subprocess with its own local Ray), with the tiny model, tiny data and 2 steps set
through the scripts' environment variables, and leaves behind what it should: checkpoints, rollout / validation
dumps, the generations parquet and the eval metrics.

A new script in those folders is picked up automatically and fails until it gets an entry in ``CHECKS``.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from verl.models.tiny import get_tiny_model_path
from verl.utils.dataset.tasks import write_arithmetic_task

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDERS = ("ppo_trainer", "grpo_trainer", "generation")
SCRIPTS = sorted(
    os.path.relpath(p, os.path.join(REPO, "examples"))
    for folder in FOLDERS
    for p in glob.glob(os.path.join(REPO, "examples", folder, "*.sh")))

TRAIN_ROWS, TEST_ROWS, BATCH, STEPS, N = 8, 4, 4, 2, 2

# the tiny sizes every script understands (variables a script does not use are ignored)
TINY_ENV = {
    "NNODES": "1",
    "N_GPUS_PER_NODE": "1",
    "ROLLOUT_NAME": "hf",
    "ROLLOUT_TP": "1",
    "ROLLOUT_N": str(N),
    "TRAIN_BATCH_SIZE": str(BATCH),
    "PPO_MINI_BATCH_SIZE": "2",
    "MAX_PROMPT_LENGTH": "32",
    "MAX_RESPONSE_LENGTH": "8",
    "ACTOR_MAX_TOKEN_LEN_PER_GPU": "128",
    "CRITIC_MAX_TOKEN_LEN_PER_GPU": "128",
    "GRADIENT_CHECKPOINTING": "False",
    "TOTAL_EPOCHS": "1",
    "TOTAL_TRAINING_STEPS": str(STEPS),
    "SAVE_FREQ": str(STEPS),
    "VAL_MAX_SAMPLES": str(TEST_ROWS),
    "LOGGER": "['console']",
    # generation
    "N_SAMPLES": str(N),
    "BATCH_SIZE": "3",
    "PROMPT_LENGTH": "32",
    "RESPONSE_LENGTH": "8",
    "TRUST_REMOTE_CODE": "False",
}
# on every machine: the CPU path, no torch.compile (as tests/trainer/test_main_ppo.py runs main_ppo)
TRAINER_ARGS = ["trainer.device=cpu", "actor_rollout_ref.actor.use_torch_compile=False"]
GENERATION_ARGS = ["trainer.device=cpu"]
MEGATRON_PPO_ARGS = [
    "trainer.n_gpus_per_node=2", "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
    "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1", "critic.megatron.tensor_model_parallel_size=2",
    "critic.megatron.pipeline_model_parallel_size=1", "actor_rollout_ref.actor.megatron.param_offload=True",
    "actor_rollout_ref.actor.megatron.grad_offload=True", "actor_rollout_ref.actor.megatron.optimizer_offload=True"
]
MEGATRON_GRPO_ARGS = [
    "trainer.n_gpus_per_node=2", "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=1",
    "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2"
]


def _jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_checkpoint(out, critic: bool) -> None:
    ckpt = out / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    step = ckpt / f"global_step_{STEPS}"
    assert (step / "actor").is_dir() and (step / "data.pt").is_file()
    assert (step / "critic").is_dir() == critic


def check_ppo(out, log: str) -> None:
    _check_checkpoint(out, critic=True)
    assert "critic/vf_loss" in log  # GAE with a trained critic


def check_grpo(out, log: str) -> None:
    _check_checkpoint(out, critic=False)
    assert "actor/kl_loss" in log and "critic/vf_loss" not in log


def check_grpo_debug(out, log: str) -> None:
    check_grpo(out, log)
    for step in range(1, STEPS + 1):
        rows = _jsonl(out / "debug" / "rollout" / f"{step}.jsonl")
        assert len(rows) == BATCH * N
        assert all({"input", "output", "gts", "score", "advantages", "step"} <= set(r) for r in rows)
    for step in range(0, STEPS + 1):  # before training, then every step (the script's TEST_FREQ=1)
        rows = _jsonl(out / "debug" / "validation" / f"{step}.jsonl")
        assert len(rows) == TEST_ROWS and all(r["step"] == step for r in rows)


def check_generation(out, log: str) -> None:
    rows = pq.read_table(out / "gen.parquet").to_pylist()
    assert len(rows) == TEST_ROWS
    assert all(len(r["responses"]) == N and all(isinstance(s, str) for s in r["responses"]) for r in rows)
    metrics = json.loads((out / "gen_metrics.json").read_text())
    assert set(metrics["arithmetic"]) >= {"mean_score", "pass@1", f"pass@{N}"}
    assert metrics["arithmetic"]["num_responses"] == TEST_ROWS * N
    assert "test_score/arithmetic" in log


# script (relative to examples/) -> (extra command-line arguments, check of its outputs)
CHECKS = {
    "ppo_trainer/run_qwen2-7b_seq_balance.sh": (TRAINER_ARGS, check_ppo),
    "grpo_trainer/run_qwen2-7b_seq_balance.sh": (TRAINER_ARGS, check_grpo),
    # run (once, ~1 min) and checked by tests/trainer/test_debug_dump_notebook.py, whose notebook reads its dump
    "grpo_trainer/run_qwen2-7b_seq_balance_debug.sh": None,
    "generation/run_deepseek_v2_lite_math.sh": (GENERATION_ARGS, check_generation),
    # Megatron-core backend on CPU (gloo, verl.utils.megatron_cpu): two worker processes; PPO: TP=2 + offload, GRPO: PP=2
    "ppo_trainer/run_qwen2-7b_megatron.sh": (TRAINER_ARGS + MEGATRON_PPO_ARGS, check_ppo),
    "grpo_trainer/run_qwen2-7b_megatron.sh": (TRAINER_ARGS + MEGATRON_GRPO_ARGS, check_grpo),
}


def make_tiny_data(root) -> dict:
    """The tiny task files (TRAIN_ROWS / TEST_ROWS rows) under ``root`` and the tiny model: the ``data`` fixture."""
    paths = write_arithmetic_task(str(root), train_size=TRAIN_ROWS, test_size=TEST_ROWS)
    return {"train": paths["train"], "test": paths["test"], "model": get_tiny_model_path()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("example_data"))


def test_every_script_has_a_check():
    assert SCRIPTS, "no example scripts found"
    assert sorted(CHECKS) == SCRIPTS, "add an entry to CHECKS for every example script (and remove stale ones)"


def run_example_script(script: str, data: dict, out, args=(), env_overrides: dict | None = None) -> str:
    """Run ``examples/<script>`` as a user does, with TINY_ENV (updated by ``env_overrides``), the tiny model and data
    (``data`` fixture) and every output under ``out``; return its log, failing the test on a non-zero exit. Other tests
    that need what an example script leaves behind (e.g. tests/trainer/test_debug_dump_notebook.py) call this too."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # each script starts its own local Ray
    env.update(TINY_ENV)
    env.update(env_overrides or {})
    env.update({
        "HOME": str(out / "home"),  # nothing lands in the real home directory
        "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),  # python3 = this interpreter
        "MODEL_PATH": data["model"],
        "TRAIN_FILES": data["train"],
        "VAL_FILES": data["test"],
        "DATA_PATH": data["test"],
        "OUTPUT_PATH": str(out / "gen.parquet"),
        "METRICS_PATH": str(out / "gen_metrics.json"),
        "CKPT_DIR": str(out / "ckpt"),
        "DEBUG_DIR": str(out / "debug"),
    })
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", script), *args],
                          cwd=out,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=420)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"examples/{script} exited with {proc.returncode}:\n{log[-6000:]}"
    return log


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_script_runs_with_the_tiny_model(script, data, tmp_path):
    if script not in CHECKS:
        pytest.fail(f"examples/{script} has no entry in CHECKS")
    if CHECKS[script] is None:
        pytest.skip(f"examples/{script} runs in the test module that uses its output")
    if "megatron" in script and importlib.util.find_spec("megatron.core") is None:
        pytest.skip("megatron-core is not installed (pip install megatron-core==0.16.1)")
    args, check = CHECKS[script]
    check(tmp_path, run_example_script(script, data, tmp_path, args))
    if script in RESUMED:
        check_resume(tmp_path, run_example_script(script, data, tmp_path, args,
                                                  {"TOTAL_TRAINING_STEPS": str(STEPS + 1)}))


# scripts run a second time with one more step: the trainer's default resume_mode=auto continues from their last
# checkpoint in a new process (for Megatron: model, distributed optimizer with Adam's step counter, lr and RNG state)
RESUMED = {"grpo_trainer/run_qwen2-7b_megatron.sh"}


def check_resume(out, log: str) -> None:
    assert f"resuming from checkpoint {out / 'ckpt' / f'global_step_{STEPS}'}" in log, log[-3000:]
    steps = [int(step) for step in re.findall(r"\bstep:(\d+) - ", log)]  # the console logger's lines
    assert steps == [STEPS + 1], f"the resumed run should train step {STEPS + 1} only, it logged steps {steps}"
    assert (out / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS + 1)
