"""Backend-independent checkpoint plumbing: what to save, where the latest checkpoint is, and atomic writes.

Layout written by the trainer (see ARCHITECTURE.md, "Checkpoints")::

    <default_local_dir>/
        latest_checkpointed_iteration.txt      # "N": written last, atomically (temp file + os.replace)
        global_step_N/
            actor/                             # one checkpoint manager's directory, published by a rename
            critic/
            data.pt

Why the tracker is the authority: a step directory can be incomplete (the actor was saved, the process died before
the critic), but the tracker only moves once everything of a step is on disk, and each manager's directory only
appears under its final name once all of its files are written (they go to ``<dir>.tmp-<id>`` first). So
:func:`find_latest_ckpt_path` never returns a half-written checkpoint.
"""
from __future__ import annotations

import glob
import os
import random
import re
import shutil
import tempfile
import time
import uuid
import warnings
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from verl.utils.device import get_torch_device, is_cuda_available

__all__ = [
    "CHECKPOINT_CONTENTS",
    "TRACKER_FILENAME",
    "BaseCheckpointManager",
    "CheckpointSaveError",
    "atomic_torch_save",
    "atomic_write_text",
    "find_latest_ckpt_path",
    "get_checkpoint_tracker_filename",
    "read_latest_checkpointed_iteration",
    "should_save_ckpt_esi",
    "write_latest_checkpointed_iteration",
]

CHECKPOINT_CONTENTS = ("model", "optimizer", "extra", "hf_model")
DEFAULT_CONTENTS = ("model", "optimizer", "extra")
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
TMP_MARKER = ".tmp-"
_STEP_DIR_RE = re.compile(r"^global_step_(\d+)$")


class CheckpointSaveError(RuntimeError):
    """A save failed on at least one rank; nothing was published and the previous checkpoint is intact."""


