"""Run megatron-core on CPU (gloo): the few CUDA-only calls of megatron-core 0.16 redirected to the CPU.

Megatron-core's layers, pipeline schedules, DDP wrapper, distributed optimizer and dist checkpointing are device
agnostic except for a handful of hard-wired ``torch.cuda`` calls and ``device="cuda"`` tensor factories. Without
CUDA (``verl.utils.device.is_cuda_available()`` is False) this module

* :func:`apply_cpu_patches` (once per process): ``torch.cuda.current_device`` returns ``"cpu"`` (megatron passes it
  as a ``device=`` argument), ``torch.cuda.synchronize`` / ``empty_cache`` / ``manual_seed`` do nothing,
  ``torch.cuda.get_rng_state`` is the CPU generator's, and the RNG tracker of ``megatron.core.tensor_parallel.random``
  forks the CPU generator instead of the CUDA one (dropout in TP regions stays reproducible per TP rank); the
  CUDA stream calls of the MoE all-to-all token dispatcher (``torch.cuda.current_stream`` / ``torch.cuda.stream``
  and its device-to-host side stream) get one stand-in CPU stream whose events are always complete, so that
  dispatcher runs over gloo as on GPUs;
* :func:`device_scope` (a context manager, per call): a ``TorchFunctionMode`` that turns ``device="cuda"`` /
  ``Tensor.cuda()`` / ``.to("cuda")`` into the CPU, drops ``pin_memory=True`` (no pinned allocator without CUDA;
  megatron's context-parallel rotary slicing asks for it) and makes ``Tensor.type()`` report ``torch.cuda.*Tensor``
  names, which megatron's optimizers check before accepting a parameter.

With CUDA both are no-ops, so the same worker code runs on GPUs untouched. Everything here is confined to megatron's
use: verl code asks :mod:`verl.utils.device`, never ``torch.cuda``.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

from verl.utils.device import is_cuda_available

__all__ = ["apply_cpu_patches", "device_scope", "cpu_patches_applied"]

_LOCK = threading.Lock()
_APPLIED = False


def cpu_patches_applied() -> bool:
    """Whether :func:`apply_cpu_patches` changed this process."""
    return _APPLIED


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # a bare int means a CUDA ordinal (torch.cuda.current_device() style); bools are not devices
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA tensor placement to the CPU (see the module docstring)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.cuda:
            return args[0]
        if kwargs.get("pin_memory"):  # no pinned-memory allocator without CUDA (megatron's CP rotary index)
            kwargs["pin_memory"] = False
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class _CpuEvent:
    """A completed event: CPU work is synchronous."""

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True


class _CpuStream:
    """The one stream of CPU execution (stands in for ``torch.cuda.Stream`` in megatron's MoE dispatcher)."""

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> _CpuEvent:
        return _CpuEvent()

    def synchronize(self) -> None:
        return None


_CPU_STREAM = _CpuStream()


def apply_cpu_patches() -> bool:
    """Patch the CUDA-only calls megatron-core makes (no-op with CUDA, idempotent). Returns whether patched."""
    global _APPLIED
    if is_cuda_available():
        return False
    with _LOCK:
        if _APPLIED:
            return True
        from megatron.core.tensor_parallel import random as mcore_random

        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda *args, **kwargs: None
        torch.cuda.empty_cache = lambda *args, **kwargs: None
        torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
        torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
        torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
        mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
        mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
        torch.cuda.current_stream = lambda *args, **kwargs: _CPU_STREAM
        torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
        from megatron.core.transformer.moe import token_dispatcher

        token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _CPU_STREAM  # else a torch.cuda.Stream
        to_host = token_dispatcher.maybe_move_tensor_to_cpu

        def _to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
            # the split sizes reach all_to_all_single as numpy arrays after the device-to-host copy; on CPU there is
            # no copy, so make the same conversion here
            if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
                return tensor.numpy()
            return to_host(tensor, as_numpy=as_numpy, record_stream=record_stream)

        token_dispatcher.maybe_move_tensor_to_cpu = _to_host
        _APPLIED = True
    return True


@contextlib.contextmanager
def device_scope() -> Iterator[None]:
    """Run megatron-core calls with CUDA placement redirected to the CPU (nothing happens with CUDA)."""
    if is_cuda_available():
        yield
        return
    apply_cpu_patches()
    with _CudaToCpuMode():
        yield
