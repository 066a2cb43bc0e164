"""Crash safety end to end: ``python -m verl.trainer.main_ppo`` is killed with SIGKILL (driver, its Ray cluster and
workers: the whole process group, as when a node is lost) right after a checkpoint lands, possibly in the middle
of writing the next one; started again with ``trainer.resume_mode=auto`` it continues from the last complete
checkpoint and ends at the configured step count, training each remaining step exactly once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from verl.models.tiny import get_tiny_model_path
from verl.utils.dataset.tasks import write_arithmetic_task

TOTAL_STEPS = 5
KILL_AFTER_STEP = 2


def _command(root, data, model) -> list[str]:
    return [
        sys.executable, "-m", "verl.trainer.main_ppo", f"data.train_files={data['train']}",
        f"data.val_files={data['test']}", "data.train_batch_size=4", "data.max_prompt_length=32",
        "data.max_response_length=8", "algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=2",
        f"actor_rollout_ref.model.path={model}", "actor_rollout_ref.model.enable_gradient_checkpointing=False",
        "actor_rollout_ref.actor.use_torch_compile=False", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4", "trainer.device=cpu",
        "trainer.n_gpus_per_node=1", "trainer.logger=[console,file]", "trainer.project_name=verl_test",
        "trainer.experiment_name=kill", f"trainer.default_local_dir={root / 'ckpt'}", "trainer.save_freq=1",
        "trainer.val_before_train=False", "trainer.test_freq=-1", f"trainer.total_training_steps={TOTAL_STEPS}",
        "trainer.resume_mode=auto", "ray_init.num_cpus=2"
    ]


def _latest(ckpt_dir) -> int:
    tracker = ckpt_dir / "latest_checkpointed_iteration.txt"
    try:
        return int(tracker.read_text().strip())
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_ends_at_the_same_step(tmp_path):
    data = write_arithmetic_task(str(tmp_path / "data"), train_size=40, test_size=4)
    model = get_tiny_model_path()
    env = dict(os.environ, VERL_FILE_LOGGER_ROOT=str(tmp_path / "logs"), RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)  # each run starts (and loses) its own local cluster
    cmd = _command(tmp_path, data, model)
    ckpt = tmp_path / "ckpt"

    with open(tmp_path / "run1.log", "wb") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 600
        try:
            while _latest(ckpt) < KILL_AFTER_STEP:
                assert first.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the first run did not reach its second checkpoint"
                time.sleep(0.2)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    killed_at = _latest(ckpt)
    assert KILL_AFTER_STEP <= killed_at < TOTAL_STEPS
    assert first.returncode == -signal.SIGKILL

    second = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=600)
    output = second.stdout.decode(errors="replace")
    assert second.returncode == 0, output[-3000:]
    assert _latest(ckpt) == TOTAL_STEPS
    leftovers = [str(p) for p in ckpt.glob("**/*") if ".tmp-" in p.name]
    assert not leftovers, leftovers  # a save cut short by the kill was cleaned up when that step was saved again

    with open(tmp_path / "logs" / "verl_test" / "kill.jsonl", encoding="utf-8") as f:
        steps = [r["step"] for r in map(json.loads, f) if "training/global_step" in r["data"]]
    # the first run logged steps 1..killed_at, perhaps one more whose checkpoint the kill cut short; the resumed run
    # trained each later step once, starting right after the last complete checkpoint
    resumed = TOTAL_STEPS - killed_at
    assert steps[-resumed:] == list(range(killed_at + 1, TOTAL_STEPS + 1)), steps
    assert steps[:killed_at] == list(range(1, killed_at + 1)), steps
    assert len(steps) - resumed in (killed_at, killed_at + 1), steps
