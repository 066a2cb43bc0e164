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
import sys

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip(
        "SGLang is not installed; run tests/workers/rollout/sglang in the SGLang venv "
        "(bash scripts/ci/setup_sglang_env.sh .venv-sglang)",
        allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fsdp_engine_checks import run_in_fresh_process  # noqa: E402


def test_fsdp_moe_actor_syncs_into_sglang(tmp_path):
    run_in_fresh_process("sglang", str(tmp_path), dict(os.environ, PYTHONWARNINGS="ignore"))
