"""The Megatron actor, critic, hybrid-engine weight generator (into the HF rollout, and into mock vLLM / SGLang
engines) and dist checkpoint across 2 processes (torchrun; gloo on CPU through verl.utils.megatron_cpu, NCCL on GPUs).
Each case runs one check of ``dist_checks.py`` and passes when every rank wrote its ``ok`` file; the checks compare
against a plain Hugging Face model of the same weights."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron.core") is None,
                                reason="megatron-core is not installed (pip install megatron-core==0.16.1)")

HERE = os.path.dirname(os.path.abspath(__file__))
NPROC = 2


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(check: str,
         tp: int,
         pp: int,
         tmp_path,
         nproc: int = NPROC,
         ep: int = 1,
         cp: int = 1,
         vpp: int | None = None) -> None:
    gpus = _gpus()
    if nproc > 1 and 0 < gpus < nproc:
        pytest.skip(f"{nproc} ranks need {nproc} GPUs (NCCL refuses two ranks on one device); this machine has {gpus}")
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
        os.path.join(HERE, "dist_checks.py"), check,
        str(tp),
        str(pp),
        str(tmp_path),
        str(ep),
        str(cp)
    ] + ([str(vpp)] if vpp else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{check} tp={tp} pp={pp} vpp={vpp} ep={ep} cp={cp} failed:\n{log[-6000:]}"
    for rank in range(nproc):
        assert (tmp_path / f"ok-{check}-{rank}").is_file(), log[-3000:]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (1, 1)], ids=["tp2", "pp2", "dp2"])
def test_actor_log_probs_and_update_match_hf(tp, pp, tmp_path):
    _run("actor", tp, pp, tmp_path)


def test_actor_on_one_rank(tmp_path):
    """The whole actor path in one process (what a single-GPU machine can run)."""
    _run("actor", 1, 1, tmp_path, nproc=1)


def test_context_parallel_attention_equals_full_causal_attention(tmp_path):
    """CP=2: each rank's query chunks against all-gathered K/V (GQA, padding) give the output and q/k/v gradients of
    attention over the whole sequence."""
    _run("cp_attention", 1, 1, tmp_path, cp=2)


def test_actor_with_context_parallelism_matches_hf(tmp_path):
    """CP=2 (2 ranks, DP=1): log-probs, the gradient norm and one PPO update equal the HF model's; the synced HF
    rollout gives the trained actor's log-probs."""
    _run("actor", 1, 1, tmp_path, cp=2)


@pytest.mark.parametrize("tp,pp,vpp", [(2, 1, None), (1, 2, None), (1, 2, 2)], ids=["tp2", "pp2", "pp2-vpp2"])
def test_actor_with_context_and_tensor_or_pipeline_parallelism_matches_hf(tp, pp, vpp, tmp_path):
    """CP=2 x TP=2 (each TP rank all-gathers the K/V of its heads over its CP group) and CP=2 x PP=2 (1F1B, and the
    interleaved schedule with 2 virtual stages; the stages pass CP-local activations) on 4 ranks: log-probs, the
    gradient norm and one PPO update equal the HF model's; the synced HF rollout gives the trained actor's log-probs."""
    _run("actor", tp, pp, tmp_path, nproc=4, cp=2, vpp=vpp)


@pytest.mark.parametrize("tp,cp,nproc", [(1, 2, 2), (1, 1, 2), (2, 1, 2), (2, 2, 4)],
                         ids=["cp2", "dp2", "tp2", "tp2-cp2"])
def test_critic_values_and_update_match_hf(tp, cp, nproc, tmp_path):
    """Values equal the HF backbone x value head; the gradient norm and one update equal HF AdamW's."""
    _run("critic_vs_hf", tp, 1, tmp_path, nproc=nproc, cp=cp)


def test_dist_checkpoint_with_context_parallelism_replays_the_next_update(tmp_path):
    _run("checkpoint", 1, 1, tmp_path, cp=2)


def test_critic_learns_values_with_tp(tmp_path):
    _run("critic", 2, 1, tmp_path)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_weight_generator_yields_hf_weights_in_buckets(tp, pp, tmp_path):
    _run("weights", tp, pp, tmp_path)


def test_vllm_and_sglang_hybrid_engines_stream_into_mock_engines_with_pp(tmp_path):
    """The engine boundary is a mock here (the real engines run in their own venvs: tests/workers/rollout/{vllm,
    sglang}/test_megatron_*.py)."""
    _run("engine_mock", 1, 2, tmp_path)


@pytest.mark.parametrize("tp,pp", [(1, 2), (1, 1)], ids=["pp2", "dp2"])
def test_dist_checkpoint_resume_replays_the_next_update(tp, pp, tmp_path):
    """dp2 shards the distributed optimizer's state over the two ranks."""
    _run("checkpoint", tp, pp, tmp_path)


def test_dist_checkpoint_from_pp2_resumes_its_weights_with_tp2(tmp_path):
    """Saved with PP=2, resumed with TP=2: the weights re-shard; the optimizer state cannot, and says so."""
    _run("reshard_save", 1, 2, tmp_path)
    _run("reshard_load", 2, 1, tmp_path)


@pytest.mark.parametrize("nproc,pp,ep", [(1, 1, 1), (2, 1, 2), (2, 2, 1)], ids=["ep1", "ep2", "pp2"])
def test_moe_actor_log_probs_update_and_sync_match_hf(nproc, pp, ep, tmp_path):
    """A tiny Mixtral: log-probs equal HF's (also with dynamic batch sizes, whose micro-batches differ between the
    ranks), one PPO update equals an HF AdamW step, and the synced HF rollout (its fused in-memory experts, gathered
    over the expert-parallel group) gives the actor's log-probs; EP=2 spreads the 4 experts over the 2 data-parallel
    ranks (all-to-all token dispatch over gloo)."""
    _run("moe_actor", 1, pp, tmp_path, nproc=nproc, ep=ep)


def test_moe_dist_checkpoint_with_ep2_resumes_and_merges_to_hf(tmp_path):
    """Experts saved under their global index by 2 EP ranks: resume replays the next update exactly; the HF export
    and the offline merger (``verl.model_merger``, no process group) load in transformers with the saved policy."""
    _run("moe_checkpoint", 1, 1, tmp_path, ep=2)
