"""Two ways to drive SGLang with the same methods: the in-process offline ``Engine`` and an HTTP server.

:class:`OfflineEngine` wraps ``sglang.srt.entrypoints.engine.Engine`` (its scheduler runs in child processes of
this one). :class:`HttpServerEngine` drives an SGLang server over HTTP: one it launches on ``127.0.0.1`` and
health-checks (:func:`launch_server`), or an existing one given by address, for deployments where the server runs
apart from the trainer (one GPU trains, another serves). Both expose

* ``generate(input_ids, sampling_params, return_logprob)`` -> one dict per request (``output_ids``, ``meta_info``),
* ``begin_weight_update`` / ``update_weights_from_tensor`` / ``end_weight_update``, ``update_weights_from_disk``,
  ``init_weights_update_group`` / ``update_weights_from_distributed``, ``flush_cache``,
* ``release_memory_occupation`` / ``resume_memory_occupation`` (GPU only: SGLang synchronises CUDA there),
* ``context_length``, ``shutdown``,

and raise :class:`SGLangEngineError` when SGLang reports a failure (weight updates answer ``success=False`` rather
than raising, which would otherwise go unnoticed) and :class:`SGLangServerError` when the server is unreachable or
dies, naming the server and its exit code.

Weight tensors cross the process boundary as SGLang expects them: CUDA tensors as CUDA IPC handles (no copy), CPU
tensors through shared memory for the offline engine, and pickled into the request body for an HTTP server (CPU
tensors cannot be shared with an unrelated process).
"""
from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Iterable, Sequence

import torch

__all__ = [
    "SGLangEngineError",
    "SGLangServerError",
    "prepare_sglang_environment",
    "OfflineEngine",
    "HttpServerEngine",
    "launch_server",
    "server_cli_args",
]

logger = logging.getLogger(__name__)

_LIBCUDA_HINT = ("SGLang's kernel package (sgl_kernel) is a CUDA build that loads libcuda.so.1, and this machine "
                 "has no NVIDIA driver. Fix: build the stub driver library and put it on LD_LIBRARY_PATH before "
                 "starting Python: `gcc -shared -fPIC -o DIR/libcuda.so.1 scripts/ci/libcuda_stub.c` and "
                 "`export LD_LIBRARY_PATH=DIR:$LD_LIBRARY_PATH` (scripts/ci/setup_sglang_env.sh does both)")


class SGLangEngineError(RuntimeError):
    """SGLang answered a request with a failure (e.g. a weight update it could not apply)."""


class SGLangServerError(RuntimeError):
    """The SGLang HTTP server is unreachable, did not start, or died."""


def prepare_sglang_environment(on_gpu: bool) -> None:
    """Set up this process before SGLang is imported: its CPU engine path (``SGLANG_USE_CPU_ENGINE=1``, read at
    import time and inherited by the engine's child processes) and a loadable ``libcuda.so.1`` on CPU."""
    if on_gpu:
        return
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    if "sglang.srt.utils.common" in sys.modules:
        common = sys.modules["sglang.srt.utils.common"]
        is_cpu = getattr(common, "is_cpu", None)
        if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1" or (is_cpu is not None and not is_cpu()):
            raise RuntimeError("SGLang was imported in this process before its CPU engine was selected, so it would "
                               "run CUDA code paths. Fix: export SGLANG_USE_CPU_ENGINE=1 before starting Python")
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise RuntimeError(f"{_LIBCUDA_HINT} ({exc})") from exc


def _check(result: Any, what: str) -> Any:
    """SGLang's control calls return ``(success, message[, ...])`` or a dict with ``success``; raise on failure."""
    success, message = True, ""
    if isinstance(result, tuple) and result and isinstance(result[0], bool):
        success, message = result[0], (result[1] if len(result) > 1 else "")
    elif isinstance(result, dict) and "success" in result:
        success, message = bool(result["success"]), result.get("message", "")
    elif hasattr(result, "success"):
        success, message = bool(result.success), getattr(result, "message", "")
    if not success:
        raise SGLangEngineError(f"SGLang {what} failed: {message}")
    return result


