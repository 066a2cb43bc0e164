"""The actor/rollout worker of ``actor_rollout_ref.rollout.mode=async`` (server-mode rollouts).

Instead of an in-process rollout engine, rank 0 launches a rollout server on ``127.0.0.1`` (the HF fallback server,
:mod:`verl.workers.rollout.hf.hf_server`, which speaks SGLang's HTTP API) with the actor's model. The trainer's
:class:`~verl.experimental.agent_loop.AgentLoopManager` drives it through :meth:`get_rollout_server_addresses`, and
:meth:`update_rollout_weights` streams the actor's current (FSDP-sharded) weights to it after every update: all ranks
join each bucket's gather, rank 0 posts the buckets.

The server runs in its own process session; it is stopped when the worker shuts down, and a small watchdog process
stops it when the worker process dies without running its exit handlers (``ray.kill``).
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
        self._watchdog = None
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
                self._launch_thread = threading.Thread(target=self._launch_server, daemon=True)
                self._launch_thread.start()
        try:
            super().init_model()
        except BaseException:
            if self._launch_thread is not None:  # do not leave a server behind a failed build
                self._launch_thread.join()
                self._launch_thread = None
                if self._launch.get("process") is not None:
                    self.server_process = self._launch.pop("process")
                    self._stop_server()
            raise

    def _check_server_backend(self) -> None:
        from verl.utils.device import is_cuda_available

        name = str(self.config.rollout.get("name", "hf"))
        if name != "hf" or is_cuda_available():
            raise NotImplementedError(f"actor_rollout_ref.rollout.mode=async with rollout.name={name!r} on "
                                      f"{'CUDA' if is_cuda_available() else 'CPU'}: only the HF fallback server on CPU "
                                      "is wired into the trainer so far. Fix: set actor_rollout_ref.rollout.name=hf "
                                      "and trainer.device=cpu, or actor_rollout_ref.rollout.mode=sync")

    def _launch_server(self) -> None:
        from verl.workers.rollout.async_server import launch_hf_server

        rollout_cfg = self.config.rollout
        try:
            self._launch["process"] = launch_hf_server(str(self.config.model.path),
                                                       seed=int(rollout_cfg.get("seed", 0) or 0),
                                                       timeout_s=float(
                                                           rollout_cfg.get("server_launch_timeout_s", 300) or 300))
        except BaseException as exc:  # noqa: BLE001 - re-raised in _build_rollout
            self._launch["error"] = exc
            return
        # stops the server if this worker process dies without running its exit handlers (ray.kill)
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG,
             str(os.getpid()), str(self._launch["process"].pid)],
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
        self.server_process = self._launch["process"]
        atexit.register(self._stop_server)
        print(f"[verl] rollout server (hf) at {self.server_process.address}, log {self.server_process.log_path}",
              flush=True)
        return None, None

    def _stop_server(self) -> None:
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
        return self.server_process.address if self.server_process is not None else None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def update_rollout_weights(self) -> dict[str, float]:
        """Send the actor's current weights to the rollout server(s); every rank must run it (FSDP gathers).
        Returns ``{"buckets", "bytes", "weight_version", "seconds"}`` (the server's answers on rank 0)."""
        from verl.utils.fsdp_utils import load_fsdp_model_to_gpu, offload_fsdp_model_to_cpu
        from verl.workers.rollout.async_server import push_module_weights

        if self.actor_module_fsdp is None:
            raise RuntimeError("update_rollout_weights before init_model(); call init_model() on the worker group")
        start = time.perf_counter()
        bucket_mb = float(self.config.rollout.get("update_weights_bucket_megabytes", 512) or 512)
        addresses = [self.server_process.address] if self.server_process is not None else []
        if self._is_offload_param:
            load_fsdp_model_to_gpu(self.actor_module_fsdp)
        try:
            stats = push_module_weights(self.actor_module_fsdp,
                                        addresses,
                                        bucket_bytes=int(bucket_mb * (1 << 20)),
                                        send=bool(addresses))
        finally:
            if self._is_offload_param:
                offload_fsdp_model_to_cpu(self.actor_module_fsdp)
        out = {k: float(v) for k, v in stats.items()}
        out["seconds"] = time.perf_counter() - start
        return out
