"""Samplers for the RL dataloader: seeded shuffle, sequential order, or a user's curriculum sampler.

A curriculum sampler subclasses :class:`AbstractCurriculumSampler`; the trainer calls its ``update(batch)`` after
every step with the batch it trained on (rewards included), so the sampler can reorder what comes next. It is
selected with ``data.sampler.class_path`` (a ``.py`` file, a dotted module, or ``pkg://dotted.module``) and
``data.sampler.class_name``, and built as ``cls(data_source=dataset, data_config=data_config)``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from abc import abstractmethod
from typing import Any, Sized

import torch
from torch.utils.data import RandomSampler, Sampler, SequentialSampler


class AbstractSampler(Sampler[int]):
    """Base of samplers that ``data.sampler.class_path/class_name`` can name."""

    @abstractmethod
    def __init__(self, data_source: Sized, data_config: Any) -> None:
        pass


class AbstractCurriculumSampler(AbstractSampler):
    """A sampler whose order depends on training progress; the trainer calls :meth:`update` after each step."""

    @abstractmethod
    def update(self, batch: Any) -> None:
        """Called with the step's ``DataProto`` (prompts, responses, rewards) after the policy update."""


def load_object(path: str, name: str | None, path_key: str, name_key: str) -> Any:
    """``name`` from a python file, a dotted module, or ``pkg://dotted.module``.

    ``path_key`` / ``name_key`` are the config keys the values came from, so errors say what to change.
    """
    if not name:
        raise ValueError(f"{path_key} is set to {path!r} but {name_key} is empty; name the class to load.")
    if path.startswith("pkg://"):
        module = importlib.import_module(path[len("pkg://"):])
    elif path.endswith(".py") or os.path.sep in path:
        file = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path_key}: python file {file!r} not found.")
        module_name = "verl_ext_" + hashlib.sha1(file.encode()).hexdigest()[:12]
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # so classes defined there can be pickled by reference
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
    else:
        try:
            module = importlib.import_module(path)
        except ImportError as e:
            raise ImportError(f"{path_key} {path!r} is neither a python file nor an importable module: {e}") from e
    if not hasattr(module, name):
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise AttributeError(f"{name_key} {name!r} not found in {path!r}; it defines: {public}")
    return getattr(module, name)


def create_rl_sampler(data_config: Any, data_source: Sized) -> Sampler:
    """The sampler for the training dataloader, from ``data.sampler``, ``data.shuffle`` and ``data.seed``."""
    data_config = data_config if data_config is not None else {}
    sampler_cfg = data_config.get("sampler") or {}
    class_path = sampler_cfg.get("class_path")
    if class_path:
        cls = load_object(class_path, sampler_cfg.get("class_name"), "data.sampler.class_path",
                          "data.sampler.class_name")
        if not (isinstance(cls, type) and issubclass(cls, AbstractSampler)):
            raise TypeError(f"data.sampler.class_name {sampler_cfg.get('class_name')!r} from {class_path!r} must "
                            f"subclass verl.utils.dataset.sampler.AbstractSampler (or AbstractCurriculumSampler).")
        if issubclass(cls, AbstractCurriculumSampler):
            workers = data_config.get("dataloader_num_workers", 0)
            if workers:
                raise ValueError(f"a curriculum sampler changes the order while training, but "
                                 f"data.dataloader_num_workers={workers} would prefetch with a stale order; "
                                 f"set data.dataloader_num_workers=0.")
        return cls(data_source=data_source, data_config=data_config)
    if data_config.get("shuffle", True):
        seed = data_config.get("seed")
        generator = torch.Generator()
        generator.manual_seed(int(seed) if seed is not None else 1)
        return RandomSampler(data_source=data_source, generator=generator)
    return SequentialSampler(data_source=data_source)
