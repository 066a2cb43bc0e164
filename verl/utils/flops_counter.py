"""Model FLOPs of a training step and the device's peak, for MFU (``perf/mfu/*`` = achieved / promised).

``FlopsCounter(hf_config).estimate_flops(batch_seqlens, delta_time)`` counts forward + backward FLOPs of a dense
decoder (Llama / Qwen2 / Qwen3 / Mistral):

    6 * N * tokens  +  12 * sum(seqlen^2) * head_dim * num_attention_heads * num_hidden_layers

where ``N`` is the number of matmul parameters: per layer the q/k/v/o projections
(``hidden * (q + 2 kv) + q * hidden`` with grouped-query ``kv`` width) and the gated MLP (``3 * hidden *
intermediate``), plus ``2 * vocab * hidden`` for the embedding and the LM head (counted even when tied, as verl does,
so MFU numbers are comparable). The first term is 2 FLOPs per multiply-add times 3 (forward, and backward for
activations and weights); the second is the attention scores and weighted sum (``4 s^2 d`` per head per layer
forward, times 3), without discounting the causal mask. Unknown model types estimate 0 FLOPs (MFU 0) and warn once.

``get_device_flops(unit="T")`` is the dense BF16 peak of the current accelerator from a table of known devices; an
unknown GPU gives ``inf`` (MFU 0). On CPU there is no meaningful peak: it returns a one-off measurement of fp32
matmul throughput in this process, so MFU is then only "fraction of what torch.matmul reaches here" and must not be
compared with GPU MFU. ``VERL_DEVICE_PEAK_TFLOPS`` overrides the peak on any device.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from functools import lru_cache
from typing import Any, Sequence

import torch

from verl.utils.device import get_torch_device, is_cuda_available

__all__ = ["FlopsCounter", "get_device_flops", "get_device_name_for_flops", "DENSE_MODEL_TYPES"]

_UNITS = ("B", "K", "M", "G", "T", "P")
_PEAK_ENV = "VERL_DEVICE_PEAK_TFLOPS"

# Dense BF16 (FP16 where there is no BF16) tensor-core peaks in TFLOPS, without sparsity. Ordered so that a more
# specific name is tried before a name it contains (H200 before H20, A100 before A10, L40S/L40 before L4).
_DEVICE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("H200", 989.0),
    ("H100 PCIE", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A40", 149.7),
    ("A30", 165.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L20", 119.5),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("V100", 125.0),
    ("T4", 65.0),
    ("MI325X", 1307.4),
    ("MI300X", 1307.4),
    ("MI250X", 383.0),
)

DENSE_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def _convert_unit(flops: float, unit: str) -> float:
    unit = unit.upper()
    if unit not in _UNITS:
        raise ValueError(f"unit must be one of {list(_UNITS)}, got {unit!r}")
    return flops / (1000.0**_UNITS.index(unit))


def get_device_name_for_flops() -> str:
    """The accelerator's marketing name (``NVIDIA H100 80GB HBM3``), or ``CPU``."""
    if is_cuda_available():
        return str(get_torch_device().get_device_name())
    return "CPU"


def _table_peak(device_name: str) -> float | None:
    name = device_name.upper()
    for pattern, tflops in _DEVICE_PEAK_TFLOPS:
        if pattern in name:
            return tflops * 1e12
    return None


@lru_cache(maxsize=1)
def _measured_cpu_flops() -> float:
    """fp32 matmul throughput of this process (FLOP/s), measured once (~0.1 s)."""
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    reps, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed > 0.05 and reps >= 3:
            break
    return 2.0 * n**3 * reps / elapsed


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def get_device_flops(unit: str = "T") -> float:
    """Peak FLOP/s of the current device in ``unit`` (``B``, ``K``, ``M``, ``G``, ``T``, ``P``): from
    ``$VERL_DEVICE_PEAK_TFLOPS``, else the table of known GPUs (``inf`` for an unknown one, so MFU reads 0), else on
    CPU a measured fp32 matmul rate (see the module docstring)."""
    override = os.environ.get(_PEAK_ENV)
    if override:
        return _convert_unit(float(override) * 1e12, unit)
    device_name = get_device_name_for_flops()
    if device_name == "CPU":
        return _convert_unit(_measured_cpu_flops(), unit)
    peak = _table_peak(device_name)
    if peak is None:
        _warn_once(
            f"device:{device_name}", f"unknown device {device_name!r}: its peak FLOP/s is not in the table, "
            f"so MFU is reported as 0; set {_PEAK_ENV}=<dense bf16 TFLOPS> to fix")
        return math.inf
    return _convert_unit(peak, unit)


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


class FlopsCounter:
    """Estimate the FLOP/s a training step achieved, for MFU. ``config``: a Hugging Face ``PretrainedConfig`` (or
    a dict with the same fields)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.model_type = str(_cfg(config, "model_type", "") or "")
        if self.model_type not in DENSE_MODEL_TYPES:
            _warn_once(
                f"model:{self.model_type}", f"FlopsCounter: model type {self.model_type!r} is not one of "
                f"{list(DENSE_MODEL_TYPES)}; its FLOPs are estimated as 0 (MFU reads 0)")

    def dense_params(self) -> int:
        """Matmul parameters N of the formula (see the module docstring)."""
        c = self.config
        hidden = int(_cfg(c, "hidden_size"))
        heads = int(_cfg(c, "num_attention_heads"))
        kv_heads = int(_cfg(c, "num_key_value_heads", None) or heads)
        head_dim = int(_cfg(c, "head_dim", None) or hidden // heads)
        layers = int(_cfg(c, "num_hidden_layers"))
        intermediate = int(_cfg(c, "intermediate_size"))
        vocab = int(_cfg(c, "vocab_size"))
        q_width, kv_width = heads * head_dim, kv_heads * head_dim
        attn = hidden * (q_width + 2 * kv_width) + q_width * hidden
        mlp = 3 * hidden * intermediate
        return layers * (attn + mlp) + 2 * vocab * hidden

    def _dense_flops(self, batch_seqlens: Sequence[int]) -> float:
        c = self.config
        hidden = int(_cfg(c, "hidden_size"))
        heads = int(_cfg(c, "num_attention_heads"))
        head_dim = int(_cfg(c, "head_dim", None) or hidden // heads)
        layers = int(_cfg(c, "num_hidden_layers"))
        tokens = sum(int(s) for s in batch_seqlens)
        square_sum = sum(int(s)**2 for s in batch_seqlens)
        return 6.0 * self.dense_params() * tokens + 12.0 * square_sum * head_dim * heads * layers

    def estimate_flops(self, batch_seqlens: Sequence[int], delta_time: float) -> tuple[float, float]:
        """``(achieved TFLOP/s, device peak TFLOP/s)`` for one forward+backward pass over sequences of lengths
        ``batch_seqlens`` that took ``delta_time`` seconds. MFU is their ratio."""
        if delta_time <= 0:
            raise ValueError(f"delta_time must be > 0 seconds, got {delta_time}")
        flops = self._dense_flops(batch_seqlens) if self.model_type in DENSE_MODEL_TYPES else 0.0
        return flops / delta_time / 1e12, get_device_flops(unit="T")
