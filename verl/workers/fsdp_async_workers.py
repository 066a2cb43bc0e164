"""The actor/rollout worker of ``actor_rollout_ref.rollout.mode=async`` (server-mode rollouts).

Instead of an in-process rollout engine, rank 0 owns a rollout server chosen by ``actor_rollout_ref.rollout.name``
(:mod:`verl.workers.rollout.server_adapters`: ``hf`` the HF fallback server, ``sglang`` SGLang's HTTP server,
``vllm`` vLLM's OpenAI-compatible server). The trainer's :class:`~verl.experimental.agent_loop.AgentLoopManager`
drives it through :meth:`get_rollout_server_info` / :meth:`get_rollout_server_addresses`, and
:meth:`update_rollout_weights` sends the actor's current (FSDP-sharded) weights to it after every update: all ranks
join each bucket's gather, rank 0 sends the buckets.

``rollout.placement``:

* ``colocated`` (default): rank 0 launches the server on ``127.0.0.1`` beside the actor (same devices); weights go
  over HTTP bucket by bucket, and on GPU the server frees its memory while the actor trains
  (:meth:`release_rollout_memory`, ``rollout.free_cache_engine``).
* ``disaggregated``: the server runs apart from the actor: the one at ``rollout.server_address`` (started by you),
  or, without an address, one rank 0 launches as its own process that keeps its memory. Weights go by disk: rank 0
  writes the actor's HF weights to ``rollout.server_weights_dir`` (a directory the server can read; a temporary one
  by default) and the server reloads them.

A server we launched runs in its own process session; it is stopped when the worker shuts down, and a small watchdog
process stops it when the worker process dies without running its exit handlers (``ray.kill``).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import threading
import time
from typing import Any

import torch.distributed as dist

from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.fsdp_workers import ActorRolloutRefWorker

__all__ = ["AsyncActorRolloutRefWorker"]

_WATCHDOG = """
import os, signal, sys, time
parent, pgid = int(sys.argv[1]), int(sys.argv[2])
while True:
    time.sleep(1.0)
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        break
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        sys.exit(0)
try:
    os.killpg(pgid, signal.SIGTERM)
    time.sleep(3.0)
    os.killpg(pgid, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


class AsyncActorRolloutRefWorker(ActorRolloutRefWorker):
    """:class:`~verl.workers.fsdp_workers.ActorRolloutRefWorker` whose rollout is a server process (rank 0)."""

    def __init__(self, config: Any, role: str, **kwargs: Any) -> None:
        super().__init__(config, role, **kwargs)
        self.server_process = None
        self.rollout_server = None
        self._watchdog = None
        self._sync_dir: str | None = None
        self._launch: dict[str, Any] = {}
        self._launch_thread: threading.Thread | None = None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        """Start launching the rollout server (rank 0, in a thread: its start overlaps building the actor), then
        build the actor and reference policy as the base worker does."""
        if self._is_rollout:
            self._check_server_backend()
            if dist.get_rank() == 0:
                self._launch = {}
                start = self._prepare_server()  # imports and arguments here: only the launch runs in the thread
                self._launch_thread = threading.Thread(target=self._launch_server, args=(start,), daemon=True)
                self._launch_thread.start()
        try:
            super().init_model()
        except BaseException:
            if self._launch_thread is not None:  # do not leave a server behind a failed build
                self._launch_thread.join()
                self._launch_thread = None
                if self._launch.get("server") is not None:
                    self.rollout_server = self._launch.pop("server")
                    self._stop_server()
            raise

    def _check_server_backend(self) -> None:
        from verl.workers.rollout.server_adapters import SERVER_NAMES

        name = str(self.config.rollout.get("name", "hf"))
        if name not in SERVER_NAMES:
            raise NotImplementedError(f"actor_rollout_ref.rollout.mode=async with rollout.name={name!r}: no rollout "
                                      f"server of that name. Fix: set actor_rollout_ref.rollout.name to one of "
                                      f"{SERVER_NAMES}")

    def _placement(self) -> str:
        return str(self.config.rollout.get("placement", "colocated") or "colocated")

    def _prepare_server(self) -> Any:
        """Check the rollout server's settings and build its launch (or connection) now; returns ``start()``."""
        from verl.utils.device import is_cuda_available
        from verl.workers.rollout.server_adapters import connect_rollout_server, prepare_rollout_server

        rollout_cfg = self.config.rollout
        name = str(rollout_cfg.get("name", "hf"))
        address = rollout_cfg.get("server_address", None)
        model_path = str(self.config.model.path)
        if address:
            if name == "sglang":
                import verl.workers.rollout.sglang_rollout.engine  # noqa: F401 - imported here, not in the thread
            return lambda: connect_rollout_server(
                name, str(address), rollout_cfg, model_path, on_gpu=is_cuda_available())
        return prepare_rollout_server(name,
                                      rollout_cfg,
                                      model_path,
                                      on_gpu=is_cuda_available(),
                                      timeout_s=float(rollout_cfg.get("server_launch_timeout_s", 600) or 600))

    def _launch_server(self, start: Any) -> None:
        try:
            self._launch["server"] = start()
        except BaseException as exc:  # noqa: BLE001 - re-raised in _build_rollout
            self._launch["error"] = exc
            return
        process = self._launch["server"].process
        if process is not None:  # stops the server if this worker process dies without its exit handlers (ray.kill)
            self._watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, str(os.getpid()),
                 str(process.pid)],
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)

    def _build_rollout(self) -> tuple[Any, Any]:
        """Wait for the rollout server rank 0 is launching (no in-process engine, no sharding manager)."""
        if self._launch_thread is None:
            return None, None
        self._launch_thread.join()
        self._launch_thread = None
        if "error" in self._launch:
            raise self._launch["error"]
        self.rollout_server = self._launch.pop("server")
        self.server_process = self.rollout_server.process
        atexit.register(self._stop_server)
        where = f"log {self.server_process.log_path}" if self.server_process is not None else "given by address"
        print(
            f"[verl] rollout server ({self.rollout_server.name}, {self._placement()}) at "
            f"{self.rollout_server.address}, {where}",
            flush=True)
        return None, None

    def _stop_server(self) -> None:
        server, self.rollout_server = self.rollout_server, None
        if server is not None:
            server.stop()  # a server given by address is left running
        if self.server_process is not None:
            self.server_process.stop()
            self.server_process = None
        if self._watchdog is not None:
            with contextlib.suppress(ProcessLookupError):
                self._watchdog.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(timeout=5)
            self._watchdog = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._stop_server()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def get_rollout_server_addresses(self) -> str | None:
        """This rank's server address (``http://127.0.0.1:PORT`` on rank 0, ``None`` elsewhere)."""
        return self.rollout_server.address if self.rollout_server is not None else None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def get_rollout_server_info(self) -> dict[str, Any] | None:
        """This rank's server: ``{name, api, address, pid, log_path, hostname}`` (rank 0), ``None`` elsewhere."""
        import socket

        if self.rollout_server is None:
            return None
        return dict(self.rollout_server.info(), hostname=socket.gethostname())

    def _weights_dir(self) -> str:
        configured = self.config.rollout.get("server_weights_dir", None)
        if configured:
            return str(configured)
        if self._sync_dir is None:
            import tempfile

            self._sync_dir = tempfile.mkdtemp(prefix="verl_rollout_weights_")
        return self._sync_dir

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def update_rollout_weights(self) -> dict[str, float]:
        """Send the actor's current weights to the rollout server; every rank must run it (FSDP gathers).
        ``colocated``: over HTTP in buckets; ``disaggregated``: through ``rollout.server_weights_dir``.
        Returns ``{"buckets", "bytes", "weight_version", "seconds"}`` (the server's answers on rank 0)."""
        from verl.utils.fsdp_utils import iter_full_params_in_buckets, load_fsdp_model_to_gpu, offload_fsdp_model_to_cpu
        from verl.workers.rollout.server_adapters import push_weight_buckets
        from verl.workers.sharding_manager.fsdp_hf import _clean_name

        if self.actor_module_fsdp is None:
            raise RuntimeError("update_rollout_weights before init_model(); call init_model() on the worker group")
        start = time.perf_counter()
        bucket_mb = float(self.config.rollout.get("update_weights_bucket_megabytes", 512) or 512)
        mode = "disk" if self._placement() == "disaggregated" else "tensor"
        if self._is_offload_param:
            load_fsdp_model_to_gpu(self.actor_module_fsdp)
        try:
            buckets = ([(_clean_name(n), t) for n, t in bucket] for bucket in iter_full_params_in_buckets(
                self.actor_module_fsdp, bucket_bytes=int(bucket_mb * (1 << 20)), to_cpu=True))
            if self.rollout_server is not None:
                try:
                    stats = push_weight_buckets([self.rollout_server],
                                                buckets,
                                                mode=mode,
                                                sync_dir=self._weights_dir() if mode == "disk" else None,
                                                model_path=str(self.config.model.path))
                except BaseException:
                    for _ in buckets:  # keep joining the other ranks' gathers, so that only the error remains
                        pass
                    raise
            else:  # join every bucket's gather
                stats = {"buckets": 0, "bytes": 0, "weight_version": -1}
                for _ in buckets:
                    stats["buckets"] += 1
        finally:
            if self._is_offload_param:
                offload_fsdp_model_to_cpu(self.actor_module_fsdp)
        out = {k: float(v) for k, v in stats.items()}
        out["seconds"] = time.perf_counter() - start
        return out

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def release_rollout_memory(self) -> bool:
        """Colocated on GPU with ``rollout.free_cache_engine``: free the server's memory (weights and KV cache) for
        training; the next :meth:`update_rollout_weights` takes it back. Returns whether anything was released (so
        the caller knows the weights must be sent again)."""
        server = self.rollout_server
        if server is None or not server.on_gpu or self._placement() != "colocated":
            return False
        if not bool(self.config.rollout.get("free_cache_engine", True)):
            return False
        server.release_memory()
        return True
