"""A tiny Mixtral (mixture of experts) in the real vLLM CPU engine, weights streamed in with HF checkpoint names
(``block_sparse_moe.experts.E.w1/w2/w3.weight``, ``block_sparse_moe.gate.weight``) by ``vLLMRollout.update_weights``:
after each of two updates the engine's greedy output equals the HF rollout of the same weights token for token.

vLLM's in-place reload skipped the CPU fused-MoE experts' prepack on every load after the first, so the engine ran
on experts in checkpoint layout (different tokens from the first sync on);
``vllm_rollout_spmd._moe_experts_reprocessed_on_reload`` makes it redo it. Its own engine, in this process.
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

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from verl.models.mcore import mixtral_to_checkpoint_names  # noqa: E402
from verl.models.tiny import build_tiny_mixtral  # noqa: E402
from verl.workers.rollout.vllm_rollout.vllm_rollout_spmd import vLLMRollout  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_vllm_rollout import _config, _hf, _prompts  # noqa: E402


@pytest.mark.parametrize("intermediate", [128, 48], ids=["aligned", "padded"])
def test_mixtral_experts_follow_every_weight_update(tmp_path, intermediate):
    """``padded``: vLLM's CPU kernel pads the expert width 48 to 64, which the reload without the fix could not copy
    back (a shape error)."""
    path = build_tiny_mixtral(str(tmp_path / "mixtral"), intermediate_size=intermediate)
    tokenizer = AutoTokenizer.from_pretrained(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = vLLMRollout(path, OmegaConf.create(_config()), tokenizer=tokenizer)
    try:
        actor = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
        prompts = _prompts(tokenizer, validate=True)
        g = torch.Generator().manual_seed(0)
        for step in range(2):  # the checkpoint's weights (replacing dummy ones), then moved ones
            if step:
                with torch.no_grad():
                    for p in actor.parameters():
                        p.add_(0.02 * torch.randn(p.shape, generator=g))
            weights = mixtral_to_checkpoint_names(actor.state_dict())
            assert any(".block_sparse_moe.experts.3.w2.weight" in k for k in weights)
            loaded = engine.update_weights(iter(weights.items()))
            assert loaded["tensors"] == len(weights)
            engine.reset_prefix_cache()
            out = engine.generate_sequences(prompts)
            hf = _hf(actor, prompts, tokenizer)
            assert torch.equal(out.batch["responses"], hf.batch["responses"]), f"update {step}"
    finally:
        del engine.inference_engine
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
        torch.set_num_threads(threads)
