"""Starting or joining Ray for the single controller."""
from __future__ import annotations

import logging
import os
from typing import Any

import ray

__all__ = ["init_ray", "local_ray_init_kwargs"]

logger = logging.getLogger(__name__)

#: Ray internals that only cost time on small machines: idle Python workers started ahead of need. Worker-group
#: actors get their own processes (their environment differs per rank), so prestarted ones are never used by them.
_LOCAL_SYSTEM_CONFIG = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


def local_ray_init_kwargs(num_cpus: int | None = None, **overrides: Any) -> dict[str, Any]:
    """``ray.init`` keywords for a private single-machine Ray: no dashboard, addresses on 127.0.0.1, no prestarted
    workers, and at least 4 logical CPUs so a few tiny workers fit even on a 2-core box."""
    if num_cpus is None:
        num_cpus = max(os.cpu_count() or 1, 4)
    kwargs: dict[str, Any] = {
        "address": "local",
        "num_cpus": num_cpus,
        "include_dashboard": False,
        "_node_ip_address": "127.0.0.1",
        "_system_config": dict(_LOCAL_SYSTEM_CONFIG),
    }
    kwargs.update(overrides)
    return kwargs


def init_ray(num_cpus: int | None = None, address: str | None = None, **kwargs: Any) -> Any:
    """Join the Ray cluster at ``address`` (or ``$RAY_ADDRESS``), or start a private local one when neither is given.

    Does nothing when Ray is already initialised in this process. Extra keywords go to ``ray.init`` (e.g.
    ``runtime_env``, ``namespace``, ``num_gpus`` for a local start).

    Returns the ``ray.init`` context (``None`` when Ray was already running).
    """
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        if num_cpus is not None:
            logger.warning("init_ray: ignoring num_cpus=%s, which cannot be set when joining the cluster at %s",
                           num_cpus, address)
        for key in ("num_gpus", "resources", "object_store_memory", "include_dashboard", "_system_config",
                    "_node_ip_address"):
            kwargs.pop(key, None)
        logger.info("init_ray: joining the Ray cluster at %s", address)
        return ray.init(address=address, **kwargs)
    settings = local_ray_init_kwargs(num_cpus, **kwargs)
    logger.info("init_ray: starting a local Ray with %s logical CPUs", settings["num_cpus"])
    return ray.init(**settings)