# ------------------------------------------------------------------------------------------ atomic files -------
def _fsync_dir(path: str) -> None:
    """Make a rename durable (best effort: not every filesystem allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the new content, never a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + TMP_MARKER)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` through a temp file + ``os.replace`` (e.g. the trainer's ``data.pt``)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + TMP_MARKER)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ------------------------------------------------------------------------------------------------ tracker -------
def get_checkpoint_tracker_filename(root_path: str) -> str:
    """Path of the file that names the latest complete step under ``root_path`` (``trainer.default_local_dir``)."""
    return os.path.join(root_path, TRACKER_FILENAME)


def read_latest_checkpointed_iteration(root_path: str) -> Optional[int]:
    """The step recorded in the tracker file, or None when there is no tracker."""
    tracker = get_checkpoint_tracker_filename(root_path)
    if not os.path.isfile(tracker):
        return None
    with open(tracker, encoding="utf-8") as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"checkpoint tracker {tracker} should hold one integer step, found {text[:50]!r}; fix or "
                         "delete the file (then resume picks no checkpoint) or use "
                         "trainer.resume_mode=resume_path with trainer.resume_from_path") from None


def write_latest_checkpointed_iteration(root_path: str, step: int) -> None:
    """Record ``step`` as the latest complete checkpoint, atomically. Call it only after every part of the step
    (actor, critic, dataloader state) has been saved."""
    atomic_write_text(get_checkpoint_tracker_filename(root_path), f"{int(step)}\n")


def find_latest_ckpt_path(path: Optional[str], directory_format: str = "global_step_{}") -> Optional[str]:
    """The directory of the latest complete checkpoint under ``path`` (read from the tracker file), or None when
    there is none yet (no tracker, or the directory it names is gone)."""
    if path is None:
        return None
    step = read_latest_checkpointed_iteration(path)
    if step is None:
        print(f"[verl] no checkpoint tracker file {get_checkpoint_tracker_filename(path)}; starting from scratch")
        return None
    ckpt_path = os.path.join(path, directory_format.format(step))
    if not os.path.isdir(ckpt_path):
        warnings.warn(
            f"checkpoint tracker under {path} names step {step}, but {ckpt_path} does not exist; "
            "starting from scratch",
            stacklevel=2)
        return None
    return ckpt_path


def should_save_ckpt_esi(max_steps_duration: float, save_ckpt_duration: float = 60, redundant_time: float = 0) -> bool:
    """True when the job's capacity block expires before one more step plus a save would finish.

    The expiry (unix seconds) comes from ``MLP_CURRENT_CAPACITY_BLOCK_EXPIRATION_TIMESTAMP`` (Volcano ML platform)
    or ``SAGEMAKER_CURRENT_CAPACITY_BLOCK_EXPIRATION_TIMESTAMP`` (AWS); without either, False.
    """
    for key in ("MLP_CURRENT_CAPACITY_BLOCK_EXPIRATION_TIMESTAMP",
                "SAGEMAKER_CURRENT_CAPACITY_BLOCK_EXPIRATION_TIMESTAMP"):
        value = os.environ.get(key)
        if not value:
            continue
        try:
            expires_at = float(value)
        except ValueError:
            raise ValueError(f"environment variable {key}={value!r} should be a unix timestamp in seconds") from None
        remaining = expires_at - time.time()
        if remaining <= 0 or max_steps_duration <= 0:
            return False
        return remaining <= max_steps_duration + save_ckpt_duration + redundant_time
    return False


# ------------------------------------------------------------------------------------------ distributed -------
def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one item without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_if_any_failed(errors: list[Optional[str]], what: str, exc_type: type = CheckpointSaveError) -> None:
    failed = [(rank, err) for rank, err in enumerate(errors) if err]
    if failed:
        detail = "; ".join(f"rank {rank}: {err}" for rank, err in failed)
        raise exc_type(f"{what} failed on {len(failed)} rank(s): {detail}")


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    getter = getattr(cfg, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except Exception:  # noqa: BLE001 - dataclass-like objects without a dict-style get
            pass
    return getattr(cfg, key, default)


def _normalize_contents(contents: Any, key: str) -> list[str]:
    if contents is None:
        return list(DEFAULT_CONTENTS)
    if isinstance(contents, str):
        contents = [contents]
    contents = [str(c) for c in contents]
    unknown = [c for c in contents if c not in CHECKPOINT_CONTENTS]
    if unknown:
        raise ValueError(f"checkpoint.{key} has unknown entries {unknown}; allowed: {list(CHECKPOINT_CONTENTS)}")
    return contents


class BaseCheckpointManager:
    """What every backend's checkpoint manager shares: the content lists, RNG capture, atomic publication of a
    checkpoint directory and retention of the newest ``max_ckpt_to_keep`` checkpoints.

    ``checkpoint_config`` is the ``actor.checkpoint`` / ``critic.checkpoint`` config: ``save_contents`` and
    ``load_contents`` (subsets of ``model``, ``optimizer``, ``extra``, ``hf_model``; ``load_contents`` defaults to
    ``save_contents``) and ``async_save`` (not supported by the FSDP backend). The older keyword
    ``checkpoint_contents`` sets both lists.
    """

    def __init__(self,
                 model: Any,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 lr_scheduler: Any = None,
                 processing_class: Any = None,
                 checkpoint_config: Any = None,
                 checkpoint_contents: Optional[Iterable[str]] = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.processing_class = processing_class
        self.checkpoint_config = checkpoint_config
        if checkpoint_contents is not None:
            save = _normalize_contents(checkpoint_contents, "checkpoint_contents")
            load = list(save)
        else:
            save = _normalize_contents(_cfg_get(checkpoint_config, "save_contents"), "save_contents")
            raw_load = _cfg_get(checkpoint_config, "load_contents")
            load = _normalize_contents(raw_load, "load_contents") if raw_load is not None else list(save)
        self.checkpoint_save_contents = save
        self.checkpoint_load_contents = load
        if bool(_cfg_get(checkpoint_config, "async_save", False)):
            raise ValueError("checkpoint.async_save=True is not supported by the FSDP checkpoint manager; set "
                             "actor_rollout_ref.actor.checkpoint.async_save=False (and critic.checkpoint.async_save)")
        self.previous_saved_paths: list[str] = []
        self._discovered_series: set[tuple[str, str]] = set()

    @property
    def rank(self) -> int:
        """This process's rank (0 without a process group), read at use: the group may start after construction."""
        return _rank_and_world()[0]

    @property
    def world_size(self) -> int:
        return _rank_and_world()[1]

    # content switches, named as upstream ---------------------------------------------------------------------
    @property
    def should_save_model(self) -> bool:
        return "model" in self.checkpoint_save_contents

    @property
    def should_save_optimizer(self) -> bool:
        return "optimizer" in self.checkpoint_save_contents

    @property
    def should_save_extra(self) -> bool:
        return "extra" in self.checkpoint_save_contents

    @property
    def should_save_hf_model(self) -> bool:
        return "hf_model" in self.checkpoint_save_contents

    @property
    def should_load_model(self) -> bool:
        return "model" in self.checkpoint_load_contents

    @property
    def should_load_optimizer(self) -> bool:
        return "optimizer" in self.checkpoint_load_contents

    @property
    def should_load_extra(self) -> bool:
        return "extra" in self.checkpoint_load_contents

    # interface ---------------------------------------------------------------------------------------------------
    def save_checkpoint(self,
                        local_path: str,
                        hdfs_path: Optional[str] = None,
                        global_step: int = 0,
                        max_ckpt_to_keep: Optional[int] = None) -> None:
        raise NotImplementedError

    def load_checkpoint(self,
                        local_path: Optional[str],
                        hdfs_path: Optional[str] = None,
                        del_local_after_load: bool = False) -> None:
        raise NotImplementedError

    # RNG ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def get_rng_state() -> dict[str, Any]:
        """Python, numpy, torch CPU and accelerator RNG states, as plain containers (loadable with weights_only)."""
        np_state = np.random.get_state()
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
            "cpu": torch.get_rng_state(),
        }
        if is_cuda_available():
            state["device"] = get_torch_device().get_rng_state()
        return state

    @staticmethod
    def load_rng_state(state: dict[str, Any]) -> None:
        """Restore what :meth:`get_rng_state` captured."""
        random.setstate(_as_python_rng_state(state["python"]))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["cpu"])
        if "device" in state and is_cuda_available():
            get_torch_device().set_rng_state(state["device"])

    @staticmethod
    def local_mkdir(path: str) -> str:
        """Create ``path`` (and parents) if needed; return its absolute form."""
        path = os.path.abspath(os.path.expanduser(path))
        os.makedirs(path, exist_ok=True)
        return path

    # atomic publication --------------------------------------------------------------------------------------
    def _make_tmp_dir(self, local_path: str) -> str:
        """A fresh ``<local_path>.tmp-<id>`` with the same id on every rank (rank 0 picks it), created on every rank
        so node-local filesystems work too. Stale temp dirs of earlier crashed saves of this path are removed."""
        tag = _broadcast_object(uuid.uuid4().hex[:12] if self.rank == 0 else None)
        tmp = f"{local_path}{TMP_MARKER}{tag}"
        if self.rank == 0:
            for stale in glob.glob(glob.escape(local_path) + TMP_MARKER + "*"):
                if stale != tmp:
                    shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        os.makedirs(tmp, exist_ok=True)
        return tmp

    def _publish(self, tmp: str, local_path: str) -> None:
        """Rename the finished temp dir to ``local_path`` (replacing an older checkpoint of the same path).

        Rank 0 renames on a shared filesystem; on node-local disks each node's first rank does it afterwards.
        """
        if self.rank == 0:
            _replace_dir(tmp, local_path)
        _barrier()
        if self.rank != 0 and os.path.isdir(tmp):  # not shared with rank 0: this node publishes its own copy
            try:
                _replace_dir(tmp, local_path)
            except FileNotFoundError:  # another rank of this node was faster
                pass
        _barrier()

    def _discard_tmp(self, tmp: str) -> None:
        _barrier()
        shutil.rmtree(tmp, ignore_errors=True)

    # retention -----------------------------------------------------------------------------------------------
    def _prune(self, local_path: str, max_ckpt_to_keep: Optional[int]) -> None:
        """Rank 0: keep the newest ``max_ckpt_to_keep`` checkpoints of this manager (None or <= 0 keeps all).

        Only checkpoints of the same series count: ``<root>/global_step_*/<name>`` for the same root and name (those
        already on disk too, so a resumed run prunes what the earlier run left), else the same parent directory.
        The checkpoint the tracker names is never removed: if the process dies before the tracker moves to the new
        step, resume still finds the previous one.
        """
        group = _series_of(local_path)
        if group not in self._discovered_series:
            self._discovered_series.add(group)
            self.previous_saved_paths.extend(
                p for p in _sibling_checkpoints(local_path) if p not in self.previous_saved_paths and p != local_path)
        if local_path in self.previous_saved_paths:
            self.previous_saved_paths.remove(local_path)
        self.previous_saved_paths.append(local_path)
        if self.rank != 0 or not max_ckpt_to_keep or max_ckpt_to_keep <= 0:
            return
        protected = _tracker_protected_path(local_path)
        series = [p for p in self.previous_saved_paths if _series_of(p) == group]
        while len(series) > max_ckpt_to_keep:
            candidates = [p for p in series[:-1] if p != protected]
            if not candidates:
                break
            victim = candidates[0]
            series.remove(victim)
            self.previous_saved_paths.remove(victim)
            shutil.rmtree(victim, ignore_errors=True)
            parent = os.path.dirname(victim)
            if _STEP_DIR_RE.match(os.path.basename(parent)) and os.path.isdir(parent) and not any(
                    os.path.isdir(os.path.join(parent, e)) for e in os.listdir(parent)):
                # nothing of this step is left but loose files (data.pt): drop the step directory too
                shutil.rmtree(parent, ignore_errors=True)


