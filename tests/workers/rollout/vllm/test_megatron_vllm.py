"""The Megatron actor's hybrid engine with the real vLLM CPU engine (``strategy=megatron`` + ``rollout.name=vllm``):
``verl.workers.megatron_workers.ActorRolloutRefWorker`` built as the worker group builds it, in fresh processes
(torchrun, gloo). After the first sync and again after one PPO update of the Megatron actor, greedy generation equals
the HF rollout of the actor's weights token for token and the engine's log-probs equal the Megatron actor's (see
``tests/workers/rollout/megatron_engine_checks.py``). Layouts: Megatron TP=1 with one engine in one process, and
Megatron TP=2 over two processes feeding one vLLM engine of tensor-parallel size 2; a tiny Mixtral (MoE) at
Megatron EP=1 (one process) and EP=2 (two processes, an engine each).

Needs vLLM (``bash scripts/ci/setup_vllm_env.sh .venv-vllm``) and megatron-core; skipped without them.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("megatron.core") is None:
    pytest.skip(
        "vLLM or megatron-core is not installed; run tests/workers/rollout/vllm in the vLLM venv "
        "(bash scripts/ci/setup_vllm_env.sh .venv-vllm)",
        allow_module_level=True)

CHECKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_engine_checks.py")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_engine_checks(engine: str,
                      tp: int,
                      rollout_tp: int,
                      nproc: int,
                      tmp_path,
                      tied: bool = False,
                      moe_ep: int = 0) -> str:
    """Run the checks on ``nproc`` fresh ranks (``tied``: on the tiny model with tied embeddings; ``moe_ep`` > 0: on
    a tiny Mixtral with ``moe_ep`` expert-parallel ranks); returns their log. Fails with the log's tail when a rank
    fails."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
        CHECKS, engine,
        str(tp),
        str(rollout_tp),
        str(tmp_path)
    ] + (["tied"] if tied else []) + (["moe", str(moe_ep)] if moe_ep else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{engine} megatron tp={tp} rollout tp={rollout_tp} failed:\n{log[-8000:]}"
    for rank in range(nproc):
        assert (tmp_path / f"ok-{rank}").is_file(), log[-3000:]
    return log


def test_megatron_actor_syncs_into_vllm(tmp_path):
    log = run_engine_checks("vllm", tp=1, rollout_tp=1, nproc=1, tmp_path=tmp_path)
    assert "engine=vllm megatron tp=1 rollout tp=1" in log


def test_megatron_tp2_actor_syncs_into_vllm_tp2(tmp_path):
    log = run_engine_checks("vllm", tp=2, rollout_tp=2, nproc=2, tmp_path=tmp_path)
    assert log.count("engine=vllm megatron tp=2 rollout tp=2") == 2


def test_megatron_actor_with_tied_embeddings_syncs_into_vllm(tmp_path):
    """The embedding is also sent as lm_head.weight: without it vLLM's output layer kept its dummy weights."""
    log = run_engine_checks("vllm", tp=1, rollout_tp=1, nproc=1, tmp_path=tmp_path, tied=True)
    assert "engine=vllm megatron tp=1 rollout tp=1" in log


def test_megatron_moe_actor_syncs_into_vllm(tmp_path):
    """Tiny Mixtral, Megatron EP=1: the experts and router go to vLLM under HF checkpoint names
    (``block_sparse_moe.experts.E.w1/w2/w3.weight``, ``block_sparse_moe.gate.weight``)."""
    log = run_engine_checks("vllm", tp=1, rollout_tp=1, nproc=1, tmp_path=tmp_path, moe_ep=1)
    assert "engine=vllm megatron tp=1 rollout tp=1 moe ep=1" in log


def test_megatron_moe_ep2_actor_syncs_into_vllm(tmp_path):
    """Tiny Mixtral, Megatron EP=2 over two processes (each holds 2 of the 4 experts), one vLLM engine per rank: the
    weight generator gathers every expert over the EP group, so both engines get the whole model."""
    log = run_engine_checks("vllm", tp=1, rollout_tp=1, nproc=2, tmp_path=tmp_path, moe_ep=2)
    assert log.count("engine=vllm megatron tp=1 rollout tp=1 moe ep=2") == 2
