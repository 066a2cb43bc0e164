"""The Ray backend of the single controller: resource pools as placement groups, workers as Ray actors.

* :class:`RayResourcePool` reserves one placement group per node (one bundle per worker process: a CPU slot, plus a
  GPU on GPU clusters), sorted by node IP so ranks stay stable across restarts.
* :class:`RayClassWithInitArgs` is a worker class with its constructor arguments and Ray options.
* :class:`RayWorkerGroup` starts one actor per bundle with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
  ``LOCAL_WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` in its environment and exposes the worker's ``@register``-ed
  methods. Failures come back as :class:`~verl.single_controller.base.worker_group.WorkerError` naming the rank.
* :func:`create_colocated_worker_cls` fuses several roles into one process (methods ``<role>_<method>``);
  :meth:`RayWorkerGroup.spawn` gives one worker group per role over the same actors.
"""
from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from verl.single_controller.base.decorator import MAGIC_ATTR, Dispatch
from verl.single_controller.base.worker import Worker, find_free_port
from verl.single_controller.base.worker_group import (
    ClassWithInitArgs,
    ResourcePool,
    WorkerGroup,
    make_worker_error,
)

__all__ = [
    "RayClassWithInitArgs",
    "RayResourcePool",
    "RayWorkerGroup",
    "create_colocated_worker_cls",
]

logger = logging.getLogger(__name__)

#: Environment variables the worker group sets for every worker; ``worker_env`` may not override them.
RESERVED_WORKER_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "RAY_LOCAL_WORLD_SIZE", "MASTER_ADDR",
                       "MASTER_PORT", "WG_PREFIX", "WG_BACKEND")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PLACEMENT_TIMEOUT_ENV = "VERL_PLACEMENT_GROUP_TIMEOUT"


def _random_prefix() -> str:
    return uuid.uuid4().hex[:8] + "_"


def _node_table() -> dict[str, dict]:
    return {n["NodeID"]: n for n in ray.nodes() if n.get("Alive", n.get("alive", True))}


def _format_resources(res: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(res.items()) if not k.startswith("node:")) or "none"


# ----------------------------------------------------------------------------------------------------------------------
# resource pool
# ----------------------------------------------------------------------------------------------------------------------


