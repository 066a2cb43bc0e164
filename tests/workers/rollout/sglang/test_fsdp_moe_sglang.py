"""The FSDP actor's hybrid engine with SGLang's offline CPU engine (float32) on a tiny Mixtral (``strategy=fsdp`` +
``rollout.name=sglang``): ``verl.workers.fsdp_workers.ActorRolloutRefWorker`` (FSDP2) built as the worker group
builds it, in a fresh process (torchrun, gloo). transformers 5 holds the experts fused in memory; the sync
(``update_weights_from_tensor`` in several buckets) must send them under the checkpoint names SGLang's Mixtral loader
takes (``verl.models.moe_names.checkpoint_name_converter``). After the first sync and again after one PPO update,
greedy generation equals the HF rollout of the actor's weights token for token and the engine's log-probs equal the
actor's (see ``tests/workers/rollout/fsdp_engine_checks.py``).

Without the conversion SGLang skipped the in-memory expert names without an error and generated from its dummy experts
and router (greedy output differed from HF after the first sync; log-probs off by 0.93).

Needs SGLang (``bash scripts/ci/setup_sglang_env.sh .venv-sglang``); skipped without it.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip(
        "SGLang is not installed; run tests/workers/rollout/sglang in the SGLang venv "
        "(bash scripts/ci/setup_sglang_env.sh .venv-sglang)",
        allow_module_level=True)

CHECKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fsdp_engine_checks.py")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fsdp_moe_actor_syncs_into_sglang(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_free_port()}", CHECKS,
        "sglang",
        str(tmp_path)
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"fsdp moe -> sglang failed:\n{log[-8000:]}"
    assert (tmp_path / "ok-0").is_file(), log[-3000:]
    print("\n".join(line for line in log.splitlines() if line.startswith("[fsdp moe")))
