"""Merge the per-rank shards of an FSDP checkpoint into full tensors.

Each ``model_world_size_{W}_rank_{R}.pt`` holds that rank's local shard of every parameter; ``fsdp_config.json``
records, per parameter, the device mesh (which rank sits at which mesh coordinate), the placement along each mesh
dimension (``S(d)``: split along tensor dim ``d``; ``R``: replicated) and the global shape. A full tensor is the
concatenation, in mesh order, of the shards along each split dimension (FSDP2 chunks dim 0 like ``torch.chunk``, so
trailing ranks may hold fewer rows or none). Checkpoints whose shard files hold pickled DTensors (written by other
verl versions) are merged from the placements stored in the DTensors themselves.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Optional

import torch

from verl.model_merger.base_model_merger import BaseModelMerger

__all__ = ["FSDPModelMerger", "merge_shards", "load_fsdp_shards"]

_SHARD_RE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
_PLACEMENT_RE = re.compile(r"^S\((\d+)\)$")


def _expected_files_message(local_dir: str) -> str:
    hint = ""
    roles = [d for d in ("actor", "critic") if os.path.isdir(os.path.join(local_dir, d))]
    if roles:
        hint = f"; this looks like a step directory, did you mean --local_dir {os.path.join(local_dir, roles[0])}?"
    return (f"{local_dir} is not an FSDP checkpoint directory: expected fsdp_config.json and "
            "model_world_size_<W>_rank_<R>.pt for every rank R < W (plus huggingface/config.json), as written by "
            f"FSDPCheckpointManager under <default_local_dir>/global_step_N/actor{hint}")


def merge_shards(shards: list[torch.Tensor], mesh_ranks: Any, placements: list[str], name: str = "") -> torch.Tensor:
    """Full tensor from per-rank local shards (``shards[r]`` is rank r's), the mesh as a nested list of ranks and
    one placement string per mesh dimension."""

    def build(sub_mesh: Any, dim: int) -> torch.Tensor:
        if not isinstance(sub_mesh, list):
            return shards[sub_mesh]
        placement = placements[dim]
        if placement == "R":
            return build(sub_mesh[0], dim + 1)
        match = _PLACEMENT_RE.match(placement)
        if not match:
            raise ValueError(f"{name}: unsupported placement {placement!r} (only S(d) and R)")
        return torch.cat([build(child, dim + 1) for child in sub_mesh], dim=int(match.group(1)))

    depth, probe = 0, mesh_ranks
    while isinstance(probe, list):
        depth, probe = depth + 1, probe[0]
    if depth != len(placements):
        raise ValueError(f"{name}: mesh has {depth} dimensions but {len(placements)} placements were recorded")
    return build(mesh_ranks, 0)


def load_fsdp_shards(local_dir: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(fsdp_config.json content or {}, [rank 0's shard dict, rank 1's, ...])``; clear errors for a wrong or
    incomplete directory."""
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"checkpoint directory {local_dir} does not exist")
    meta: dict[str, Any] = {}
    meta_path = os.path.join(local_dir, "fsdp_config.json")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    found = {}
    for path in glob.glob(os.path.join(glob.escape(local_dir), "model_world_size_*_rank_*.pt")):
        match = _SHARD_RE.match(os.path.basename(path))
        if match:
            found.setdefault(int(match.group(1)), {})[int(match.group(2))] = path
    if "world_size" in meta:
        world = int(meta["world_size"])
    elif len(found) == 1:
        world = next(iter(found))
    else:
        raise FileNotFoundError(
            _expected_files_message(local_dir) +
            ("" if not found else f" (found shards of several world sizes {sorted(found)})"))
    if meta and "model" not in meta.get("contents", ["model"]):
        raise FileNotFoundError(f"checkpoint {local_dir} was saved without model weights (save_contents="
                                f"{meta['contents']}); save with 'model' in actor.checkpoint.save_contents")
    paths = found.get(world, {})
    missing = [f"model_world_size_{world}_rank_{r}.pt" for r in range(world) if r not in paths]
    if missing:
        raise FileNotFoundError(f"checkpoint {local_dir} (world size {world}) lacks {missing[:8]}"
                                f"{' ...' if len(missing) > 8 else ''}; " + _expected_files_message(local_dir))
    shards = []
    for rank in range(world):
        try:
            shards.append(torch.load(paths[rank], map_location="cpu", weights_only=True, mmap=True))
        except Exception:  # noqa: BLE001 - pickled DTensors of other verl versions need full unpickling
            shards.append(torch.load(paths[rank], map_location="cpu", weights_only=False))
    return meta, shards


def _merge_all(meta: dict[str, Any], shards: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    from verl.utils.checkpoint.fsdp_checkpoint_manager import placement_to_str

    params = meta.get("params") or {}
    meshes = meta.get("meshes") or []
    merged: dict[str, torch.Tensor] = {}
    for name, first in shards[0].items():
        info = params.get(name)
        if isinstance(first, DTensor):
            locals_ = [shard[name].to_local() for shard in shards]
            full = merge_shards(locals_, first.device_mesh.mesh.tolist(),
                                [placement_to_str(p) for p in first.placements], name)
            expected = list(first.shape)
        elif info is not None and "placements" in info:
            full = merge_shards([shard[name] for shard in shards], meshes[info["mesh"]]["ranks"], info["placements"],
                                name)
            expected = info["shape"]
        else:  # replicated plain tensor
            full = first
            expected = list(first.shape) if info is None else info["shape"]
        if list(full.shape) != list(expected):
            raise ValueError(f"merged {name!r} has shape {list(full.shape)}, the checkpoint records {expected}; the "
                             "shard files do not belong together")
        merged[name] = full.contiguous()
    return merged


class FSDPModelMerger(BaseModelMerger):
    """``python -m verl.model_merger merge --backend fsdp --local_dir .../actor --target_dir OUT``."""

    backend = "fsdp"

    def merge_state_dict(self) -> dict[str, torch.Tensor]:
        meta, shards = load_fsdp_shards(self.config.local_dir)
        return _merge_all(meta, shards)


def merge_fsdp_checkpoint(local_dir: str, target_dir: str, hf_model_config_path: Optional[str] = None) -> str:
    """Python entry point of the merge: write ``target_dir`` and return it."""
    return FSDPModelMerger.merge_checkpoint(local_dir, target_dir, hf_model_config_path)
