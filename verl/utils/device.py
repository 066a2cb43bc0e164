"""The one place that decides which accelerator and collective backend verl uses.

Everything else asks this module instead of touching ``torch.cuda`` directly, so the same code runs on a laptop CPU
(gloo) and on a GPU cluster (NCCL). Set ``VERL_DEVICE=cpu`` to force the CPU path on a machine that has GPUs.
"""
from __future__ import annotations

import os
from functools import lru_cache
from types import ModuleType

import torch

_FORCE_ENV = "VERL_DEVICE"


@lru_cache(maxsize=None)
def is_cuda_available() -> bool:
    """True when CUDA can be used and the user has not forced the CPU path."""
    if os.environ.get(_FORCE_ENV, "").lower() == "cpu":
        return False
    return torch.cuda.is_available()


def get_device_name() -> str:
    """``"cuda"`` or ``"cpu"``: the device type tensors and models are placed on."""
    return "cuda" if is_cuda_available() else "cpu"


def get_device_id() -> int:
    """Index of the current accelerator (0 on CPU, where there is only one device)."""
    return torch.cuda.current_device() if is_cuda_available() else 0


def get_device() -> torch.device:
    """The ``torch.device`` of this process (the current CUDA device, or the CPU)."""
    return torch.device(get_device_name(), get_device_id()) if is_cuda_available() else torch.device("cpu")


def get_nccl_backend() -> str:
    """Collective backend for ``torch.distributed``: NCCL on CUDA, gloo on CPU."""
    return "nccl" if is_cuda_available() else "gloo"


def get_dist_backend() -> str:
    """Alias of :func:`get_nccl_backend` with a name that does not suggest NCCL only."""
    return get_nccl_backend()


def get_visible_devices_keyword() -> str:
    """Environment variable that restricts which accelerators a process sees."""
    return "CUDA_VISIBLE_DEVICES"


def get_ray_resource_name() -> str:
    """Ray resource a worker bundle asks for besides CPUs: ``"GPU"`` on CUDA, none (``"CPU"``) otherwise."""
    return "GPU" if is_cuda_available() else "CPU"


class _CpuDeviceModule:
    """A stand-in for ``torch.cuda`` on CPU so callers need no branches for memory and sync calls."""

    @staticmethod
    def is_available() -> bool:
        return False

    @staticmethod
    def device_count() -> int:
        return 0

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def set_device(_device) -> None:
        return None

    @staticmethod
    def synchronize(_device=None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def memory_allocated(_device=None) -> int:
        return 0

    @staticmethod
    def max_memory_allocated(_device=None) -> int:
        return 0

    @staticmethod
    def memory_reserved(_device=None) -> int:
        return 0

    @staticmethod
    def max_memory_reserved(_device=None) -> int:
        return 0

    @staticmethod
    def reset_peak_memory_stats(_device=None) -> None:
        return None

    @staticmethod
    def mem_get_info(_device=None) -> tuple[int, int]:
        import psutil

        vm = psutil.virtual_memory()
        return vm.available, vm.total

    @staticmethod
    def get_rng_state():
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state) -> None:
        torch.set_rng_state(state)


_CPU_MODULE = _CpuDeviceModule()


def get_torch_device() -> ModuleType | _CpuDeviceModule:
    """``torch.cuda`` on CUDA, otherwise an object with the same memory/seed/sync methods that are CPU no-ops."""
    return torch.cuda if is_cuda_available() else _CPU_MODULE
