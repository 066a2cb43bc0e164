"""Loading a user's reward function from a file: ``custom_reward_function.{path, name, reward_kwargs}``.

The file is executed as a module registered in ``sys.modules`` under a name derived from its path, so the
function can be pickled by reference in forked reward worker processes and objects defined in the file
(dataclasses, pickled state) behave as in any module.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Mapping
from typing import Any, Callable

__all__ = [
    "get_custom_reward_fn", "load_extern_object", "load_module_from_path", "CustomRewardFunctionError", "cfg_get"
]

DEFAULT_FUNCTION_NAME = "compute_score"
_PKG_PREFIX = "pkg://"


class CustomRewardFunctionError(ImportError):
    """The configured custom reward file cannot be used (missing, fails to import, lacks the function)."""


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` for dicts, DictConfigs and attribute objects alike; ``default`` when absent or None."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        try:
            value = cfg.get(key, default)
        except Exception:  # a structured config without the key
            value = default
        return default if value is None else value
    return getattr(cfg, key, default)


def _to_plain_dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping of keyword arguments, got {type(value).__name__}: {value!r}")
    return dict(value)


def load_module_from_path(path: str, what: str = "custom_reward_function.path") -> Any:
    """Execute a Python file as a module (or import ``pkg://dotted.module``) and return it.

    Errors name the configuration key ``what`` and the resolved path.
    """
    if path.startswith(_PKG_PREFIX):
        module_name = path[len(_PKG_PREFIX):]
        try:
            return importlib.import_module(module_name)
        except Exception as exc:
            raise CustomRewardFunctionError(f"{what}={path!r}: importing module {module_name!r} failed with "
                                            f"{type(exc).__name__}: {exc}") from exc
    resolved = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(resolved):
        raise FileNotFoundError(f"{what}={path!r}: no such file (resolved to {resolved!r}). Point it at the Python "
                                f"file that defines your reward function, or unset it to use the built-in scorers.")
    if os.path.isdir(resolved):
        raise CustomRewardFunctionError(f"{what}={path!r} is a directory; it must name a Python file.")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(resolved))[0])
    digest = hashlib.sha1(resolved.encode()).hexdigest()[:10]
    module_name = f"verl_custom_module_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise CustomRewardFunctionError(f"{what}={path!r}: cannot load {resolved!r} as a Python module (is it a .py "
                                        f"file?).")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(module_name)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        if previous is not None:
            sys.modules[module_name] = previous
        else:
            sys.modules.pop(module_name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]).rstrip()
        raise CustomRewardFunctionError(f"{what}={path!r}: importing {resolved!r} failed with "
                                        f"{type(exc).__name__}: {exc}\n{tb}") from exc
    return module


def load_extern_object(module_path: str, object_name: str, what: str = "custom_reward_function") -> Any:
    """``object_name`` from a Python file (or ``pkg://module``); errors list what the file does define."""
    module = load_module_from_path(module_path, what=f"{what}.path")
    if not hasattr(module, object_name):
        defined = sorted(n for n, v in vars(module).items()
                         if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__)
        raise AttributeError(f"{what}.name={object_name!r} is not defined in {module_path!r}. Functions and classes "
                             f"defined there: {defined or 'none'}. Set {what}.name to one of them.")
    return getattr(module, object_name)


def get_custom_reward_fn(config: Any) -> Callable[..., Any] | None:
    """The user's reward function from ``config.custom_reward_function``, or None when no path is set.

    ``reward_kwargs`` are bound with :func:`functools.partial` (which stays picklable for process pools).
    """
    section = cfg_get(config, "custom_reward_function")
    path = cfg_get(section, "path")
    if not path:
        return None
    if not isinstance(path, str):
        raise TypeError(f"custom_reward_function.path must be a string, got {type(path).__name__}: {path!r}")
    name = cfg_get(section, "name") or DEFAULT_FUNCTION_NAME
    fn = load_extern_object(path, name)
    if not callable(fn):
        raise TypeError(f"custom_reward_function.name={name!r} in {path!r} is a {type(fn).__name__}, not a function.")
    reward_kwargs = _to_plain_dict(cfg_get(section, "reward_kwargs"), "custom_reward_function.reward_kwargs")
    if reward_kwargs:
        return functools.partial(fn, **reward_kwargs)
    return fn
