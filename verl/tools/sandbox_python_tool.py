"""Run model-written Python in a sandboxed subprocess.

Each call runs ``python -I -S -c CODE`` (isolated: no user site, no environment-variable configuration) in a fresh
temporary working directory that is deleted afterwards, with

* a wall-clock timeout (``timeout_s``; the whole process group is killed) and a CPU-time limit (``RLIMIT_CPU``),
* an address-space limit (``memory_limit_mb`` -> ``RLIMIT_AS``), a file-size limit (``RLIMIT_FSIZE``), no core dumps,
  at most 64 open files,
* no network: when ``unshare -rn`` works (Linux user namespaces) the process gets its own empty network namespace
  (only a down loopback). Where it does not (containers that forbid user namespaces, macOS), ``network: require``
  makes the tool refuse to run; the default ``network: best_effort`` runs without the namespace and records
  ``network_isolated: False`` in the metrics, so use a container without network there,
* an empty environment apart from ``PATH`` and ``LANG``.

stdout (and stderr, on failure) are returned, truncated to ``max_output_chars``.
"""
from __future__ import annotations

import asyncio
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

__all__ = ["SandboxPythonTool", "run_python_sandboxed", "network_isolation_available"]

DEFAULT_SCHEMA = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run a Python program and return what it prints",
        "parameters": {
            "type": "object",
            "properties": {
                "code": {
                    "type": "string",
                    "description": "the program"
                }
            },
            "required": ["code"]
        }
    }
}


@functools.lru_cache(maxsize=1)
def network_isolation_available() -> bool:
    """Whether ``unshare -rn`` (a private, empty network namespace) works here."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _limits(memory_mb: int, cpu_s: int, file_mb: int) -> Any:

    def apply() -> None:
        os.setsid()
        mem = int(memory_mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(file_mb) << 20, int(file_mb) << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    return apply


def run_python_sandboxed(code: str,
                         timeout_s: float = 5.0,
                         memory_limit_mb: int = 512,
                         file_limit_mb: int = 16,
                         network: str = "best_effort",
                         max_output_chars: int = 4096) -> dict[str, Any]:
    """Run ``code``; returns ``{"ok", "stdout", "stderr", "returncode", "timed_out", "network_isolated"}``."""
    if network not in ("best_effort", "require", "allow"):
        raise ValueError(f"network must be best_effort, require or allow; got {network!r}")
    isolated = network != "allow" and network_isolation_available()
    if network == "require" and not isolated:
        raise RuntimeError("network isolation was required (network: require) but `unshare -rn` does not work on this "
                           "machine. Fix: run in a container without network and set network: best_effort")
    workdir = tempfile.mkdtemp(prefix="verl_sandbox_")
    cmd = [sys.executable, "-I", "-S", "-c", code]
    if isolated:
        cmd = ["unshare", "-rn", *cmd]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    timed_out = False
    try:
        proc = subprocess.Popen(cmd,
                                cwd=workdir,
                                env=env,
                                stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                preexec_fn=_limits(memory_limit_mb, max(1,
                                                                        int(timeout_s) + 1), file_limit_mb))
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            out, err = proc.communicate()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stdout = out.decode("utf-8", errors="replace")[:max_output_chars]
    stderr = err.decode("utf-8", errors="replace")[-max_output_chars:]
    return {
        "ok": proc.returncode == 0 and not timed_out,
        "stdout": stdout,
        "stderr": stderr,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "network_isolated": isolated,
    }


class SandboxPythonTool(BaseTool):
    """``python(code)`` -> its stdout (or the error). ``config``: ``timeout_s`` (5), ``memory_limit_mb`` (512),
    ``file_limit_mb`` (16), ``network`` (``best_effort`` | ``require`` | ``allow``), ``max_output_chars`` (4096),
    ``max_concurrency`` (2: sandboxes running at once in this process)."""

    def __init__(self, config: dict | None = None, tool_schema: OpenAIFunctionToolSchema | None = None) -> None:
        super().__init__(config or {}, tool_schema or OpenAIFunctionToolSchema.from_dict(DEFAULT_SCHEMA))
        self._semaphore: asyncio.Semaphore | None = None
        self._semaphore_loop = None

    def _sem(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._semaphore is None or self._semaphore_loop is not loop:
            self._semaphore = asyncio.Semaphore(int(self.config.get("max_concurrency", 2)))
            self._semaphore_loop = loop
        return self._semaphore

    async def execute(self, instance_id: str, parameters: dict[str, Any],
                      **kwargs: Any) -> tuple[ToolResponse, float, dict]:
        code = parameters.get("code") if isinstance(parameters, dict) else None
        if not isinstance(code, str) or not code.strip():
            return ToolResponse(text="Error: pass the program as a string argument 'code'"), 0.0, {"ok": False}
        run = functools.partial(run_python_sandboxed,
                                code,
                                timeout_s=float(self.config.get("timeout_s", 5.0)),
                                memory_limit_mb=int(self.config.get("memory_limit_mb", 512)),
                                file_limit_mb=int(self.config.get("file_limit_mb", 16)),
                                network=str(self.config.get("network", "best_effort")),
                                max_output_chars=int(self.config.get("max_output_chars", 4096)))
        async with self._sem():
            result = await asyncio.to_thread(run)
        if result["timed_out"]:
            text = f"Error: timed out after {self.config.get('timeout_s', 5.0)}s"
        elif result["ok"]:
            text = result["stdout"]
        else:
            text = (result["stdout"] + "\n" + result["stderr"]).strip()
        metrics = {k: result[k] for k in ("ok", "returncode", "timed_out", "network_isolated")}
        return ToolResponse(text=text), 0.0, metrics
