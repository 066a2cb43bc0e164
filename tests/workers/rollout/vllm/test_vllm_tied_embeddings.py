"""A tied-embedding model (``tie_word_embeddings``, as Qwen2.5-0.5B) through the FSDP -> vLLM hybrid engine: the
engine's greedy output equals the HF rollout's token for token after the sync, so vLLM's output layer follows the
trained embedding. The sync must send ``lm_head.weight`` too: without it the output of vLLM's CPU build did not
follow. Its own engine: one in-process vLLM engine per module."""
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

from verl.models.tiny import build_tiny_model  # noqa: E402
from verl.workers.rollout.vllm_rollout.vllm_rollout_spmd import vLLMRollout  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_vllm_rollout import _config, _generate, _hf, _prompts  # noqa: E402


def test_tied_embedding_model_output_layer_follows_the_sync(tmp_path):
    path = build_tiny_model(str(tmp_path / "tied"), tie_word_embeddings=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = vLLMRollout(path, OmegaConf.create(_config()), tokenizer=tokenizer)
    try:
        actor = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        assert actor.lm_head.weight is actor.model.embed_tokens.weight
        with torch.no_grad():  # move away from the checkpoint, the embedding (= output layer) included
            g = torch.Generator().manual_seed(0)
            for p in actor.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        prompts = _prompts(tokenizer, validate=True)
        out, manager = _generate(engine, actor, prompts)
        hf = _hf(actor, prompts, tokenizer)
        assert torch.equal(out.batch["responses"], hf.batch["responses"])
        sent = manager.metrics["perf/weight_sync_gb"] * 2**30
        assert sent == pytest.approx(sum(v.numel() * v.element_size() for v in actor.state_dict().values()))
    finally:
        del engine.inference_engine
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
        torch.set_num_threads(threads)