class RayResourcePool(ResourcePool):
    """Worker slots reserved as Ray placement groups: one group per entry of ``process_on_nodes``, packed on one node.

    Args:
        process_on_nodes: worker processes per node, e.g. ``[2]`` for 2 workers on one machine.
        use_gpu: reserve one GPU per slot; defaults to whether CUDA is usable here (``verl.utils.device``). On a
            cluster without any GPU it falls back to CPU slots (with a warning), so GPU recipes run on a laptop.
        name_prefix: prefix of the placement group names.
        max_colocate_count: how many worker groups may share one slot (each actor asks ``1/max_colocate_count`` of
            the slot's CPU and GPU).
        detached: keep the placement groups alive after the driver exits.
        accelerator_type: a Ray accelerator type the bundles must land on (e.g. ``"A100"``).
        num_cpus_per_bundle: logical CPUs per slot.
    """

    def __init__(self,
                 process_on_nodes: Sequence[int] | None = None,
                 use_gpu: bool | None = None,
                 name_prefix: str | None = None,
                 max_colocate_count: int = 10,
                 detached: bool = False,
                 accelerator_type: str | None = None,
                 num_cpus_per_bundle: float = 1.0) -> None:
        super().__init__(process_on_nodes, max_colocate_count)
        if use_gpu is None:
            from verl.utils.device import is_cuda_available

            use_gpu = is_cuda_available()
        if not num_cpus_per_bundle > 0:
            raise ValueError(f"num_cpus_per_bundle must be > 0, got {num_cpus_per_bundle!r}")
        self.use_gpu = bool(use_gpu)
        self.name_prefix = name_prefix if name_prefix is not None else _random_prefix()
        self.detached = detached
        self.accelerator_type = accelerator_type
        self.num_cpus_per_bundle = float(num_cpus_per_bundle)
        self.pgs: list[PlacementGroup] | None = None
        self._pg_counts: list[int] | None = None

    def bundle(self) -> dict[str, float]:
        """Resources of one worker slot."""
        from verl.utils.device import get_ray_resource_name

        spec: dict[str, float] = {"CPU": self.num_cpus_per_bundle}
        if self.use_gpu:
            name = get_ray_resource_name()
            spec[name if name != "CPU" else "GPU"] = 1
        if self.accelerator_type:
            spec[f"accelerator_type:{self.accelerator_type}"] = 1e-4
        return spec

    def _check_feasible(self, bundle: dict[str, float]) -> None:
        """Fail at once (instead of waiting forever) when the cluster can never hold these placement groups."""
        nodes = _node_table()
        totals: dict[str, float] = {}
        for node in nodes.values():
            for key, val in node.get("Resources", {}).items():
                totals[key] = totals.get(key, 0.0) + val
        for key, per in bundle.items():
            need = per * self.world_size
            if totals.get(key, 0.0) + 1e-9 < need:
                raise RuntimeError(f"RayResourcePool(process_on_nodes={self.store}) needs {need:g} {key} "
                                   f"({self.world_size} slots of {_format_resources(bundle)}) but the Ray cluster has "
                                   f"{totals.get(key, 0.0):g} in total ({_format_resources(totals)}). Start Ray with "
                                   "more resources (ray.init(num_cpus=...) / init_ray(num_cpus=...)), use fewer "
                                   "workers, or set use_gpu=False on a machine without GPUs")
        for idx, count in enumerate(self.store):
            fits = any(
                all(node.get("Resources", {}).get(k, 0.0) + 1e-9 >= v * count
                    for k, v in bundle.items())
                for node in nodes.values())
            if not fits:
                raise RuntimeError(f"RayResourcePool: node entry {idx} asks for {count} slots of "
                                   f"{_format_resources(bundle)} on one node, but no node of the cluster is that big. "
                                   "Split process_on_nodes over more nodes")

    def get_placement_groups(self,
                             strategy: str = "STRICT_PACK",
                             name: str | None = None,
                             device_name: str | None = None) -> list[PlacementGroup]:
        """Create (once) and return the placement groups, sorted by node IP."""
        if self.pgs is not None:
            return self.pgs
        if self.use_gpu and not any(n.get("Resources", {}).get("GPU", 0) for n in _node_table().values()):
            logger.warning("RayResourcePool(use_gpu=True): the Ray cluster has no GPUs; reserving CPU slots instead")
            self.use_gpu = False
        bundle = self.bundle()
        self._check_feasible(bundle)
        lifetime = "detached" if self.detached else None
        prefix = name or f"{self.name_prefix}verl_group_{'_'.join(map(str, self.store))}:"
        pgs = [
            placement_group(bundles=[dict(bundle) for _ in range(count)],
                            strategy=strategy,
                            name=f"{prefix}{idx}",
                            lifetime=lifetime) for idx, count in enumerate(self.store)
        ]
        timeout = float(os.environ.get(_PLACEMENT_TIMEOUT_ENV, "300"))
        deadline = time.monotonic() + timeout
        pending = [pg.ready() for pg in pgs]
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(10.0, timeout))
            if not pending:
                break
            if time.monotonic() >= deadline:
                for pg in pgs:
                    remove_placement_group(pg)
                raise RuntimeError(f"RayResourcePool(process_on_nodes={self.store}): the placement groups were not "
                                   f"ready after {timeout:g} s; free resources now: "
                                   f"{_format_resources(ray.available_resources())}. Other worker groups (or their "
                                   "pools: RayResourcePool.shutdown()) may hold them; free them, start Ray with more "
                                   f"resources, or raise {_PLACEMENT_TIMEOUT_ENV}")
            logger.warning(
                "RayResourcePool(process_on_nodes=%s): still waiting for %d slots of %s; free resources now: "
                "%s", self.store, self.world_size, _format_resources(bundle),
                _format_resources(ray.available_resources()))
        nodes = _node_table()

        def node_ip(pg: PlacementGroup) -> str:
            node_id = ray.util.placement_group_table(pg)["bundles_to_node_id"][0]
            return nodes.get(node_id, {}).get("NodeManagerAddress", "")

        order = sorted(range(len(pgs)), key=lambda i: node_ip(pgs[i]))  # stable: equal IPs keep their order
        self.pgs = [pgs[i] for i in order]
        self._pg_counts = [self.store[i] for i in order]
        return self.pgs

    def placement_groups_with_counts(self) -> list[tuple[PlacementGroup, int]]:
        """``(placement group, number of workers in it)`` in rank order."""
        pgs = self.get_placement_groups()
        return list(zip(pgs, self._pg_counts))

    def shutdown(self) -> None:
        """Release the placement groups (kill the worker groups that use them first)."""
        for pg in self.pgs or []:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.pgs = None
        self._pg_counts = None


