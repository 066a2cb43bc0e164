"""Shared pieces of the SGLang rollout tests: the tiny model, prompt batches from real text, rollout configs, and
an HF reference model whose weights can be perturbed (the "actor update").

SGLang must run in its own venv (``bash scripts/ci/setup_sglang_env.sh .venv-sglang``); test modules that need it
skip themselves visibly when it is not installed. On a CPU-only machine SGLang's CPU engine is selected before
anything imports it (``SGLANG_USE_CPU_ENGINE=1``, inherited by the engine processes)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("VERL_DEVICE", "").lower() == "cpu":
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

from verl.models.tiny import get_tiny_model_path  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.utils.torch_functional import compute_position_id_with_mask  # noqa: E402

TEXTS = [
    "What is 12 + 7?", "Natalia sold clips to 48 of her friends in April.", "hello", "Compute 7 * 8, then add 1.",
    "A train travels 60 miles per hour for 3 hours. How far does it travel?", "x + 3 = 10", "Let's think step by step.",
    "The store sells pencils in packs of 12."
]


@pytest.fixture(scope="session")
def tiny_path() -> str:
    return get_tiny_model_path()


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="session")
def make_prompts(tokenizer):
    """``make_prompts(texts, prompt_length, **meta)``: a left-padded prompt batch as RLHFDataset gives it."""

    def make(texts=TEXTS, prompt_length: int = 32, **meta) -> DataProto:
        pad = tokenizer.pad_token_id
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"][-prompt_length:] for t in texts]
        ids = torch.full((len(rows), prompt_length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, prompt_length - len(row):] = torch.tensor(row)
            mask[i, prompt_length - len(row):] = 1
        info = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}
        info.update(meta)
        return DataProto.from_dict(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "position_ids": compute_position_id_with_mask(mask)
            },
            non_tensors={
                "uid": np.array([f"u{i}" for i in range(len(rows))], dtype=object),
                "data_source": np.array(["test"] * len(rows), dtype=object)
            },
            meta_info=info)

    return make


@pytest.fixture(scope="session")
def rollout_config():
    """``rollout_config(**overrides)``: an ``actor_rollout_ref.rollout`` node for the tiny model on CPU."""
    from omegaconf import OmegaConf

    def make(**overrides):
        config = {
            "name": "sglang",
            "prompt_length": 32,
            "response_length": 16,
            "max_model_len": 64,
            "do_sample": True,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "seed": 0,
            "ignore_eos": False,
            "calculate_log_probs": False,
            "free_cache_engine": True,
            "update_weights_bucket_megabytes": 512,
            "engine_kwargs": {
                "sglang": {
                    "attention_backend": None
                }
            },
            "val_kwargs": {
                "temperature": 0,
                "top_p": 1.0,
                "top_k": -1,
                "n": 1,
                "do_sample": False
            },
        }
        config.update(overrides)
        return OmegaConf.create(config)

    return make


@pytest.fixture(scope="session")
def load_hf(tiny_path):
    """``load_hf()``: the tiny model in float32 (a fresh copy each call)."""
    from transformers import AutoModelForCausalLM

    def load():
        model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32, attn_implementation="sdpa")
        model.eval()
        return model

    return load


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every weight (a stand-in for an optimizer step that changes greedy outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="session")
def perturb():
    return perturb_


@pytest.fixture(scope="session")
def hf_generate(rollout_config):
    """``hf_generate(model, prompts, **config)``: the HF rollout's output on the same prompts (the reference)."""
    from verl.workers.rollout.hf import HFRollout

    def generate(model, prompts, **overrides):
        return HFRollout(model, rollout_config(**overrides)).generate_sequences(prompts)

    return generate