def _cuda_ipc_payload(obj: Any) -> bytes:
    """Serialize CUDA tensors (a tensor, or a list of ``(name, tensor)``) as IPC handles, the way SGLang's
    scheduler deserializes them."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    monkey_patch_torch_reductions()
    return MultiprocessingSerializer.serialize(obj)


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` contiguous and alone in its storage: a view into a larger tensor (one expert of a fused MoE
    parameter) is copied, since pickling a view carries its whole storage (every expert, once per view)."""
    tensor = tensor.detach().contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def _inline_payload(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> bytes:
    """Pickle CPU tensors with their data (``torch.save`` storages), which SGLang's safe unpickler accepts."""
    return pickle.dumps([(name, own_storage(t)) for name, t in named_tensors], protocol=pickle.HIGHEST_PROTOCOL)


# ---------------------------------------------------------------------------------------------- offline engine ---
class OfflineEngine:
    """SGLang's offline ``Engine`` behind the adapter interface (see the module docstring).

    Args:
        engine_kwargs: SGLang server arguments (``verl.workers.rollout.sglang_rollout.sampling.
            engine_kwargs_from_config``).
    """

    kind = "engine"

    def __init__(self, engine_kwargs: dict[str, Any]) -> None:
        on_gpu = str(engine_kwargs.get("device", "cuda")) != "cpu"
        prepare_sglang_environment(on_gpu)
        from sglang.srt.entrypoints.engine import Engine

        self.engine_kwargs = dict(engine_kwargs)
        self.on_gpu = on_gpu
        self.tp_size = int(self.engine_kwargs.get("tp_size", 1) or 1)
        self._engine = Engine(**self.engine_kwargs)
        info = self._safe_server_info()
        self._context_length = _context_length_from_info(info, self.engine_kwargs)
        self.max_input_length = _max_input_length_from_info(info)

    def _safe_server_info(self) -> dict:
        try:
            return dict(self._engine.get_server_info())
        except Exception:  # noqa: BLE001 - informational only
            return {}

    @property
    def context_length(self) -> int | None:
        return self._context_length

    def generate(self, input_ids: list[list[int]], sampling_params: list[dict], return_logprob: bool) -> list[dict]:
        if not input_ids:
            return []
        out = self._engine.generate(input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob)
        return out if isinstance(out, list) else [out]

    def begin_weight_update(self) -> None:
        if hasattr(self._engine, "begin_weight_update"):  # SGLang >= 0.5.2x requires a session around updates
            _check(self._engine.begin_weight_update(), "begin_weight_update")

    def end_weight_update(self) -> None:
        if hasattr(self._engine, "end_weight_update"):
            _check(self._engine.end_weight_update(), "end_weight_update")

    def update_weights_from_tensor(self, named_tensors: Sequence[tuple[str, Any]], flush_cache: bool = False) -> None:
        # CPU tensors travel through shared memory, and pickling moves a tensor's storage there in place: send copies,
        # so that the caller's tensors (possibly the actor's own parameters) are left as they are
        tensors = [(name,
                    t.detach().clone() if isinstance(t, torch.Tensor) and not t.is_cuda and not t.is_shared() else t)
                   for name, t in named_tensors]
        _check(self._engine.update_weights_from_tensor(tensors, flush_cache=flush_cache), "update_weights_from_tensor")

    def update_weights_from_disk(self, model_path: str, load_format: str = "auto") -> None:
        # an explicit load_format: the engine's own may be "dummy" (random init), which cannot read files
        _check(self._engine.update_weights_from_disk(model_path, load_format=load_format), "update_weights_from_disk")

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str) -> None:
        _check(
            self._engine.init_weights_update_group(master_address, master_port, rank_offset, world_size, group_name,
                                                   backend), "init_weights_update_group")

    def update_weights_from_distributed(self,
                                        names: list[str],
                                        dtypes: list[str],
                                        shapes: list[list[int]],
                                        group_name: str,
                                        flush_cache: bool = False) -> None:
        _check(self._engine.update_weights_from_distributed(names, dtypes, shapes, group_name, flush_cache=flush_cache),
               "update_weights_from_distributed")

    def flush_cache(self) -> None:
        result = self._engine.flush_cache()
        if result is not None and not isinstance(result, bool):
            _check(result, "flush_cache")

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        if self.on_gpu:  # SGLang calls torch.cuda.synchronize() here, which fails without a GPU
            self._engine.release_memory_occupation(tags=tags)

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        if self.on_gpu:
            self._engine.resume_memory_occupation(tags=tags)

    def shutdown(self) -> None:
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:
            engine.shutdown()