# ----------------------------------------------------------------------------------------------------------------------
# class with init args
# ----------------------------------------------------------------------------------------------------------------------


def _is_actor_class(cls: Any) -> bool:
    return hasattr(cls, "__ray_actor_class__") and hasattr(cls, "options")


class RayClassWithInitArgs(ClassWithInitArgs):
    """A worker class (plain, or already wrapped by ``ray.remote``), its constructor arguments and Ray options."""

    def __init__(self, cls: type, *args: Any, **kwargs: Any) -> None:
        super().__init__(cls, *args, **kwargs)
        self._options: dict[str, Any] = {}
        self._additional_resource: dict[str, float] = {}
        self._remote_cls = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_remote_cls"] = None
        return state

    @property
    def user_cls(self) -> type:
        """The Python class the actors run (unwrapped from ``ray.remote``)."""
        return self.cls.__ray_actor_class__ if _is_actor_class(self.cls) else self.cls

    def set_additional_resource(self, additional_resource: dict[str, float]) -> None:
        """Extra Ray custom resources every actor asks for."""
        self._additional_resource = dict(additional_resource)

    def update_options(self, options: dict[str, Any]) -> None:
        """Extra ``actor.options(...)`` (e.g. ``runtime_env``, ``max_concurrency``)."""
        self._options.update(options)

    def _remote(self) -> Any:
        if self._remote_cls is None:
            self._remote_cls = self.cls if _is_actor_class(self.cls) else ray.remote(self.cls)
        return self._remote_cls

    def __call__(self,
                 placement_group: PlacementGroup,
                 placement_group_bundle_idx: int,
                 use_gpu: bool = True,
                 num_gpus: float = 1,
                 num_cpus: float | None = None,
                 env_vars: dict[str, str] | None = None,
                 name: str | None = None,
                 detached: bool = False) -> Any:
        """Start one actor in bundle ``placement_group_bundle_idx`` with ``env_vars`` in its environment."""
        options: dict[str, Any] = {
            "scheduling_strategy":
                PlacementGroupSchedulingStrategy(placement_group=placement_group,
                                                 placement_group_bundle_index=placement_group_bundle_idx)
        }
        if num_cpus is not None:
            options["num_cpus"] = num_cpus
        if use_gpu:
            options["num_gpus"] = num_gpus
        if self._additional_resource:
            options["resources"] = dict(self._additional_resource)
        user_options = dict(self._options)
        runtime_env = dict(user_options.pop("runtime_env", None) or {})
        env = dict(runtime_env.get("env_vars") or {})
        clash = sorted(set(env) & set(env_vars or {}) & set(RESERVED_WORKER_ENV))
        if clash:
            raise ValueError(f"runtime_env env_vars {clash} are set by the worker group for every rank; remove them "
                             "from the options")
        env.update(env_vars or {})
        if env:
            runtime_env["env_vars"] = env
        if runtime_env:
            options["runtime_env"] = runtime_env
        options.update(user_options)
        if name:
            options["name"] = name
        if detached:
            options["lifetime"] = "detached"
        return self._remote().options(**options).remote(*self.args, **self.kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# worker group
# ----------------------------------------------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
def _pick_master_port() -> int:
    return find_free_port()


def _is_primitive(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, bytes, ray.ObjectRef))


