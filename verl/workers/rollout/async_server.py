"""Client side of server-mode rollouts (``actor_rollout_ref.rollout.mode=async``): launch a rollout server on
``127.0.0.1``, wait until it is healthy, talk to it, and stop it.

The servers speak SGLang's HTTP API, so one client drives both SGLang's server and the HF fallback server
(:mod:`verl.workers.rollout.hf.hf_server`, for CPU tests):

================================  =====================================================================================
endpoint                          request -> answer
================================  =====================================================================================
``POST /generate``                ``{input_ids: [int] | [[int]], sampling_params: {...} | [{...}], return_logprob}``
                                  -> one result (or a list): ``{output_ids, meta_info: {finish_reason: {type},
                                  output_token_logprobs: [[logprob, token_id, null], ...], weight_version, ...}}``
``POST /update_weights_from_tensor``  ``{serialized_named_tensors: [base64], load_format, flush_cache}``
``POST /update_weights_from_disk``    ``{model_path, load_format}`` (an HF model directory or one safetensors file)
``POST /flush_cache``, ``GET /health``, ``GET /server_info``, ``POST /release_memory_occupation``,
``POST /resume_memory_occupation``
================================  =====================================================================================

vLLM's OpenAI-compatible server is driven token-in/token-out through ``POST /v1/completions`` (prompt token ids,
``return_token_ids``, ``logprobs=0``) by :class:`OpenAICompletionsClient`; :func:`make_rollout_client` picks the
client for a server's protocol, and :mod:`verl.workers.rollout.server_adapters` launches and updates each kind.

Every failure to reach a server (refused, reset mid-request, killed, timed out) becomes a
:class:`RolloutServerError` naming the server, the request and, for a server we launched, its exit code and the end
of its log: a rollout never hangs on a dead server.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

__all__ = [
    "RolloutServerError",
    "TokenOutput",
    "ServerProcess",
    "AsyncRolloutClient",
    "launch_hf_server",
    "wait_healthy",
    "post_json",
    "get_json",
    "parse_generate_result",
    "serialize_named_tensors",
    "push_weights",
    "push_module_weights",
    "ServerRef",
    "OpenAICompletionsClient",
    "make_rollout_client",
]


class RolloutServerError(RuntimeError):
    """A rollout server is unreachable, died, timed out, or answered a request with an error."""


@dataclass
class TokenOutput:
    """What one generation request returns: exactly the sampled tokens (token-in/token-out) and their log-probs."""

    token_ids: list[int]
    log_probs: list[float] | None = None
    stop_reason: str = "stop"  # "stop" (EOS / a stop token), "length" (max_new_tokens) or "abort"
    weight_version: int | None = None
    extra: dict = field(default_factory=dict)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: str | None, lines: int = 20) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 16384))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


class ServerProcess:
    """A server we started: its process (in its own session, so the whole tree stops), address and log file."""

    def __init__(self, popen: subprocess.Popen, address: str, log_path: str) -> None:
        self.popen = popen
        self.address = address
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def exit_code(self) -> int | None:
        return self.popen.poll()

    def describe(self) -> str:
        """One line about the process's state (for error messages)."""
        code = self.exit_code()
        if code is None:
            return f"its process (pid {self.pid}) is still running"
        return f"its process (pid {self.pid}) exited with code {code}; last lines of {self.log_path}:\n" \
               f"{_tail(self.log_path)}"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL whatever is left of the process group."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class ServerRef:
    """A server another process launched (e.g. a worker on this node): its pid and log file, to name them in errors
    the way :class:`ServerProcess` does (same ``exit_code`` / ``describe`` methods)."""

    def __init__(self, address: str, pid: int | None, log_path: str | None) -> None:
        self.address = address
        self.pid = pid
        self.log_path = log_path

    def exit_code(self) -> int | None:
        """``None`` while the process runs; ``-1`` once it is gone (not our child: its code is unknown)."""
        if self.pid is None:
            return None
        try:
            os.kill(int(self.pid), 0)
        except ProcessLookupError:
            return -1
        except PermissionError:
            return None
        return None

    def describe(self) -> str:
        if self.pid is None:
            return "the server may have died or be unreachable"
        if self.exit_code() is None:
            return f"its process (pid {self.pid}) is still running; log {self.log_path}"
        tail = _tail(self.log_path) if self.log_path and os.path.exists(self.log_path) else "(log not readable here)"
        return f"its process (pid {self.pid}) is gone; last lines of {self.log_path}:\n{tail}"


