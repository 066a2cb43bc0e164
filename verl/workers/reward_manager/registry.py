"""Reward manager registry: ``reward_model.reward_manager=<name>`` picks a class registered with ``@register``."""
from __future__ import annotations

from typing import Callable, TypeVar

__all__ = ["register", "get_reward_manager_cls", "REWARD_MANAGER_REGISTRY"]

REWARD_MANAGER_REGISTRY: dict[str, type] = {}

_T = TypeVar("_T", bound=type)


def register(name: str) -> Callable[[_T], _T]:
    """Class decorator: make a reward manager selectable as ``reward_model.reward_manager=name``.

    Registering a different class under a taken name is an error (two plugins would silently shadow each other);
    re-registering the same class (a module imported twice) is allowed.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward manager name must be a non-empty string, got {name!r}")

    def decorator(cls: _T) -> _T:
        existing = REWARD_MANAGER_REGISTRY.get(name)
        if existing is not None and existing is not cls and (existing.__module__,
                                                             existing.__qualname__) != (cls.__module__,
                                                                                        cls.__qualname__):
            raise ValueError(f"reward manager {name!r} is already registered to {existing.__module__}."
                             f"{existing.__qualname__}; pick another name for {cls.__module__}.{cls.__qualname__}.")
        REWARD_MANAGER_REGISTRY[name] = cls
        return cls

    return decorator


def get_reward_manager_cls(name: str) -> type:
    """The class registered as ``name``; the error lists the registered names."""
    if name not in REWARD_MANAGER_REGISTRY:
        raise ValueError(f"Unknown reward manager {name!r} (reward_model.reward_manager). Registered: "
                         f"{sorted(REWARD_MANAGER_REGISTRY)}. A custom one must be decorated with "
                         f"@verl.workers.reward_manager.register({name!r}) in a module imported before the trainer "
                         f"starts (e.g. listed in VERL_USE_EXTERNAL_MODULES).")
    return REWARD_MANAGER_REGISTRY[name]
