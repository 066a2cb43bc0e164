"""Hybrid engine for the SGLang rollout: FSDP2 actor -> SGLang engine (offline ``Engine`` or HTTP server).

Each generation step (``with sharding_manager:``):

1. enter: ``resume_memory_occupation`` (weights first, then the KV cache with ``rollout.multi_stage_wake_up``), load
   offloaded actor parameters, gather the actor's full weights parameter by parameter in buckets of at most
   ``bucket_bytes`` (:func:`verl.utils.fsdp_utils.iter_full_params_in_buckets`) and send each bucket to the engine
   inside one ``begin_weight_update`` / ``end_weight_update`` session, then ``flush_cache`` (the radix cache holds
   KV computed with the old weights);
2. ``preprocess_data``: with tensor parallelism, all-gather the prompts of the tensor-parallel group (its first rank
   owns the engine and generates for all of them); ``postprocess_data`` keeps this rank's rows;
3. exit: ``release_memory_occupation`` (SGLang's sleep) when ``rollout.free_cache_engine``.

How a bucket reaches the engine (``weight_sync``):

* ``tensor`` (default): ``update_weights_from_tensor``. CUDA tensors travel as CUDA IPC handles (no copy; with
  tensor parallelism every rank of the group sends its handle to the engine owner, which hands SGLang one per TP
  rank); CPU tensors through shared memory (offline engine) or pickled in the request (HTTP server on this machine).
* ``distributed``: ``update_weights_from_distributed``: the syncing rank joins a process group with the server's
  ranks (NCCL on GPU, gloo on CPU) and broadcasts each tensor; for a server on another machine.
* ``disk``: the syncing rank writes the bucket as safetensors to ``sync_dir`` and the engine loads it with
  ``update_weights_from_disk``; the slowest, works anywhere a shared file system does.

All three change the engine's outputs on CPU (verified by ``tests/workers/rollout/sglang``). Memory release/resume
only happens on GPU: SGLang synchronises CUDA there, which fails on a CPU-only machine.

Measurements of each sync are left in ``metrics`` under the names of the other hybrid engines
(``perf/weight_sync_s``, ``perf/weight_sync_gb``, ``perf/weight_sync_buckets``, ``perf/weight_sync_max_bucket_mb``,
``perf/weight_sync_peak_memory_gb``, ``perf/weight_sync_peak_memory_delta_gb``: accelerator allocations on GPU; on
CPU the RSS of this process plus its engine processes) and ``timing["weight_sync"]``.

The engine side (all of the above but the actor) is :class:`SGLangShardingManager`; a subclass supplies the actor's
weights (``_weight_buckets``) and its offload (``_load_actor`` / ``_offload_actor``): :class:`FSDPSGLangShardingManager`
here, :class:`~verl.workers.sharding_manager.megatron_sglang.MegatronSGLangShardingManager` for the Megatron actor.

:func:`build_hybrid_engine` is what the FSDP worker calls for ``actor_rollout_ref.rollout.name=sglang``; its
``make_manager`` argument lets another backend put its own weight source behind the same engine.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import time
import uuid
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from verl.utils.config import ConfigError, cfg_select
from verl.utils.device import get_torch_device, is_cuda_available
from verl.workers.sharding_manager.base import TPGroupShardingManager, build_infer_tp_mesh
from verl.workers.sharding_manager.fsdp_hf import FSDPWeightSource

__all__ = ["SGLangShardingManager", "FSDPSGLangShardingManager", "build_hybrid_engine", "WEIGHT_SYNC_MODES"]

_KEY = "actor_rollout_ref.rollout"
WEIGHT_SYNC_MODES = ("tensor", "distributed", "disk")


def _tree_rss_bytes() -> int:
    """RSS of this process and its children (the engine's scheduler / server processes)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency of ray
        return 0
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return int(total)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _address_towards(url: str | None) -> str:
    """This machine's IP address on the route to ``url``'s host (127.0.0.1 for a local or unknown host): where a
    remote server can reach the weight-update group this process hosts."""
    import socket
    import urllib.parse

    host = urllib.parse.urlparse(url).hostname if url else None
    if not host or host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP: no packet is sent, only the route is chosen
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())