class RayWorkerGroup(WorkerGroup):
    """One Ray actor per slot of a :class:`RayResourcePool`, driven as one (see module docstring).

    Args:
        resource_pool: where to start the workers (``None`` with ``worker_names``/``worker_handles``: attach to
            existing actors).
        ray_cls_with_init: the worker class and its constructor arguments.
        bin_pack: accepted for compatibility (slots are always packed per node).
        name_prefix: prefix of the actor names (random by default).
        detached: keep the actors alive after the driver exits (attach later with :meth:`from_detached`).
        worker_names: names of existing actors to attach to.
        worker_handles: handles of existing actors to share (used by :meth:`spawn`).
        worker_env: extra environment variables for every worker (may not override the rank variables).
    """

    def __init__(self,
                 resource_pool: RayResourcePool | None = None,
                 ray_cls_with_init: RayClassWithInitArgs | None = None,
                 bin_pack: bool = True,
                 name_prefix: str | None = None,
                 detached: bool = False,
                 worker_names: Sequence[str] | None = None,
                 worker_handles: Sequence[Any] | None = None,
                 ray_wait_register_center_timeout: int = 300,
                 worker_env: dict[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(resource_pool=resource_pool, **kwargs)
        if ray_cls_with_init is None:
            raise ValueError("RayWorkerGroup needs ray_cls_with_init=RayClassWithInitArgs(WorkerClass, ...)")
        if not ray.is_initialized():
            raise RuntimeError("Ray is not running; call verl.single_controller.ray.init_ray() (or ray.init()) first")
        self.ray_cls_with_init = ray_cls_with_init
        self.name_prefix = name_prefix if name_prefix is not None else _random_prefix()
        self._detached = detached
        self.fused_worker_used = getattr(ray_cls_with_init, "fused_worker_used", False)
        self._cls_name = getattr(ray_cls_with_init.user_cls, "__name__", "Worker")
        self._role_prefix: str | None = None
        if worker_handles is not None:
            self._workers = list(worker_handles)
            self._worker_names = (list(worker_names) if worker_names is not None else
                                  [f"{self.name_prefix}{self._cls_name}_{i}" for i in range(len(self._workers))])
        elif resource_pool is None:
            if not worker_names:
                raise ValueError("RayWorkerGroup needs a resource_pool, or worker_names/worker_handles of existing "
                                 "actors to attach to")
            self._attach_by_names(list(worker_names))
        else:
            self._init_with_resource_pool(resource_pool, ray_cls_with_init, detached, worker_env or {})
        self._bind_worker_method(ray_cls_with_init.user_cls)

    # ------------------------------------------------------------------------------------------- creation --------
    @classmethod
    def from_detached(cls,
                      name_prefix: str | None = None,
                      worker_names: Sequence[str] | None = None,
                      worker_handles: Sequence[Any] | None = None,
                      ray_cls_with_init: RayClassWithInitArgs | None = None,
                      **kwargs: Any) -> RayWorkerGroup:
        """A group over existing (e.g. detached) actors, found by name or given as handles."""
        return cls(resource_pool=None,
                   ray_cls_with_init=ray_cls_with_init,
                   name_prefix=name_prefix,
                   worker_names=worker_names,
                   worker_handles=worker_handles,
                   **kwargs)

    def _attach_by_names(self, names: list[str]) -> None:
        workers = []
        for name in names:
            try:
                workers.append(ray.get_actor(name))
            except ValueError as exc:
                raise ValueError(f"no Ray actor named {name!r} in this namespace ({exc}); detached worker groups are "
                                 "found by the names in `worker_names` of the group that created them") from None
        self._workers, self._worker_names = workers, names

    def _choose_master(self, pgs: list[PlacementGroup]) -> tuple[str, str]:
        """``MASTER_ADDR``/``MASTER_PORT`` for rank 0: loopback when every worker is on one node."""
        table = [ray.util.placement_group_table(pg)["bundles_to_node_id"] for pg in pgs]
        node_ids = {node for t in table for node in t.values()}
        rank0_node = table[0][0]
        if rank0_node == ray.get_runtime_context().get_node_id():
            port = find_free_port()
        else:
            port = ray.get(
                _pick_master_port.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=rank0_node, soft=False)).remote())
        if len(node_ids) == 1:
            addr = "127.0.0.1"
        else:
            addr = _node_table()[rank0_node]["NodeManagerAddress"]
        return addr, str(port)

    def _init_with_resource_pool(self, resource_pool: RayResourcePool, ray_cls_with_init: RayClassWithInitArgs,
                                 detached: bool, worker_env: dict[str, str]) -> None:
        clash = sorted(set(worker_env) & set(RESERVED_WORKER_ENV))
        if clash:
            raise ValueError(f"worker_env may not set {clash}: the worker group sets them for every rank")
        pairs = resource_pool.placement_groups_with_counts()
        world_size = sum(count for _, count in pairs)
        self._master_addr, self._master_port = self._choose_master([pg for pg, _ in pairs])
        colocate = resource_pool.max_colocate_count
        num_cpus = resource_pool.num_cpus_per_bundle / colocate
        num_gpus = 1 / colocate
        rank = 0
        for pg_idx, (pg, count) in enumerate(pairs):
            for local_rank in range(count):
                env = {str(k): str(v) for k, v in worker_env.items()}
                env.update({
                    "WORLD_SIZE": str(world_size),
                    "RANK": str(rank),
                    "LOCAL_RANK": str(local_rank),
                    "LOCAL_WORLD_SIZE": str(count),
                    "RAY_LOCAL_WORLD_SIZE": str(count),
                    "MASTER_ADDR": self._master_addr,
                    "MASTER_PORT": self._master_port,
                    "WG_PREFIX": self.name_prefix,
                    "WG_BACKEND": "ray",
                })
                name = f"{self.name_prefix}{self._cls_name}_{pg_idx}:{local_rank}"
                try:
                    worker = ray_cls_with_init(pg,
                                               local_rank,
                                               use_gpu=resource_pool.use_gpu,
                                               num_gpus=num_gpus,
                                               num_cpus=num_cpus,
                                               env_vars=env,
                                               name=name,
                                               detached=detached)
                except ValueError as exc:
                    if "already" in str(exc).lower():
                        raise ValueError(f"a Ray actor named {name!r} already exists: another worker group uses "
                                         f"name_prefix={self.name_prefix!r}; pick another prefix") from exc
                    raise
                self._workers.append(worker)
                self._worker_names.append(name)
                rank += 1
        # Wait until every constructor has run, so errors in __init__ surface here with their rank.
        try:
            self._fetch([w.__ray_ready__.remote() for w in self._workers], "__init__", range(world_size))
        except Exception:
            self.shutdown()  # the other ranks would wait for the failed one forever
            raise

    # ------------------------------------------------------------------------------------------ properties -------
    @property
    def master_address(self) -> str | None:
        if self._master_addr is None and self._workers:
            self._master_addr, self._master_port = self._fetch([self._workers[0].get_master_addr_port.remote()],
                                                               "get_master_addr_port", [0])[0]
        return self._master_addr

    @property
    def master_port(self) -> str | None:
        _ = self.master_address
        return self._master_port

    # ------------------------------------------------------------------------------------------ execution --------
    def _call_workers(self, method_name: str, ranks: Sequence[int], args_per_rank: Sequence[tuple],
                      kwargs_per_rank: Sequence[dict]) -> list:
        ranks = list(ranks)
        # An object sent to several ranks (ONE_TO_ALL, a dp shard shared by tp ranks) is serialized once.
        seen: dict[int, int] = {}
        for args, kwargs in zip(args_per_rank, kwargs_per_rank):
            for value in (*args, *kwargs.values()):
                if not _is_primitive(value):
                    seen[id(value)] = seen.get(id(value), 0) + 1
        shared = {}

        def prepare(value: Any) -> Any:
            key = id(value)
            if seen.get(key, 0) < 2:
                return value
            if key not in shared:
                shared[key] = ray.put(value)
            return shared[key]

        method_name = self._resolve_method_name(method_name)
        handles = []
        for rank, args, kwargs in zip(ranks, args_per_rank, kwargs_per_rank):
            try:
                remote_method = getattr(self._workers[rank], method_name)
            except AttributeError:
                raise AttributeError(f"the worker class {self._cls_name} has no method {method_name!r}") from None
            handles.append(
                remote_method.remote(*(prepare(a) for a in args), **{
                    k: prepare(v) for k, v in kwargs.items()
                }))
        return handles

    def _resolve_method_name(self, method_name: str) -> str:
        """In a per-role group from :meth:`spawn`, ``execute_all("m")`` reaches the fused actor's ``<role>_m``."""
        prefix = self._role_prefix
        if prefix is not None:
            fused_cls = self.ray_cls_with_init.user_cls
            if not hasattr(fused_cls, method_name) and hasattr(fused_cls, f"{prefix}_{method_name}"):
                return f"{prefix}_{method_name}"
        return method_name

    def _fetch(self, handles: list, method_name: str, ranks: Iterable[int]) -> list:
        ranks = list(ranks)
        try:
            return ray.get(list(handles))
        except RayError as exc:
            rank, error = self._first_failure(handles, ranks, exc)
            raise self._wrap_error(error, rank, method_name) from error

    @staticmethod
    def _first_failure(handles: list, ranks: list[int], fallback: RayError) -> tuple[int | None, RayError]:
        """The lowest rank whose call failed (``ray.get`` raises the first failure it meets, not the lowest)."""
        for handle, rank in zip(handles, ranks):
            ready, _ = ray.wait([handle], timeout=0)
            if not ready:
                continue
            try:
                ray.get(handle)
            except RayError as err:
                return rank, err
        return None, fallback

    def _wrap_error(self, error: RayError, rank: int | None, method_name: str) -> Exception:
        name = self._worker_names[rank] if rank is not None and rank < len(self._worker_names) else "?"
        where = f"rank {rank}" if rank is not None else "a rank"
        text = _ANSI.sub("", str(error)).strip()
        if isinstance(error, RayTaskError):
            cause = error.cause if isinstance(error.cause, BaseException) else error
            kind = type(cause).__name__
            message = (f"worker {where} ({name}) raised {kind} in {self._cls_name}.{method_name}: {cause}\n"
                       f"--- traceback on worker {where} ---\n{text}")
        elif isinstance(error, RayActorError) and error.actor_init_failed:
            cause = error
            message = (f"worker {where} ({name}) could not start: {self._cls_name}.__init__ raised (see the worker "
                       f"traceback below); the group is unusable:\n{text}")
        elif isinstance(error, RayActorError):
            cause = error
            message = (f"worker {where} ({name}) died while running {self._cls_name}.{method_name} (the process "
                       f"exited or was killed; its log is in the Ray session directory):\n{text}")
        else:
            cause = error
            message = f"worker {where} ({name}) failed in {self._cls_name}.{method_name}: {text}"
        return make_worker_error(message, cause, rank=rank, method=method_name, worker_name=name, worker_traceback=text)

    def _is_worker_alive(self, worker: Any) -> bool:
        try:
            from ray._private import state

            info = state.actors(actor_id=worker._actor_id.hex())
            return info.get("State") != "DEAD" if info else True
        except Exception:  # noqa: BLE001 - no state API here: assume alive
            return True

    # ------------------------------------------------------------------------------------------ colocation -------
    def _role_keys(self) -> list[str]:
        return list(getattr(self.ray_cls_with_init.user_cls, "_verl_role_keys", []))

    def spawn(self, prefix_set: Iterable[str]) -> dict[str, RayWorkerGroup]:
        """One worker group per role of a colocated group, over the same actors; ``<role>_<m>`` becomes ``m``."""
        roles = self._role_keys()
        out: dict[str, RayWorkerGroup] = {}
        for prefix in prefix_set:
            if prefix not in roles:
                raise ValueError(f"role {prefix!r} is not part of this worker group (roles: {roles}); spawn works on "
                                 "groups built from create_colocated_worker_cls")
            group = RayWorkerGroup(resource_pool=None,
                                   ray_cls_with_init=self.ray_cls_with_init,
                                   name_prefix=self.name_prefix,
                                   worker_names=self._worker_names,
                                   worker_handles=self._workers)
            group.resource_pool = self.resource_pool
            group._master_addr, group._master_port = self._master_addr, self._master_port
            group._role_prefix = prefix
            marker = f"{prefix}_"
            for name, spec in list(self._method_specs.items()):
                if name.startswith(marker):
                    group._bind_method(name[len(marker):], spec, override=True)
            out[prefix] = group
        return out

    def fuse(self, prefix_set: Iterable[str]) -> None:
        """Attach the per-role groups of :meth:`spawn` as attributes: ``wg.actor.update_actor(...)``."""
        for prefix, group in self.spawn(prefix_set).items():
            if hasattr(self, prefix):
                raise ValueError(
                    f"cannot attach role {prefix!r}: the worker group already has an attribute of that name")
            setattr(self, prefix, group)

    # ------------------------------------------------------------------------------------------- teardown --------
    def shutdown(self) -> None:
        """Kill the actors (of every group sharing them, e.g. from :meth:`spawn`)."""
        for worker in self._workers:
            try:
                ray.kill(worker, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self._workers = []


# ----------------------------------------------------------------------------------------------------------------------
# colocation: several roles in one process
# ----------------------------------------------------------------------------------------------------------------------


def _make_role_proxy(role: str, method_name: str, is_async: bool) -> Any:
    if is_async:

        async def proxy(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await getattr(self.worker_dict[role], method_name)(*args, **kwargs)
    else:

        def proxy(self: Any, *args: Any, **kwargs: Any) -> Any:
            return getattr(self.worker_dict[role], method_name)(*args, **kwargs)

    proxy.__name__ = f"{role}_{method_name}"
    return proxy


def create_colocated_worker_cls(class_dict: dict[str, RayClassWithInitArgs]) -> RayClassWithInitArgs:
    """Fuse several roles into one worker class, so one process (one device) hosts all of them.

    ``class_dict`` maps role names to their classes with init args. The fused class builds every role in its
    constructor (``self.worker_dict[role]``; each role sees the others through ``fused_worker_dict``) and exposes
    every registered method ``m`` of role ``r`` as ``r_m`` with the same dispatch mode. Build one
    ``RayWorkerGroup`` from the result, then ``spawn(prefix_set=class_dict.keys())`` for per-role groups.
    """
    import inspect

    if not class_dict:
        raise ValueError("create_colocated_worker_cls needs at least one role in class_dict")
    roles: dict[str, tuple[type, tuple, dict]] = {}
    options: dict[str, Any] = {}
    resources: dict[str, float] = {}
    for role, cia in class_dict.items():
        if not isinstance(role, str) or not role.isidentifier():
            raise ValueError(f"role names must be Python identifiers (they prefix method names), got {role!r}")
        if not isinstance(cia, ClassWithInitArgs):
            raise TypeError(f"class_dict[{role!r}] must be a RayClassWithInitArgs, got {type(cia).__name__}")
        user_cls = cia.user_cls if isinstance(cia, RayClassWithInitArgs) else cia.cls
        if not (isinstance(user_cls, type) and issubclass(user_cls, Worker)):
            raise TypeError(f"class_dict[{role!r}] wraps {user_cls!r}, which does not derive from verl's Worker")
        roles[role] = (user_cls, cia.args, cia.kwargs)
        for key, val in getattr(cia, "_options", {}).items():
            if key in options and options[key] != val:
                raise ValueError(f"roles disagree on the Ray option {key!r} ({options[key]!r} vs {val!r}); a fused "
                                 "process has one set of options")
            options[key] = val
        for key, val in getattr(cia, "_additional_resource", {}).items():
            resources[key] = max(resources.get(key, 0.0), val)

    class WorkerDict(Worker):
        """Several roles in one process (built by ``create_colocated_worker_cls``)."""

        _verl_role_keys = tuple(roles)

        def __init__(self) -> None:
            super().__init__()
            self.worker_dict: dict[str, Worker] = {}
            for role_name, (cls, args, kwargs) in roles.items():
                self.worker_dict[role_name] = cls(*args, **kwargs)
            for worker in self.worker_dict.values():
                worker.fused_worker_dict = self.worker_dict
            self.fused_worker_dict = self.worker_dict

    for role, (user_cls, _, _) in roles.items():
        for name in dir(user_cls):
            try:
                attr = getattr(user_cls, name)
            except Exception:  # noqa: BLE001
                continue
            attrs = getattr(attr, MAGIC_ATTR, None)
            if not isinstance(attrs, dict):
                continue
            direct = attrs["dispatch_mode"] == Dispatch.DIRECT_ROLLOUT_METHOD
            fused_name = name if direct else f"{role}_{name}"
            if fused_name in WorkerDict.__dict__:
                raise ValueError(f"two roles expose the method {fused_name!r}; rename one of them")
            proxy = _make_role_proxy(role, name, inspect.iscoroutinefunction(attr))
            setattr(proxy, MAGIC_ATTR, dict(attrs))
            setattr(WorkerDict, fused_name, proxy)

    fused = RayClassWithInitArgs(WorkerDict)
    if options:
        fused.update_options(options)
    if resources:
        fused.set_additional_resource(resources)
    fused.fused_worker_used = True
    return fused