def _context_length_from_info(info: dict, engine_kwargs: dict) -> int | None:
    """Tokens one request may span (prompt + response): the smallest of what the server reports (``max_req_len + 1``
    also accounts for a KV cache smaller than the model's context) and what it was configured with."""
    values = [
        int(v) for v in (engine_kwargs.get("context_length"), info.get("context_length"), info.get("context_len")) if v
    ]
    if info.get("max_req_len"):
        values.append(int(info["max_req_len"]) + 1)
    return min(values) if values else None


def _max_input_length_from_info(info: dict) -> int | None:
    """The longest prompt SGLang accepts (it refuses ``len(prompt) >= max_req_input_len``)."""
    value = info.get("max_req_input_len")
    return int(value) - 1 if value else None


# ------------------------------------------------------------------------------------------------ HTTP server ---
def server_cli_args(engine_kwargs: dict[str, Any]) -> list[str]:
    """``launch_server`` command-line arguments from server-argument keyword arguments (``True`` -> a bare flag,
    ``False`` / ``None`` -> omitted, lists -> several values, dicts -> JSON)."""
    args: list[str] = []
    for key, value in engine_kwargs.items():
        if value is None or value is False:
            continue
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args.append(flag)
            args.extend(str(v) for v in value)
        elif isinstance(value, dict):
            args.extend([flag, json.dumps(value)])
        else:
            args.extend([flag, str(value)])
    return args


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: str | None, lines: int = 30) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 16384))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


