"""The FSDP actor's hybrid engine with the real vLLM CPU engine on a tiny Mixtral (``strategy=fsdp`` +
``rollout.name=vllm``): ``verl.workers.fsdp_workers.ActorRolloutRefWorker`` (FSDP2) built as the worker group builds
it, in a fresh process (torchrun, gloo). transformers 5 holds the experts fused in memory; the sync must send them
under the checkpoint names vLLM's Mixtral loader takes (``verl.models.moe_names.checkpoint_name_converter``). After
the first sync and again after one PPO update, greedy generation equals the HF rollout of the actor's weights token
for token and the engine's log-probs equal the actor's (see ``tests/workers/rollout/fsdp_engine_checks.py``).

Without the conversion vLLM's in-place reload failed on the first in-memory expert name it does not know.

Needs vLLM (``bash scripts/ci/setup_vllm_env.sh .venv-vllm``); skipped without it.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip(
        "vLLM is not installed; run tests/workers/rollout/vllm in the vLLM venv "
        "(bash scripts/ci/setup_vllm_env.sh .venv-vllm)",
        allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fsdp_engine_checks import run_in_fresh_process  # noqa: E402


def test_fsdp_moe_actor_syncs_into_vllm(tmp_path):
    run_in_fresh_process("vllm", str(tmp_path), dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