def _series_of(path: str) -> tuple[str, str]:
    """Checkpoints that retention compares: (root, name) in the global_step layout, else (parent dir, "")."""
    if _step_of(path) is not None:
        return os.path.dirname(os.path.dirname(path)), os.path.basename(path)
    return os.path.dirname(path), ""


def _as_python_rng_state(state: Any) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _replace_dir(src: str, dst: str) -> None:
    """``os.replace`` for directories: a non-empty ``dst`` is first moved aside, then removed."""
    aside = None
    if os.path.lexists(dst):
        aside = f"{dst}.old-{uuid.uuid4().hex[:12]}"
        os.replace(dst, aside)
    os.replace(src, dst)
    _fsync_dir(os.path.dirname(dst) or ".")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _step_of(path: str) -> Optional[int]:
    match = _STEP_DIR_RE.match(os.path.basename(os.path.dirname(path)))
    return int(match.group(1)) if match else None


def _sibling_checkpoints(local_path: str) -> list[str]:
    """``<root>/global_step_*/<name>`` directories that exist, oldest first (empty outside that layout)."""
    if _step_of(local_path) is None:
        return []
    root = os.path.dirname(os.path.dirname(local_path))
    name = os.path.basename(local_path)
    found = []
    for candidate in glob.glob(os.path.join(glob.escape(root), "global_step_*", glob.escape(name))):
        step = _step_of(candidate)
        if step is not None and os.path.isdir(candidate):
            found.append((step, candidate))
    return [p for _, p in sorted(found)]


def _tracker_protected_path(local_path: str) -> Optional[str]:
    """The same manager's directory in the step the tracker names (None outside the global_step layout)."""
    if _step_of(local_path) is None:
        return None
    root = os.path.dirname(os.path.dirname(local_path))
    try:
        step = read_latest_checkpointed_iteration(root)
    except ValueError:
        return None
    if step is None:
        return None
    return os.path.join(root, f"global_step_{step}", os.path.basename(local_path))