class _UpdateGroup:
    """A process group shared with the engine's ranks for ``update_weights_from_distributed``: this process is
    rank 0 (the TCP store's master), the engine's TP ranks are 1..tp. Built with the same rendezvous SGLang's
    ``init_weights_update_group`` uses on its side, so both ends meet."""

    def __init__(self, engine: Any, master_address: str, backend: str, tp_size: int, group_name: str,
                 timeout_s: float) -> None:
        from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous

        from verl.workers.rollout.sglang_rollout.engine import run_in_thread

        port = _free_port()
        world_size = 1 + int(tp_size)
        thread, result = run_in_thread(engine.init_weights_update_group, master_address, port, 1, world_size,
                                       group_name, backend)
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(rendezvous(f"tcp://{master_address}:{port}", 0, world_size, timeout=timeout))
        store = PrefixStore(group_name, store)
        options = {"backend_options": None} if "backend_options" in _new_process_group_helper.__code__.co_varnames \
            else {"pg_options": None}
        self.group, _ = _new_process_group_helper(world_size,
                                                  0, [],
                                                  backend,
                                                  store,
                                                  group_name=group_name,
                                                  timeout=timeout,
                                                  **options)
        _world.pg_group_ranks[self.group] = {i: i for i in range(world_size)}
        thread.join()
        if "error" in result:
            raise result["error"]
        self.name = group_name


