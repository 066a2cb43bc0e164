"""The policy of the embedded default run: the tiny model, warmed up with SFT on part of the arithmetic task.

RL from random weights learns nothing in minutes: the tiny model would never produce a correct answer, so every
reward would be 0. ``python -m verl.trainer.main_ppo`` with no arguments therefore starts from a model that
:func:`verl.trainer.fsdp_sft_trainer.run_sft` has trained, in this process, on worked solutions of a few thousand
arithmetic problems that are in neither the RL train split nor the test split: enough to learn the answer format and some of the
arithmetic, so validation accuracy starts low but not at zero and GRPO has room to raise it.

The result is built once and cached under ``$VERL_WARMUP_CACHE`` (default ``~/.cache/verl/warmup``), in a
directory named by a hash of the recipe (:data:`WARMUP_RECIPE`), this file and the base tiny model's build, so a
changed recipe builds a new model. Each build goes to a private temporary directory that is renamed into place:
concurrent runs never see a half-written model, and the loser of a race uses the winner's copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Optional

__all__ = [
    "CACHE_ENV", "WARMUP_RECIPE", "warmup_recipe", "warmup_fingerprint", "build_warmed_model", "get_warmed_model_path"
]

CACHE_ENV = "VERL_WARMUP_CACHE"
RECIPE_FILE = "warmup.json"

#: The warm-up: SFT of the tiny model on ``train_rows`` arithmetic problems disjoint from both splits of the RL task
#: (:func:`verl.utils.dataset.tasks.write_arithmetic_warmup`), for ``steps`` optimizer steps of ``batch_size`` rows
#: at a peak learning rate ``lr`` (linear warm-up, cosine decay). ``answer_line_ratio``: fraction of the warm-up
#: solutions that end with the ``#### N`` line the reward reads (the rest stop after the last column).
WARMUP_RECIPE: dict[str, Any] = {
    "train_rows": 2048,
    "val_rows": 64,
    "steps": 300,
    "batch_size": 64,
    "lr": 3e-3,
    "warmup_steps_ratio": 0.05,
    "weight_decay": 0.0,
    "max_length": 96,
    "seed": 0,
    "answer_line_ratio": 0.5,
}


def warmup_recipe(**overrides: Any) -> dict[str, Any]:
    """:data:`WARMUP_RECIPE` with ``overrides`` (unknown keys are an error, so a typo cannot go unnoticed)."""
    unknown = sorted(set(overrides) - set(WARMUP_RECIPE))
    if unknown:
        raise ValueError(f"unknown warm-up recipe keys {unknown}; known: {sorted(WARMUP_RECIPE)}")
    recipe = dict(WARMUP_RECIPE)
    recipe.update(overrides)
    return recipe


def warmup_fingerprint(recipe: dict[str, Any], base_model_path: str) -> str:
    """Hash of what the warmed model depends on: the recipe, this module and the base model build (its cache
    directory name already fingerprints the tiny model's code and versions)."""
    import torch
    import transformers

    h = hashlib.sha256()
    with open(os.path.abspath(__file__), "rb") as f:
        h.update(f.read())
    h.update(
        json.dumps([
            sorted(recipe.items()),
            os.path.basename(os.path.normpath(base_model_path)), transformers.__version__,
            torch.__version__.split("+")[0]
        ],
                   default=str).encode())
    return h.hexdigest()[:16]


def _sft_config(recipe: dict[str, Any], base: str, data: dict[str, str], ckpt_dir: str) -> dict[str, Any]:
    bsz = int(recipe["batch_size"])
    return {
        "data": {
            "train_files": data["train"],
            "val_files": data["test"],
            "multiturn": {
                "enable": True,
                "messages_key": "messages"
            },
            "train_batch_size": bsz,
            "micro_batch_size_per_gpu": bsz,
            "max_length": int(recipe["max_length"]),
            "truncation": "right",
        },
        "model": {
            "partial_pretrain": base,
            "enable_gradient_checkpointing": False
        },
        "optim": {
            "lr": float(recipe["lr"]),
            "warmup_steps_ratio": float(recipe["warmup_steps_ratio"]),
            "weight_decay": float(recipe["weight_decay"]),
            "lr_scheduler": "cosine",
        },
        "use_remove_padding": True,
        "trainer": {
            "default_local_dir": ckpt_dir,
            "project_name": "verl_quickstart",
            "experiment_name": "arithmetic_sft_warmup",
            "total_training_steps": int(recipe["steps"]),
            "test_freq": -1,
            "save_freq": -1,
            "logger": [],
            "resume_mode": "disable",
            "seed": int(recipe["seed"]),
            "checkpoint": {
                "save_contents": ["model"]
            },
        },
    }


def build_warmed_model(out_dir: str, base_model_path: str, recipe: dict[str, Any]) -> dict[str, Any]:
    """Run the warm-up SFT and write the warmed model (an ordinary Hugging Face directory with the base model's
    tokenizer) to ``out_dir``; returns a summary (losses, time) that is also stored as ``warmup.json``."""
    from verl.trainer.fsdp_sft_trainer import run_sft
    from verl.utils.checkpoint.hf_checkpoint import HF_WEIGHT_SUFFIXES, copy_hf_assets
    from verl.utils.dataset.tasks import write_arithmetic_warmup

    start = time.time()
    work = tempfile.mkdtemp(prefix="verl-warmup-")
    try:
        data = write_arithmetic_warmup(os.path.join(work, "data"),
                                       train_size=int(recipe["train_rows"]),
                                       val_size=int(recipe["val_rows"]),
                                       seed=int(recipe["seed"]),
                                       answer_line_ratio=float(recipe["answer_line_ratio"]))
        result = run_sft(_sft_config(recipe, base_model_path, data, os.path.join(work, "ckpt")))
        hf_dir = result["hf_model_dir"]
        if hf_dir is None:
            raise RuntimeError("the warm-up SFT run wrote no Hugging Face weights; see its log above")
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(hf_dir):
            if name == "config.json" or name.endswith(HF_WEIGHT_SUFFIXES):
                shutil.copy2(os.path.join(hf_dir, name), os.path.join(out_dir, name))
        copy_hf_assets(base_model_path, out_dir)  # the base model's tokenizer files and generation config, as built
        history = result["history"]
        summary = {
            "recipe": recipe,
            "base_model": base_model_path,
            "steps": result["global_step"],
            "first_train_loss": history[0]["train/loss"] if history else None,
            "last_train_loss": history[-1]["train/loss"] if history else None,
            "val_loss": history[-1].get("val/loss") if history else None,
            "seconds": round(time.time() - start, 1),
        }
        with open(os.path.join(out_dir, RECIPE_FILE), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cache_root(cache_dir: Optional[str]) -> str:
    return os.path.abspath(
        os.path.expanduser(cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "verl", "warmup")))


def get_warmed_model_path(cache_dir: Optional[str] = None, **recipe_overrides: Any) -> str:
    """Path of the SFT-warmed tiny model, building it on first use (a minute or two on a laptop CPU).

    ``cache_dir`` (else ``$VERL_WARMUP_CACHE``, else ``~/.cache/verl/warmup``) holds one directory per recipe;
    ``recipe_overrides`` change :data:`WARMUP_RECIPE` (tests use tiny step counts).
    """
    from verl.models.tiny import get_tiny_model_path

    recipe = warmup_recipe(**recipe_overrides)
    base = get_tiny_model_path()
    root = _cache_root(cache_dir)
    final = os.path.join(root, f"arithmetic-sft-{warmup_fingerprint(recipe, base)}")
    if os.path.isfile(os.path.join(final, RECIPE_FILE)):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".build-")
    print(
        f"[verl] warming up the tiny model with SFT on the arithmetic task ({recipe['steps']} steps, once; cached "
        f"in {final})",
        flush=True)
    try:
        summary = build_warmed_model(tmp, base, recipe)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, RECIPE_FILE)):
                raise
        print(
            f"[verl] warm-up done in {summary['seconds']} s: train loss {summary['first_train_loss']:.3f} -> "
            f"{summary['last_train_loss']:.3f}, validation loss {summary['val_loss']:.3f}",
            flush=True)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final