# ------------------------------------------------------------------------------------------- sync transport ---
def _request(address: str, path: str, payload: Any = None, timeout: float = 60.0) -> bytes:
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(f"{address}{path}",
                                     data=data,
                                     method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", errors="replace")[:2000]
        raise RolloutServerError(f"rollout server {address}{path} answered HTTP {exc.code}: {body}") from exc
    except (urllib.error.URLError, ConnectionError, OSError) as exc:
        raise RolloutServerError(f"rollout server {address} failed during {path} ({type(exc).__name__}: {exc}); "
                                 "the server may have died or be unreachable") from exc


def post_json(address: str, path: str, payload: Any = None, timeout: float = 60.0) -> Any:
    """POST ``payload`` as JSON, return the decoded answer; raises :class:`RolloutServerError`."""
    raw = _request(address, path, payload if payload is not None else {}, timeout)
    return json.loads(raw) if raw else None


def get_json(address: str, path: str, timeout: float = 30.0) -> Any:
    return json.loads(_request(address, path, None, timeout))


def _healthy(address: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(address: str, timeout_s: float = 120.0, process: ServerProcess | None = None) -> None:
    """Poll ``GET /health`` until it answers 200; fail early (with the log) if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.exit_code() is not None:
            raise RolloutServerError(f"the rollout server at {address} exited while starting; {process.describe()}")
        if _healthy(address):
            return
        if time.monotonic() > deadline:
            detail = process.describe() if process is not None else "no process of ours"
            raise RolloutServerError(f"the rollout server at {address} was not healthy after {timeout_s:.0f}s "
                                     f"({detail}). Fix: check its log, or raise the launch timeout")
        time.sleep(0.2)


def launch_hf_server(model_path: str,
                     host: str = "127.0.0.1",
                     port: int | None = None,
                     timeout_s: float = 180.0,
                     log_path: str | None = None,
                     seed: int = 0,
                     dtype: str = "float32",
                     max_batch_size: int = 256,
                     num_threads: int | None = None,
                     extra_args: Sequence[str] = ()) -> ServerProcess:
    """Start the HF fallback server (``python -m verl.workers.rollout.hf.hf_server``) on ``host:port`` (a free port
    by default) and wait until it is healthy. Stop it with :meth:`ServerProcess.stop` (or ``with``)."""
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"rollout server model directory {model_path!r} does not exist. Fix: set "
                                "actor_rollout_ref.model.path to a Hugging Face model directory")
    port = int(port or _free_port(host))
    cmd = [
        sys.executable, "-m", "verl.workers.rollout.hf.hf_server", "--model-path", model_path, "--host", host, "--port",
        str(port), "--seed",
        str(seed), "--dtype", dtype, "--max-batch-size",
        str(max_batch_size), *extra_args
    ]
    if num_threads:
        cmd += ["--num-threads", str(num_threads)]
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"hf_server_{port}_", suffix=".log")
        os.close(fd)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    process = ServerProcess(popen, f"http://{host}:{port}", log_path)
    try:
        wait_healthy(process.address, timeout_s, process)
    except BaseException:
        process.stop()
        raise
    return process


# ---------------------------------------------------------------------------------------------- weight push ---
def serialize_named_tensors(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """``(name, tensor)`` pairs -> base64 of a safetensors blob (no pickle crosses the wire)."""
    from safetensors.torch import save

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in named_tensors}
    return base64.b64encode(save(tensors)).decode("ascii")


def push_weights(address: str,
                 buckets: Iterable[Sequence[tuple[str, torch.Tensor]]],
                 timeout: float = 600.0) -> dict[str, int]:
    """Send weights bucket by bucket (``POST /update_weights_from_tensor``, safetensors payload), then flush the
    server's cache. Returns ``{"buckets", "bytes", "weight_version"}``."""
    stats = {"buckets": 0, "bytes": 0, "weight_version": -1}
    for bucket in buckets:
        bucket = list(bucket)
        if not bucket:
            continue
        answer = post_json(address,
                           "/update_weights_from_tensor", {
                               "serialized_named_tensors": [serialize_named_tensors(bucket)],
                               "load_format": "safetensors",
                               "flush_cache": False
                           },
                           timeout=timeout)
        if isinstance(answer, dict) and not answer.get("success", True):
            raise RolloutServerError(f"rollout server {address} rejected a weight bucket: {answer.get('message')}")
        stats["buckets"] += 1
        stats["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
        if isinstance(answer, dict) and answer.get("weight_version") is not None:
            stats["weight_version"] = int(answer["weight_version"])
    post_json(address, "/flush_cache", {}, timeout=timeout)
    return stats


def push_module_weights(module: torch.nn.Module,
                        addresses: Sequence[str],
                        bucket_bytes: int = 512 << 20,
                        send: bool = True) -> dict[str, int]:
    """Stream a (possibly FSDP2-sharded) module's full weights to rollout servers in buckets of about
    ``bucket_bytes`` (``rollout.update_weights_bucket_megabytes``).

    Every rank of the module's mesh must call this (each bucket's gather is a collective); only ranks with
    ``send=True`` (e.g. rank 0, or one rank per server) post the buckets to ``addresses``.
    """
    from verl.utils.fsdp_utils import iter_full_params_in_buckets
    from verl.workers.sharding_manager.fsdp_hf import _clean_name

    stats = {"buckets": 0, "bytes": 0, "weight_version": -1}
    for bucket in iter_full_params_in_buckets(module, bucket_bytes=bucket_bytes, to_cpu=True):
        if not send:
            continue
        bucket = [(_clean_name(name), tensor) for name, tensor in bucket]
        for address in addresses:
            answer = post_json(address,
                               "/update_weights_from_tensor", {
                                   "serialized_named_tensors": [serialize_named_tensors(bucket)],
                                   "load_format": "safetensors",
                                   "flush_cache": False
                               },
                               timeout=600.0)
            if isinstance(answer, dict) and answer.get("weight_version") is not None:
                stats["weight_version"] = int(answer["weight_version"])
        stats["buckets"] += 1
        stats["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
    if send:
        for address in addresses:
            post_json(address, "/flush_cache", {})
    return stats


# -------------------------------------------------------------------------------------------- async client ---
def parse_generate_result(result: dict) -> TokenOutput:
    """One SGLang-style ``/generate`` result -> :class:`TokenOutput`."""
    if not isinstance(result, dict) or "output_ids" not in result:
        raise RolloutServerError(f"unexpected /generate result (no output_ids): {str(result)[:500]}")
    meta = result.get("meta_info") or {}
    log_probs = None
    if meta.get("output_token_logprobs") is not None:
        log_probs = [float(entry[0]) for entry in meta["output_token_logprobs"]]
    finish = meta.get("finish_reason") or {}
    reason = finish.get("type", "stop") if isinstance(finish, dict) else str(finish)
    version = meta.get("weight_version")
    try:  # the HF server counts updates; SGLang reports a label ("default" until one is set)
        version = int(version) if version is not None else None
    except (TypeError, ValueError):
        version = None
    return TokenOutput(token_ids=[int(t) for t in result["output_ids"]],
                       log_probs=log_probs,
                       stop_reason=str(reason),
                       weight_version=version,
                       extra={
                           k: v for k, v in meta.items() if k != "output_token_logprobs"
                       })


class AsyncRolloutClient:
    """asyncio client of one rollout server (aiohttp). One instance per event loop; close it (or ``async with``).

    Args:
        address: ``http://host:port``.
        timeout_s: seconds one request may take in total (a dead or stuck server never blocks longer).
        process: the server's :class:`ServerProcess` when we launched it, to name its exit code in errors.
    """

    def __init__(self, address: str, timeout_s: float = 600.0, process: ServerProcess | None = None) -> None:
        self.address = str(address).rstrip("/")
        if not self.address.startswith(("http://", "https://")):
            self.address = "http://" + self.address
        self.timeout_s = float(timeout_s)
        self.process = process
        self._session = None

    async def _get_session(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=min(30.0, self.timeout_s)))
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> "AsyncRolloutClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _death_detail(self) -> str:
        if self.process is None:
            return "the server may have died or be unreachable"
        for _ in range(20):  # give a just-killed process a moment to be reaped, so the message has its exit code
            if self.process.exit_code() is not None:
                break
            await asyncio.sleep(0.1)
        return self.process.describe()

    async def post(self, path: str, payload: Any) -> Any:
        """POST JSON, return the decoded answer; any transport failure or HTTP error -> RolloutServerError."""
        import aiohttp

        session = await self._get_session()
        try:
            async with session.post(f"{self.address}{path}", json=payload) as response:
                body = await response.read()
                if response.status != 200:
                    raise RolloutServerError(f"rollout server {self.address}{path} answered HTTP {response.status}: "
                                             f"{body.decode('utf-8', errors='replace')[:2000]}")
                return json.loads(body) if body else None
        except asyncio.TimeoutError as exc:
            raise RolloutServerError(f"rollout server {self.address}{path} did not answer within {self.timeout_s:.0f}s"
                                     f"; {await self._death_detail()}") from exc
        except (aiohttp.ClientError, ConnectionError, OSError) as exc:
            raise RolloutServerError(f"rollout server {self.address} failed during {path} ({type(exc).__name__}: "
                                     f"{exc}); {await self._death_detail()}") from exc

    async def generate(self,
                       prompt_ids: list[int],
                       sampling_params: dict[str, Any],
                       return_logprob: bool = True) -> TokenOutput | list[TokenOutput]:
        """Sample a continuation of ``prompt_ids``; a list of outputs when ``sampling_params["n"] > 1``."""
        result = await self.post(
            "/generate", {
                "input_ids": [int(t) for t in prompt_ids],
                "sampling_params": dict(sampling_params),
                "return_logprob": bool(return_logprob)
            })
        if isinstance(result, list):
            return [parse_generate_result(r) for r in result]
        return parse_generate_result(result)


def _openai_request(prompt_ids: list[int], sampling_params: dict[str, Any], model: str,
                    return_logprob: bool) -> dict[str, Any]:
    """SGLang-named sampling parameters -> a vLLM ``/v1/completions`` body, token ids in and out."""
    renamed = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "sampling_seed": "seed"}
    body: dict[str, Any] = {"model": model, "prompt": [int(t) for t in prompt_ids], "max_tokens": 128}
    for key, value in sampling_params.items():
        if value is None:
            continue
        body[renamed.get(key, key)] = value
    body.update(return_token_ids=True,
                return_tokens_as_token_ids=True,
                skip_special_tokens=False,
                logprobs=0 if return_logprob else None,
                stream=False)
    return {k: v for k, v in body.items() if v is not None}


def parse_completion_choice(choice: dict) -> TokenOutput:
    """One ``/v1/completions`` choice (with ``return_token_ids``) -> :class:`TokenOutput`."""
    ids = choice.get("token_ids")
    logprobs = choice.get("logprobs") or {}
    if ids is None:  # older servers: the ids only as "token_id:N" strings of the log-prob tokens
        tokens = logprobs.get("tokens")
        if tokens is None:
            raise RolloutServerError(f"unexpected /v1/completions choice (no token_ids): {str(choice)[:500]}")
        ids = [int(str(t).split(":", 1)[1]) for t in tokens]
    log_probs = logprobs.get("token_logprobs")
    if log_probs is not None:
        log_probs = [float(lp) if lp is not None else 0.0 for lp in log_probs][:len(ids)]
    reason = choice.get("finish_reason") or "stop"
    return TokenOutput(token_ids=[int(t) for t in ids],
                       log_probs=log_probs,
                       stop_reason="length" if reason == "length" else ("abort" if reason == "abort" else "stop"),
                       extra={"stop_reason": choice.get("stop_reason")})


class OpenAICompletionsClient(AsyncRolloutClient):
    """asyncio client of vLLM's OpenAI-compatible server, token-in/token-out: ``generate`` posts the prompt ids to
    ``/v1/completions`` (``return_token_ids``, ``logprobs=0`` for the sampled tokens' log-probs) and returns the
    same :class:`TokenOutput` as the SGLang-API client."""

    def __init__(self, address: str, timeout_s: float = 600.0, process: Any = None, model: str | None = None) -> None:
        super().__init__(address, timeout_s=timeout_s, process=process)
        self.model = model

    async def _model_name(self) -> str:
        if self.model is None:
            session = await self._get_session()
            try:
                async with session.get(f"{self.address}/v1/models") as response:
                    data = json.loads(await response.read())
                self.model = str(data["data"][0]["id"])
            except Exception as exc:  # noqa: BLE001 - any failure here means the server cannot serve us
                raise RolloutServerError(f"rollout server {self.address}/v1/models did not name a model "
                                         f"({type(exc).__name__}: {exc}); {await self._death_detail()}") from exc
        return self.model

    async def generate(self,
                       prompt_ids: list[int],
                       sampling_params: dict[str, Any],
                       return_logprob: bool = True) -> TokenOutput | list[TokenOutput]:
        body = _openai_request(prompt_ids, dict(sampling_params), await self._model_name(), return_logprob)
        result = await self.post("/v1/completions", body)
        choices = sorted((result or {}).get("choices") or [], key=lambda c: int(c.get("index", 0)))
        if not choices:
            raise RolloutServerError(f"rollout server {self.address}/v1/completions returned no choices: "
                                     f"{str(result)[:500]}")
        outputs = [parse_completion_choice(c) for c in choices]
        return outputs if len(outputs) > 1 else outputs[0]


def make_rollout_client(address: str, api: str = "sglang", timeout_s: float = 600.0, process: Any = None) -> Any:
    """The client of a server speaking ``api``: ``"sglang"`` (``/generate``: SGLang and the HF server) or
    ``"openai"`` (vLLM's ``/v1/completions``)."""
    if api == "sglang":
        return AsyncRolloutClient(address, timeout_s=timeout_s, process=process)
    if api == "openai":
        return OpenAICompletionsClient(address, timeout_s=timeout_s, process=process)
    raise ValueError(f"unknown rollout server API {api!r}; expected 'sglang' or 'openai'")
