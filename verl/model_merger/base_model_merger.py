"""Shared parts of the checkpoint -> Hugging Face converters: the CLI arguments and config, and writing the result.

Usage::

    python -m verl.model_merger merge --backend fsdp --local_dir CKPT/global_step_N/actor --target_dir OUT
    python -m verl.model_merger merge --backend megatron --local_dir CKPT/global_step_N/actor --target_dir OUT
    python -m verl.model_merger test  --backend fsdp --local_dir CKPT/global_step_N/actor --test_hf_dir REF
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["BaseModelMerger", "ModelMergerConfig", "generate_config_from_args", "parse_args"]


@dataclass
class ModelMergerConfig:
    """What one merge (or test) run does. ``hf_model_config_path`` defaults to ``<local_dir>/huggingface``."""
    operation: str  # "merge" or "test"
    backend: str  # "fsdp" or "megatron"
    local_dir: str
    target_dir: Optional[str] = None
    hf_model_config_path: Optional[str] = None
    test_hf_dir: Optional[str] = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.operation not in ("merge", "test"):
            raise ValueError(f"operation must be 'merge' or 'test', got {self.operation!r}")
        if self.backend not in ("fsdp", "megatron"):
            raise ValueError(f"--backend must be 'fsdp' or 'megatron', got {self.backend!r}")
        if self.operation == "merge" and not self.target_dir:
            raise ValueError("merge needs --target_dir (the Hugging Face directory to write)")
        if self.operation == "test" and not self.test_hf_dir:
            raise ValueError("test needs --test_hf_dir (a Hugging Face directory to compare the merged weights with)")
        self.local_dir = os.path.abspath(os.path.expanduser(self.local_dir))
        if self.target_dir:
            self.target_dir = os.path.abspath(os.path.expanduser(self.target_dir))
        if self.hf_model_config_path is None:
            self.hf_model_config_path = os.path.join(self.local_dir, "huggingface")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m verl.model_merger",
                                     description="Convert a verl actor/critic checkpoint into a Hugging Face model "
                                     "directory (merge) or compare it with one (test).")
    sub = parser.add_subparsers(dest="operation", required=True)
    for name, help_text in (("merge", "merge the rank shards and save a Hugging Face model directory"),
                            ("test", "merge in memory and compare with the weights in --test_hf_dir")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--backend", required=True, choices=["fsdp", "megatron"], help="training backend of the ckpt")
        p.add_argument("--local_dir",
                       required=True,
                       help="the checkpoint directory of one role, e.g. checkpoints/proj/exp/global_step_100/actor")
        p.add_argument("--hf_model_config_path",
                       default=None,
                       help="directory with the model's config.json (default: <local_dir>/huggingface)")
        p.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true")
        if name == "merge":
            p.add_argument("--target_dir", required=True, help="output Hugging Face model directory")
        else:
            p.add_argument("--test_hf_dir", required=True, help="reference Hugging Face model directory")
    return parser.parse_args(argv)


def generate_config_from_args(args: argparse.Namespace) -> ModelMergerConfig:
    return ModelMergerConfig(operation=args.operation,
                             backend=args.backend,
                             local_dir=args.local_dir,
                             target_dir=getattr(args, "target_dir", None),
                             hf_model_config_path=args.hf_model_config_path,
                             test_hf_dir=getattr(args, "test_hf_dir", None),
                             trust_remote_code=args.trust_remote_code)


class BaseModelMerger:
    """Merge a backend's shards into one full state dict (:meth:`merge_state_dict`), then save or test it."""

    backend: str = ""  # the ``--backend`` name of a subclass

    def __init__(self, config: ModelMergerConfig) -> None:
        self.config = config

    @classmethod
    def merge_checkpoint(cls, local_dir: str, target_dir: str, hf_model_config_path: Optional[str] = None) -> str:
        """Python entry point of the merge: write ``target_dir`` and return it."""
        config = ModelMergerConfig(operation="merge",
                                   backend=cls.backend,
                                   local_dir=local_dir,
                                   target_dir=target_dir,
                                   hf_model_config_path=hf_model_config_path)
        return cls(config).merge_and_save()

    def merge_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_hf_config(self):
        from transformers import AutoConfig

        path = self.config.hf_model_config_path
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no config.json in {path}: the checkpoint's huggingface/ directory is missing or "
                                    "incomplete; pass --hf_model_config_path <directory of the original HF model>")
        return AutoConfig.from_pretrained(path, trust_remote_code=self.config.trust_remote_code)

    def merge_and_save(self) -> str:
        """Write ``target_dir``: safetensors weights, config, and the tokenizer/generation files of the checkpoint."""
        from verl.utils.checkpoint.hf_checkpoint import copy_hf_assets, save_hf_model_from_state_dict

        state_dict = self.merge_state_dict()  # first: it reports a wrong --local_dir most clearly
        hf_config = self.load_hf_config()
        target = self.config.target_dir
        save_hf_model_from_state_dict(state_dict, hf_config, target, trust_remote_code=self.config.trust_remote_code)
        copy_hf_assets(self.config.hf_model_config_path, target)
        return target

    def test(self, atol: float = 1e-6, rtol: float = 1e-5) -> None:
        """Raise ``AssertionError`` unless the merged weights equal those in ``test_hf_dir`` (within tolerance)."""
        from safetensors.torch import load_file

        ref_dir = self.config.test_hf_dir
        files = sorted(f for f in os.listdir(ref_dir) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {ref_dir}")
        reference: dict[str, torch.Tensor] = {}
        for name in files:
            reference.update(load_file(os.path.join(ref_dir, name)))
        merged = self.merge_state_dict()
        missing = sorted(set(reference) - set(merged))
        if missing:
            raise AssertionError(f"merged checkpoint lacks {len(missing)} tensors of {ref_dir}: {missing[:8]}")
        for name, ref in reference.items():
            got = merged[name]
            if got.shape != ref.shape:
                raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
            if not torch.allclose(got.float(), ref.float(), atol=atol, rtol=rtol):
                diff = (got.float() - ref.float()).abs().max().item()
                raise AssertionError(f"{name}: max abs difference {diff:.3g} from the reference")