class _ServerProcess:
    """A server started by us: its process (own session, so the whole tree can be stopped) and log file."""

    def __init__(self, popen: subprocess.Popen, log_path: str) -> None:
        self.popen = popen
        self.log_path = log_path

    def exit_code(self) -> int | None:
        return self.popen.poll()

    def stop(self, timeout: float = 30.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # children (scheduler, detokenizer) share the session; make sure none outlives the server
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


def _die_with_parent() -> None:
    """In the server process before exec: get SIGTERM when the process that launched it dies (a crashed worker must
    not leave a server holding memory; the server's own children watch the server)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch_server(engine_kwargs: dict[str, Any],
                  host: str = "127.0.0.1",
                  port: int | None = None,
                  timeout_s: float = 600.0,
                  log_path: str | None = None,
                  env: dict[str, str] | None = None) -> tuple[str, _ServerProcess]:
    """Start ``python -m sglang.launch_server`` with ``engine_kwargs`` on ``host:port`` (a free port by default)
    and wait until ``/health`` answers 200. Returns ``(address, process)``; raises :class:`SGLangServerError`
    with the end of the server's log if it exits or is not healthy within ``timeout_s``."""
    on_gpu = str(engine_kwargs.get("device", "cuda")) != "cpu"
    prepare_sglang_environment(on_gpu)  # the server inherits SGLANG_USE_CPU_ENGINE; fail early without libcuda
    port = int(port or _free_port(host))
    kwargs = {k: v for k, v in engine_kwargs.items() if k not in ("host", "port")}
    cmd = [sys.executable, "-m", "sglang.launch_server", *server_cli_args(kwargs), "--host", host, "--port", str(port)]
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"sglang_server_{port}_", suffix=".log")
        os.close(fd)
    proc_env = dict(os.environ if env is None else env)
    if not on_gpu:
        proc_env.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(cmd,
                                 stdout=log,
                                 stderr=subprocess.STDOUT,
                                 env=proc_env,
                                 start_new_session=True,
                                 preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    process = _ServerProcess(popen, log_path)
    address = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        code = process.exit_code()
        if code is not None:
            raise SGLangServerError(f"the SGLang server ({' '.join(cmd)}) exited with code {code} while starting; "
                                    f"last lines of {log_path}:\n{_tail(log_path)}")
        if _healthy(address):
            return address, process
        if time.monotonic() > deadline:
            process.stop()
            raise SGLangServerError(f"the SGLang server at {address} was not healthy after {timeout_s:.0f}s; last "
                                    f"lines of {log_path}:\n{_tail(log_path)}. Fix: raise "
                                    "actor_rollout_ref.rollout.http_server.launch_timeout_s or check the log")
        time.sleep(1.0)


def _healthy(address: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class HttpServerEngine:
    """An SGLang HTTP server behind the adapter interface (see the module docstring).

    Args:
        address: ``http://host:port`` of a running server; ``None`` launches one on ``127.0.0.1`` with
            ``engine_kwargs`` (stopped again by :meth:`shutdown`).
        engine_kwargs: SGLang server arguments for a launched server (also used to learn the device and context
            length of a given one).
        request_timeout_s: seconds one request (a whole generation batch) may take.
        launch_timeout_s: seconds a launched server has to become healthy.
    """

    kind = "http"

    def __init__(self,
                 address: str | None = None,
                 engine_kwargs: dict[str, Any] | None = None,
                 request_timeout_s: float = 3600.0,
                 launch_timeout_s: float = 600.0,
                 log_path: str | None = None) -> None:
        self.engine_kwargs = dict(engine_kwargs or {})
        self.on_gpu = str(self.engine_kwargs.get("device", "cuda")) != "cpu"
        self.request_timeout_s = float(request_timeout_s)
        self._process: _ServerProcess | None = None
        if address:
            self.address = str(address).rstrip("/")
            if not self.address.startswith(("http://", "https://")):
                self.address = "http://" + self.address
            if not _healthy(self.address, timeout=30.0):
                raise SGLangServerError(f"no healthy SGLang server at {self.address} (GET /health). Fix: start it "
                                        "(`python -m sglang.launch_server ...`) or correct "
                                        "actor_rollout_ref.rollout.http_server.address")
        else:
            self.address, self._process = launch_server(self.engine_kwargs,
                                                        timeout_s=launch_timeout_s,
                                                        log_path=log_path)
        info = self._get_json("/server_info", default={})
        info = info if isinstance(info, dict) else {}
        self._context_length = _context_length_from_info(info, self.engine_kwargs)
        self.max_input_length = _max_input_length_from_info(info)
        self.tp_size = int((info or {}).get("tp_size") or self.engine_kwargs.get("tp_size") or 1)

    @property
    def is_local(self) -> bool:
        """True when the server runs on this machine (CUDA IPC and plain shared files reach it)."""
        host = self.address.split("://", 1)[-1].split(":", 1)[0].strip("[]")
        return host in ("127.0.0.1", "localhost", "::1", socket.gethostname())

    @property
    def launched(self) -> bool:
        return self._process is not None

    @property
    def context_length(self) -> int | None:
        return self._context_length

    # -------------------------------------------------------------------------------------------- transport ---
    def _describe_death(self) -> str:
        if self._process is None:
            return "the server may have died or be unreachable"
        code = self._process.exit_code()
        if code is None:
            return "its process is still running"
        tail = _tail(self._process.log_path, 15)
        return f"its process exited with code {code}; last lines of {self._process.log_path}:\n{tail}"

    def _request(self, path: str, payload: Any = None, timeout: float | None = None, method: str = "POST") -> bytes:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(f"{self.address}{path}",
                                         data=data,
                                         method=method if data is not None else "GET",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.request_timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", errors="replace")[:2000]
            raise SGLangEngineError(f"SGLang server {self.address}{path} answered HTTP {exc.code}: {body}") from exc
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            # give a just-killed process a moment to be reaped, so the message can name its exit code
            if self._process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._process.popen.wait(timeout=2.0)
            raise SGLangServerError(f"the SGLang server at {self.address} failed during {path} "
                                    f"({type(exc).__name__}: {exc}); {self._describe_death()}") from exc

    def _post_json(self, path: str, payload: Any = None, timeout: float | None = None) -> Any:
        raw = self._request(path, payload if payload is not None else {}, timeout=timeout)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode("utf-8", errors="replace")

    def _get_json(self, path: str, default: Any = None) -> Any:
        try:
            raw = self._request(path, None, timeout=30.0, method="GET")
            return json.loads(raw)
        except (SGLangEngineError, SGLangServerError, ValueError):
            return default

    # ----------------------------------------------------------------------------------------------- methods ---
    def generate(self, input_ids: list[list[int]], sampling_params: list[dict], return_logprob: bool) -> list[dict]:
        if not input_ids:
            return []
        out = self._post_json("/generate", {
            "input_ids": input_ids,
            "sampling_params": sampling_params,
            "return_logprob": bool(return_logprob)
        })
        if isinstance(out, dict) and "error" in out:
            raise SGLangEngineError(f"SGLang server {self.address}/generate failed: {out['error']}")
        out = out if isinstance(out, list) else [out]
        if len(out) != len(input_ids):
            raise SGLangEngineError(f"SGLang server {self.address}/generate returned {len(out)} results for "
                                    f"{len(input_ids)} requests")
        return out

    def begin_weight_update(self) -> None:
        self._optional_session_call("/begin_weight_update")

    def end_weight_update(self) -> None:
        self._optional_session_call("/end_weight_update")

    def _optional_session_call(self, path: str) -> None:
        try:
            _check(self._post_json(path, {}), path.strip("/"))
        except SGLangEngineError as exc:
            if "HTTP 404" in str(exc):  # an SGLang version without update sessions
                return
            raise

    def update_weights_from_tensor(self,
                                   named_tensors: Sequence[tuple[str, torch.Tensor]],
                                   flush_cache: bool = False) -> None:
        tensors = list(named_tensors)
        on_cuda = any(t.is_cuda for _, t in tensors)
        if on_cuda and not self.is_local:
            raise SGLangEngineError(f"update_weights_from_tensor sends CUDA IPC handles, which only reach a server on "
                                    f"this machine, not {self.address}. Fix: set actor_rollout_ref.rollout.http_server."
                                    "weight_sync=distributed (or disk)")
        payload = _cuda_ipc_payload(list(tensors)) if on_cuda else _inline_payload(tensors)
        encoded = base64.b64encode(payload).decode("ascii")
        _check(
            self._post_json("/update_weights_from_tensor", {
                "serialized_named_tensors": [encoded] * self.tp_size,
                "flush_cache": bool(flush_cache)
            }), "update_weights_from_tensor")

    def update_weights_from_disk(self, model_path: str, load_format: str = "auto") -> None:
        _check(self._post_json("/update_weights_from_disk", {
            "model_path": model_path,
            "load_format": load_format
        }), "update_weights_from_disk")

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str) -> None:
        _check(
            self._post_json(
                "/init_weights_update_group", {
                    "master_address": master_address,
                    "master_port": int(master_port),
                    "rank_offset": int(rank_offset),
                    "world_size": int(world_size),
                    "group_name": group_name,
                    "backend": backend
                }), "init_weights_update_group")

    def update_weights_from_distributed(self,
                                        names: list[str],
                                        dtypes: list[str],
                                        shapes: list[list[int]],
                                        group_name: str,
                                        flush_cache: bool = False) -> None:
        _check(
            self._post_json(
                "/update_weights_from_distributed", {
                    "names": list(names),
                    "dtypes": list(dtypes),
                    "shapes": [list(s) for s in shapes],
                    "group_name": group_name,
                    "flush_cache": bool(flush_cache)
                }), "update_weights_from_distributed")

    def flush_cache(self) -> None:
        self._request("/flush_cache", {})

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        if self.on_gpu:  # SGLang calls torch.cuda.synchronize() here, which fails without a GPU
            self._post_json("/release_memory_occupation", {"tags": tags} if tags else {})

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        if self.on_gpu:
            self._post_json("/resume_memory_occupation", {"tags": tags} if tags else {})

    def shutdown(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.stop()


def run_in_thread(fn: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict]:
    """Start ``fn(*args, **kwargs)`` in a thread (for HTTP calls that block until a collective we take part in
    completes); ``result["error"]`` / ``result["value"]`` are set when it finishes."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def dtype_names(tensors: Iterable[torch.Tensor]) -> list[str]:
    """``torch.float32`` -> ``"float32"`` (the names SGLang's weight-update requests take)."""
    return [str(t.dtype).replace("torch.", "") for t in tensors]