class SGLangShardingManager(TPGroupShardingManager):
    """The engine side of the SGLang hybrid engine: resume the engine, send it the actor's weights, release its
    memory on exit (see the module docstring). Subclasses supply the weights.

    Args:
        inference_engine: the engine adapter (:class:`~verl.workers.rollout.sglang_rollout.engine.OfflineEngine` or
            ``HttpServerEngine``) on the rank that owns it; ``None`` on the other ranks of a tensor-parallel group
            (and on ranks that only take part in the gathers, see ``sync``).
        bucket_bytes: upper bound of gathered-but-not-yet-sent weights (a larger single tensor is a bucket of its
            own); ``rollout.update_weights_bucket_megabytes``.
        release_memory: release the engine's memory between generations (``rollout.free_cache_engine``; GPU only).
        multi_stage_wake_up: resume the weights before the sync and the KV cache after it (lower peak memory).
        device_mesh: the inference mesh ``("dp", "infer_tp")``; None without tensor parallelism.
        weight_sync: ``tensor``, ``distributed`` or ``disk`` (see the module docstring).
        sync: whether this rank sends weights (every rank still takes part in the gathers). False for all but one
            rank when several data-parallel ranks share one external server.
        dtype: dtype the engine holds its weights in (gathered tensors are cast to it).
        sync_dir: directory for ``weight_sync=disk``; ``model_path``'s ``config.json`` is copied next to the
            weights.
        model_path: the model directory (for ``config.json`` in ``disk`` mode).
        master_address: address the engine reaches this process at, for ``distributed`` (default: this machine's
            address on the route to the server, 127.0.0.1 for a local one).
        group_timeout_s: timeout of the ``distributed`` process group.
        barrier_after_sync: wait for all ranks after the sync (several ranks generate through one server that
            only one of them updates).
    """

    def __init__(self,
                 inference_engine: Any,
                 bucket_bytes: int = 512 << 20,
                 release_memory: bool = True,
                 multi_stage_wake_up: bool = False,
                 device_mesh: Any = None,
                 weight_sync: str = "tensor",
                 sync: bool = True,
                 dtype: torch.dtype | None = None,
                 sync_dir: str | None = None,
                 model_path: str | None = None,
                 master_address: str | None = None,
                 group_timeout_s: float = 600.0,
                 barrier_after_sync: bool = False) -> None:
        super().__init__()
        if int(bucket_bytes) <= 0:
            raise ConfigError(f"{_KEY}.update_weights_bucket_megabytes: must be positive, got {bucket_bytes} bytes. "
                              "Fix: set it to a positive number")
        if weight_sync not in WEIGHT_SYNC_MODES:
            raise ConfigError(f"{_KEY}.http_server.weight_sync: unknown mode {weight_sync!r}. Fix: use one of "
                              f"{', '.join(WEIGHT_SYNC_MODES)} (or auto)")
        if weight_sync == "disk" and not sync_dir:
            raise ConfigError(f"{_KEY}.http_server.sync_dir: needed for weight_sync=disk. Fix: set it to a directory "
                              "both the trainer and the SGLang server can read")
        self.engine = inference_engine
        self.bucket_bytes = int(bucket_bytes)
        self.release_memory = bool(release_memory)
        self.multi_stage_wake_up = bool(multi_stage_wake_up)
        self.weight_sync = weight_sync
        self.sync = bool(sync)
        self.dtype = dtype
        self.sync_dir = sync_dir
        self.model_path = model_path
        self.master_address = master_address or _address_towards(getattr(inference_engine, "address", None))
        self.group_timeout_s = float(group_timeout_s)
        self.barrier_after_sync = bool(barrier_after_sync)
        self._init_tp_group(device_mesh)
        if self.tp_size > 1 and weight_sync != "tensor":
            raise ConfigError(f"{_KEY}.http_server.weight_sync={weight_sync}: with tensor_model_parallel_size > 1 "
                              "the in-process hybrid engine syncs through CUDA IPC. Fix: use weight_sync=tensor")
        self.last_buckets: list[tuple[int, int]] = []
        self._group: _UpdateGroup | None = None
        self._released = False
        if self.release_memory and self._owns_engine:
            self.engine.release_memory_occupation()  # no-op on CPU
            self._released = True

    @property
    def _owns_engine(self) -> bool:
        return self.engine is not None and self.tp_rank == 0

    # ------------------------------------------------------------------------------------- weight source ------
    def _weight_buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The actor's full weights under their Hugging Face names, in buckets of at most ``bucket_bytes`` (cast to
        ``dtype``). A collective: every rank iterates to the end."""
        raise NotImplementedError

    def _load_actor(self) -> None:
        """Bring offloaded actor parameters to the device for the sync."""

    def _offload_actor(self) -> None:
        """Offload them again after the sync."""

    # ------------------------------------------------------------------------------------------ context -------
    def __enter__(self) -> "SGLangShardingManager":
        device = get_torch_device()
        on_gpu = is_cuda_available()
        self.timing, self.metrics = {}, {}
        if on_gpu:
            device.synchronize()
            device.reset_peak_memory_stats()
        mem_start = device.memory_allocated() if on_gpu else _tree_rss_bytes()
        start = time.perf_counter()

        if self._released and self._owns_engine:
            self.engine.resume_memory_occupation(tags=["weights"] if self.multi_stage_wake_up else None)
        self._load_actor()
        stats = self.sync_weights()
        if self.barrier_after_sync and dist.is_initialized():
            dist.barrier()  # nobody generates before the server has the new weights
        self._offload_actor()
        device.synchronize()
        device.empty_cache()
        if self._released and self._owns_engine and self.multi_stage_wake_up:
            self.engine.resume_memory_occupation(tags=["kv_cache"])
        self._released = False

        elapsed = time.perf_counter() - start
        peak = device.max_memory_allocated() if on_gpu else max(stats["peak_rss"], _tree_rss_bytes())
        self._record_weight_sync(elapsed, stats, peak, mem_start)
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if self.release_memory and self._owns_engine:
            self.engine.release_memory_occupation()  # no-op on CPU
            self._released = True
        get_torch_device().empty_cache()
        return None

    # ------------------------------------------------------------------------------------------- weights ------
    @torch.no_grad()
    def sync_weights(self) -> dict[str, int]:
        """Send the actor's weights (:meth:`_weight_buckets`) bucket by bucket to the engine (see the module
        docstring).

        The gathers are collectives: every rank iterates to the end, and a failure to send is raised only then, so
        that no rank is left waiting. Returns the bytes moved, the number of buckets, the largest bucket and the
        peak RSS seen (CPU).
        """
        stats = {"bytes": 0, "buckets": 0, "max_bucket": 0, "peak_rss": 0}
        self.last_buckets = []
        sending = self.sync and (self._owns_engine or self.tp_size > 1)
        error: BaseException | None = None
        if sending and self._owns_engine:
            try:
                self._begin()
            except Exception as exc:  # noqa: BLE001 - raised after the collectives
                error = exc
        for index, named in enumerate(self._weight_buckets()):
            size = sum(t.numel() * t.element_size() for _, t in named)
            if self.tp_size > 1 and self.sync:  # a collective within the group: every rank takes part
                try:
                    self._send_tp_handles(named, call_engine=error is None)
                except Exception as exc:  # noqa: BLE001 - raised after the collectives
                    error = error or exc
            elif sending and error is None:
                try:
                    self._send(named, index)
                except Exception as exc:  # noqa: BLE001 - raised after the collectives
                    error = exc
            stats["buckets"] += 1
            stats["bytes"] += size
            stats["max_bucket"] = max(stats["max_bucket"], size)
            self.last_buckets.append((len(named), size))
            if not is_cuda_available():
                stats["peak_rss"] = max(stats["peak_rss"], _tree_rss_bytes())
            del named  # before the next gather: at most one bucket is alive
        if sending and self._owns_engine and error is None:
            try:
                self._end()
            except Exception as exc:  # noqa: BLE001
                error = exc
        if error is not None:
            raise error
        if stats["buckets"] == 0:
            raise ValueError("the actor has no weights to load into the SGLang engine; the rollout needs the actor "
                             "model (actor_rollout_ref.model.path)")
        return stats

    def _begin(self) -> None:
        if self.weight_sync == "disk":
            os.makedirs(self.sync_dir, exist_ok=True)
            for name in os.listdir(self.sync_dir):
                if name.endswith((".safetensors", ".safetensors.index.json")):
                    os.remove(os.path.join(self.sync_dir, name))
            if self.model_path and os.path.exists(os.path.join(self.model_path, "config.json")):
                shutil.copy(os.path.join(self.model_path, "config.json"), os.path.join(self.sync_dir, "config.json"))
            self._disk_index: dict[str, str] = {}
            return
        if self.weight_sync == "distributed" and self._group is None:
            backend = "nccl" if is_cuda_available() else "gloo"
            self._group = _UpdateGroup(self.engine, self.master_address, backend, self.tp_size_of_engine(),
                                       f"verl_weight_sync_{uuid.uuid4().hex[:12]}", self.group_timeout_s)
        self.engine.begin_weight_update()

    def tp_size_of_engine(self) -> int:
        return int(getattr(self.engine, "tp_size", None) or self.tp_size)

    def _send(self, named: list[tuple[str, torch.Tensor]], index: int) -> None:
        if is_cuda_available():
            get_torch_device().synchronize()  # the gathered tensors must be complete before another process reads
        if self.weight_sync == "tensor":
            self.engine.update_weights_from_tensor(named, flush_cache=False)
        elif self.weight_sync == "distributed":
            from verl.workers.rollout.sglang_rollout.engine import dtype_names, run_in_thread

            tensors = [t.contiguous() for _, t in named]
            thread, result = run_in_thread(self.engine.update_weights_from_distributed, [n for n, _ in named],
                                           dtype_names(tensors), [list(t.shape) for t in tensors], self._group.name)
            try:
                for tensor in tensors:
                    dist.broadcast(tensor, src=0, group=self._group.group)
            finally:
                thread.join()
            if "error" in result:
                raise result["error"]
        else:  # disk
            from safetensors.torch import save_file

            file = f"model-{index:05d}.safetensors"
            save_file({n: t.detach().contiguous().cpu() for n, t in named}, os.path.join(self.sync_dir, file))
            self._disk_index.update({n: file for n, _ in named})

    def _send_tp_handles(self, named: list[tuple[str, torch.Tensor]], call_engine: bool = True) -> None:
        """Tensor parallel: every rank of the group sends its CUDA IPC handles to the engine owner, which gives
        SGLang one handle per TP rank (each TP rank maps the copy on its own GPU)."""
        from verl.workers.rollout.sglang_rollout.engine import _cuda_ipc_payload

        get_torch_device().synchronize()
        payloads = [_cuda_ipc_payload(t.detach()) for _, t in named]
        gathered: list[Any] | None = [None] * self.tp_size if self.tp_rank == 0 else None
        dist.gather_object(payloads, gathered, dst=self.tp_src, group=self.tp_group)
        failure: Exception | None = None
        if self.tp_rank == 0 and call_engine:
            try:
                from sglang.srt.model_executor.model_runner_components.weight_updater import LocalSerializedTensor

                per_tensor = [(name, LocalSerializedTensor(values=[ranks[i]
                                                                   for ranks in gathered]))
                              for i, (name, _) in enumerate(named)]
                self.engine.update_weights_from_tensor(per_tensor, flush_cache=False)
            except Exception as exc:  # noqa: BLE001 - raised after the barrier, so no rank is left waiting
                failure = exc
        dist.barrier(group=self.tp_group)  # keep the tensors alive until the engine has read them
        if failure is not None:
            raise failure

    def _end(self) -> None:
        if self.weight_sync == "disk":
            with open(os.path.join(self.sync_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {}, "weight_map": self._disk_index}, f)
            self.engine.update_weights_from_disk(self.sync_dir)
        else:
            self.engine.end_weight_update()
        self.engine.flush_cache()


class FSDPSGLangShardingManager(FSDPWeightSource, SGLangShardingManager):
    """Load the FSDP2 (or plain) actor's weights into an SGLang engine on entry; release its memory on exit (see
    the module docstring).

    Args:
        module: the training model (FSDP2 ``fully_shard``-ed, or a plain ``nn.Module`` in one process).
        inference_engine: see :class:`SGLangShardingManager` (as are the other keyword arguments).
        bucket_bytes: upper bound of gathered-but-not-yet-sent weights; ``rollout.update_weights_bucket_megabytes``.
        offload_param: the actor's parameters live in host memory between steps (``fsdp_config.param_offload``).
    """

    def __init__(self,
                 module: nn.Module,
                 inference_engine: Any,
                 bucket_bytes: int = 512 << 20,
                 offload_param: bool = False,
                 **engine_kwargs: Any) -> None:
        self.module = module
        self.offload_param = bool(offload_param)
        super().__init__(inference_engine, bucket_bytes=bucket_bytes, **engine_kwargs)

    def _engine_dtype(self) -> Any:
        return self.dtype


def _resolve_weight_sync(http: Any, engine: Any) -> str:
    """``http_server.weight_sync`` (``auto``: ``tensor`` for an in-process engine or a server on this machine,
    ``distributed`` for a server elsewhere)."""
    mode = str(cfg_select(http, "weight_sync", None) or "auto")
    if mode != "auto":
        return mode
    if engine is not None and getattr(engine, "kind", "engine") == "http" and not engine.is_local:
        return "distributed"
    return "tensor"


def build_hybrid_engine(
        worker: Any,
        rollout_cls: type,
        make_manager: Callable[..., SGLangShardingManager] | None = None) -> tuple[Any, SGLangShardingManager]:
    """The SGLang rollout of an ``ActorRolloutRefWorker`` and the sharding manager that feeds it the actor's
    weights; called by the worker's ``_build_rollout`` for ``actor_rollout_ref.rollout.name=sglang``.
    ``make_manager(inference_engine=, bucket_bytes=, **engine_settings)`` builds the manager around the worker's
    actor; default: the FSDP actor (``worker.actor_module_fsdp``).

    Consecutive ranks form a tensor-parallel group (``rollout.tensor_model_parallel_size``, GPU only) whose first
    rank owns the engine. With ``rollout.http_server.address`` (one external server for the whole job) only global
    rank 0 sends weights; every rank generates through the server. Every rank must call it.
    """
    from verl.utils.fsdp_utils import to_torch_dtype

    config = worker.config
    rollout_cfg = cfg_select(config, "rollout")
    model_cfg = cfg_select(config, "model")

    def get(node: Any, key: str, default: Any = None) -> Any:
        value = cfg_select(node, key, default)
        return default if value is None else value

    tp = int(get(rollout_cfg, "tensor_model_parallel_size", 1) or 1)
    distributed = dist.is_available() and dist.is_initialized()
    mesh, rank = build_infer_tp_mesh(tp)
    http = get(rollout_cfg, "http_server", {}) or {}
    external = bool(get(http, "enable", False)) and bool(get(http, "address", None))
    model_path = get(model_cfg, "path")
    rollout = rollout_cls(model_path,
                          config=rollout_cfg,
                          tokenizer=worker.tokenizer,
                          model_hf_config=getattr(worker, "hf_config", None),
                          device_mesh=mesh,
                          load_format=None if external else str(get(rollout_cfg, "load_format", "dummy")),
                          trust_remote_code=bool(get(model_cfg, "trust_remote_code", False)))
    on_gpu = is_cuda_available()
    dtype = to_torch_dtype(get(rollout_cfg, "dtype", "bfloat16"), torch.bfloat16) if on_gpu else torch.float32
    bucket_mb = float(get(rollout_cfg, "update_weights_bucket_megabytes", 512) or 512)
    if make_manager is None:

        def make_manager(**kwargs: Any) -> SGLangShardingManager:
            return FSDPSGLangShardingManager(module=worker.actor_module_fsdp,
                                             offload_param=bool(getattr(worker, "_is_offload_param", False)),
                                             **kwargs)

    manager = make_manager(inference_engine=rollout.engine,
                           bucket_bytes=int(bucket_mb * (1 << 20)),
                           release_memory=bool(get(rollout_cfg, "free_cache_engine", True)) and not external,
                           multi_stage_wake_up=bool(get(rollout_cfg, "multi_stage_wake_up", False)),
                           device_mesh=mesh,
                           weight_sync=_resolve_weight_sync(http, rollout.engine),
                           sync=(rank == 0) if external else True,
                           dtype=dtype,
                           sync_dir=get(http, "sync_dir", None),
                           model_path=model_path,
                           master_address=get(http, "master_address", None),
                           barrier_after_sync=external and distributed)
    return rollout, manager
