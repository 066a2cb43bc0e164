"""The Megatron actor's hybrid engine with SGLang's offline engine (CPU, float32) (``strategy=megatron`` +
``rollout.name=sglang``): ``verl.workers.megatron_workers.ActorRolloutRefWorker`` built as the worker group builds
it, in a fresh process (torchrun, gloo). After the first sync (``update_weights_from_tensor`` in several buckets) and
again after one PPO update of the Megatron actor, greedy generation equals the HF rollout of the actor's weights
token for token and the engine's log-probs equal the Megatron actor's (see
``tests/workers/rollout/megatron_engine_checks.py``). Megatron TP=1 (SGLang's tensor parallelism needs GPUs), on the
tiny model, its tied-embedding variant and a tiny Mixtral (MoE, Megatron EP=1; the EP=2 gather is engine-agnostic and
runs against vLLM in ``tests/workers/rollout/vllm/test_megatron_vllm.py``: two SGLang engines take ~75 s here).

Needs SGLang (``bash scripts/ci/setup_sglang_env.sh .venv-sglang``) and megatron-core; skipped without them.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("sglang") is None or importlib.util.find_spec("megatron.core") is None:
    pytest.skip(
        "SGLang or megatron-core is not installed; run tests/workers/rollout/sglang in the SGLang venv "
        "(bash scripts/ci/setup_sglang_env.sh .venv-sglang)",
        allow_module_level=True)

CHECKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_engine_checks.py")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("variant", ["dense", "tied", "moe"], ids=["untied", "tied_embeddings", "moe"])
def test_megatron_actor_syncs_into_sglang(tmp_path, variant):
    """``moe``: a tiny Mixtral (Megatron EP=1) whose experts and router reach SGLang under HF checkpoint names
    (``block_sparse_moe.experts.E.w1/w2/w3.weight``, ``block_sparse_moe.gate.weight``)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_free_port()}", CHECKS,
        "sglang", "1", "1",
        str(tmp_path)
    ] + ([variant] if variant != "dense" else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"sglang megatron tp=1 failed:\n{log[-8000:]}"
    assert (tmp_path / "ok-0").is_file(), log[-3000:]
    assert "engine=sglang megatron tp=1 rollout tp=1" in log
