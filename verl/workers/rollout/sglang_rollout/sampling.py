"""One mapping from ``actor_rollout_ref.rollout`` to SGLang's sampling parameters and engine arguments.

Importable without SGLang (the driver validates a config before any worker starts), so nothing here imports it.

Sampling (per request, SGLang's names on the right):

=============================================  =====================================================================
our config                                     SGLang
=============================================  =====================================================================
``response_length``                            ``max_new_tokens``, clamped per request to ``context - prompt``
``temperature`` / ``do_sample=False``          ``temperature`` (``0`` = greedy)
``top_p``, ``top_k`` (``-1``/``0`` = off)      ``top_p``, ``top_k`` (``-1`` = off)
``ignore_eos``                                 ``ignore_eos``
EOS ids (``meta_info`` / generation config)    ``stop_token_ids``
``calculate_log_probs``                        ``return_logprob`` (a request argument, not a sampling parameter)
``n``                                          prompts repeated ``n`` times (interleaved), one sample each
``val_kwargs.*``                               the same, when ``meta_info["validate"]``
any other SGLang sampling parameter set on     passed as is (``repetition_penalty``, ``min_p``, ``presence_penalty``,
the rollout node (``+...rollout.min_p=0.05``)  ``frequency_penalty``, ``stop_token_ids``, ``logit_bias``, ...)
=============================================  =====================================================================

A key SGLang does not support (vLLM's ``include_stop_str_in_output``, ``best_of``, ``logprobs``, ...) or does not
know under that name (``max_tokens``, ``min_tokens``) raises :class:`~verl.utils.config.ConfigError` naming it and
the fix, instead of being dropped silently. So does a key that is neither a rollout setting nor a sampling parameter
(a typo), and an ``engine_kwargs.sglang`` key that is not an SGLang server argument.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from verl.utils.config import ConfigError, cfg_select

__all__ = [
    "SGLANG_SAMPLING_PARAMS",
    "TOKENIZER_SAMPLING_PARAMS",
    "UNSUPPORTED_SAMPLING_PARAMS",
    "SGLangSampling",
    "extra_sampling_params",
    "resolve_sampling",
    "engine_kwargs_from_config",
    "validate_sglang_rollout_config",
]

_R = "actor_rollout_ref.rollout"

#: SGLang's request-level sampling parameters (``sglang.srt.sampling.sampling_params.SamplingParams``, API fields).
SGLANG_SAMPLING_PARAMS = frozenset({
    "max_new_tokens", "min_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "n", "json_schema", "regex", "ebnf",
    "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "logit_bias", "sampling_seed", "custom_params"
})

#: Parameters SGLang evaluates on text: they need the engine's tokenizer (we exchange token ids and skip it).
TOKENIZER_SAMPLING_PARAMS = frozenset(
    {"stop", "stop_regex", "min_new_tokens", "json_schema", "regex", "ebnf", "structural_tag"})

#: Parameters whose value the rollout sets itself from our own keys; setting them directly would be ambiguous.
_OWNED = {"max_new_tokens": f"set {_R}.response_length (data.max_response_length) instead"}

#: Keys users bring from vLLM (or SGLang features a sampling rollout cannot use) -> the fix.
UNSUPPORTED_SAMPLING_PARAMS = {
    "max_tokens": f"SGLang calls it max_new_tokens and verl sets it from {_R}.response_length: remove the key",
    "min_tokens": f"SGLang calls it min_new_tokens: rename it to {_R}.min_new_tokens",
    "include_stop_str_in_output": "SGLang has no such option (it keeps stop token ids in the output already): "
                                  "remove the key",
    "best_of": f"SGLang has no best_of: remove the key (sample more with {_R}.n)",
    "use_beam_search": "beam search is not a sampling rollout: remove the key",
    "beam_width": "beam search is not a sampling rollout: remove the key",
    "length_penalty": "SGLang has no length_penalty (it belongs to beam search): remove the key",
    "early_stopping": "SGLang has no early_stopping (it belongs to beam search): remove the key",
    "logprobs": f"SGLang returns log-probs per request: set {_R}.calculate_log_probs=True instead",
    "prompt_logprobs": "the rollout does not return prompt log-probs (the actor computes them): remove the key",
    "detokenize": "the SGLang rollout exchanges token ids and never detokenizes: remove the key",
    "truncate_prompt_tokens": "SGLang has no truncate_prompt_tokens: truncate prompts in the dataset "
                              "(data.truncation) instead",
    "bad_words": "SGLang has no bad_words: use logit_bias with large negative values for the token ids instead",
    "allowed_token_ids": "SGLang has no allowed_token_ids: remove the key",
    "guided_decoding": "use SGLang's json_schema / regex / ebnf instead (they need the engine's tokenizer)",
    "logits_processors": "SGLang takes custom_logit_processor per request, not as a rollout setting: remove the key",
    "output_kind": "vLLM-only: remove the key",
    "stream_interval": "the rollout does not stream: remove the key",
    "watermark": "not supported by the rollout: remove the key",
}

# Rollout keys that are not sampling parameters (besides those of the packaged ppo_trainer.yaml, read at run time).
_ROLLOUT_SETTINGS = frozenset({
    "name", "mode", "temperature", "top_k", "top_p", "do_sample", "n", "prompt_length", "response_length", "dtype",
    "gpu_memory_utilization", "ignore_eos", "enforce_eager", "free_cache_engine", "load_format", "layered_summon",
    "tensor_model_parallel_size", "data_parallel_size", "expert_parallel_size", "pipeline_model_parallel_size",
    "max_num_batched_tokens", "max_model_len", "max_num_seqs", "enable_chunked_prefill", "enable_prefix_caching",
    "log_prob_micro_batch_size", "log_prob_micro_batch_size_per_gpu", "log_prob_use_dynamic_bsz",
    "log_prob_max_token_len_per_gpu", "disable_log_stats", "calculate_log_probs", "over_sample_rate",
    "multi_stage_wake_up", "update_weights_bucket_megabytes", "seed", "engine_kwargs", "val_kwargs", "multi_turn",
    "agent", "trace", "skip_rollout", "skip_dump_dir", "micro_batch_size", "http_server", "checkpoint_engine",
    "prometheus", "quantization", "logprobs_mode", "custom", "limit_images", "use_fire_sampling",
    "ulysses_sequence_parallel_size", "mtp", "profiler", "enable_rollout_routing_replay"
})


@functools.lru_cache(maxsize=1)
def _packaged_rollout_keys() -> frozenset:
    """Keys of ``actor_rollout_ref.rollout`` in the packaged ``ppo_trainer.yaml`` (whatever this version ships)."""
    import yaml

    import verl

    path = os.path.join(os.path.dirname(os.path.abspath(verl.__file__)), "trainer", "config", "ppo_trainer.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f)
        return frozenset((tree.get("actor_rollout_ref") or {}).get("rollout") or {})
    except (OSError, yaml.YAMLError, AttributeError):
        return frozenset()


def _keys(config: Any) -> list[str]:
    if config is None:
        return []
    if hasattr(config, "keys"):
        return [str(k) for k in config.keys()]
    return [k for k in vars(config) if not k.startswith("_")]


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    value = cfg_select(config, key, default)
    return default if value is None else value


def _plain(value: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def extra_sampling_params(config: Any, allow_tokenizer_params: bool = False) -> dict[str, Any]:
    """SGLang sampling parameters set directly on the rollout node (``+actor_rollout_ref.rollout.min_p=0.05``).

    Raises ``ConfigError`` for an unsupported or renamed parameter, for one SGLang evaluates on text while the
    engine runs without its tokenizer (``allow_tokenizer_params=False``), and for a key that is neither a rollout
    setting nor an SGLang sampling parameter.
    """
    known = _ROLLOUT_SETTINGS | _packaged_rollout_keys()
    out: dict[str, Any] = {}
    for key in _keys(config):
        if key in known:  # our own settings (n, temperature, ...) are mapped by resolve_sampling
            continue
        if key in UNSUPPORTED_SAMPLING_PARAMS:
            raise ConfigError(f"{_R}.{key}: not supported by the SGLang rollout. Fix: "
                              f"{UNSUPPORTED_SAMPLING_PARAMS[key]}")
        if key in _OWNED:
            raise ConfigError(f"{_R}.{key}: the SGLang rollout sets {key} itself. Fix: {_OWNED[key]}")
        if key not in SGLANG_SAMPLING_PARAMS:
            raise ConfigError(f"{_R}.{key}: neither a rollout setting nor an SGLang sampling parameter (SGLang "
                              f"knows {', '.join(sorted(SGLANG_SAMPLING_PARAMS - set(_OWNED)))}). Fix: correct the "
                              "name or remove the key")
        value = _plain(cfg_select(config, key))
        if value is None:
            continue
        if key in TOKENIZER_SAMPLING_PARAMS and not allow_tokenizer_params:
            raise ConfigError(
                f"{_R}.{key}: SGLang evaluates {key} on text, but the rollout runs the engine without its tokenizer "
                f"(token ids in and out). Fix: set +{_R}.engine_kwargs.sglang.skip_tokenizer_init=False, or "
                f"remove {_R}.{key}")
        out[key] = value
    return out


def _tokenizer_params_requested(config: Any) -> bool:
    return any(k in TOKENIZER_SAMPLING_PARAMS and cfg_select(config, k) is not None for k in _keys(config))


@dataclass
class SGLangSampling:
    """The resolved sampling of one ``generate_sequences`` call."""

    params: dict[str, Any]  # SGLang sampling parameters, without max_new_tokens (set per request)
    response_length: int
    n: int
    return_logprob: bool
    eos_token_id: list[int]
    pad_token_id: int
    extra: dict[str, Any] = field(default_factory=dict)

    def request_params(self, max_new_tokens: int) -> dict[str, Any]:
        """The sampling parameters of one request."""
        return dict(self.params, max_new_tokens=int(max_new_tokens))


def _first_not_none(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def resolve_sampling(config: Any,
                     meta_info: Mapping[str, Any],
                     eos_token_id: list[int],
                     pad_token_id: int,
                     allow_tokenizer_params: bool = False) -> SGLangSampling:
    """The SGLang sampling parameters of a call: the rollout config, ``val_kwargs`` when ``meta_info["validate"]``,
    and ``meta_info`` overrides (``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``response_length``, ``n``,
    ``calculate_log_probs``), with the same precedence as the HF rollout."""
    meta_info = dict(meta_info or {})
    if bool(meta_info.get("validate", False)):
        val = _cfg(config, "val_kwargs", {}) or {}
        do_sample = bool(meta_info.get("do_sample", _cfg(val, "do_sample", False)))
        temperature = float(_first_not_none(cfg_select(val, "temperature"), 0.0))
        top_p = float(_first_not_none(cfg_select(val, "top_p"), 1.0))
        top_k = int(_first_not_none(cfg_select(val, "top_k"), -1))
    else:
        do_sample = bool(meta_info.get("do_sample", _cfg(config, "do_sample", True)))
        temperature = float(meta_info.get("temperature", _cfg(config, "temperature", 1.0)))
        top_p = float(meta_info.get("top_p", _cfg(config, "top_p", 1.0)))
        top_k = int(meta_info.get("top_k", _cfg(config, "top_k", -1)))
    if temperature < 0:
        raise ConfigError(f"{_R}.temperature: must be >= 0, got {temperature}. Fix: set {_R}.temperature=1.0")
    if not do_sample or temperature == 0:
        temperature, top_p, top_k = 0.0, 1.0, -1  # greedy
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"{_R}.top_p: must be in (0, 1], got {top_p}. Fix: set {_R}.top_p=1.0")
    response_length = meta_info.get("response_length", _cfg(config, "response_length"))
    if response_length is None or int(response_length) < 1:
        raise ConfigError(f"{_R}.response_length: must be a positive int, got {response_length!r}. Fix: set "
                          f"{_R}.response_length (data.max_response_length)")
    n = int(meta_info.get("n", 1))
    if n < 1:
        raise ValueError(f"meta_info['n'] (samples per prompt row) must be >= 1, got {n}")
    ignore_eos = bool(_cfg(config, "ignore_eos", False))
    extra = extra_sampling_params(config, allow_tokenizer_params=allow_tokenizer_params)
    params: dict[str, Any] = dict(extra)
    params.update(temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1, ignore_eos=ignore_eos)
    eos = [] if ignore_eos else [int(t) for t in eos_token_id]
    if eos:
        stops = set(int(t) for t in (params.get("stop_token_ids") or [])) | set(eos)
        params["stop_token_ids"] = sorted(stops)
    return SGLangSampling(params=params,
                          response_length=int(response_length),
                          n=n,
                          return_logprob=bool(
                              meta_info.get("calculate_log_probs", _cfg(config, "calculate_log_probs", False))),
                          eos_token_id=eos,
                          pad_token_id=int(pad_token_id),
                          extra=extra)


# ----------------------------------------------------------------------------------------------- engine args -----
#: CPU default of the KV-cache size in tokens: SGLang otherwise sizes it from free host memory (GBs, and slow).
CPU_DEFAULT_MAX_TOTAL_TOKENS = 1 << 16

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}


@functools.lru_cache(maxsize=1)
def _server_arg_names() -> frozenset | None:
    """Field names of SGLang's ``ServerArgs`` (a dataclass or, in newer versions, a msgspec struct); None when
    SGLang is not importable here."""
    try:
        from sglang.srt.server_args import ServerArgs
    except Exception:  # noqa: BLE001 - any import problem means "cannot check here"
        return None
    import dataclasses

    if dataclasses.is_dataclass(ServerArgs):
        return frozenset(f.name for f in dataclasses.fields(ServerArgs))
    try:
        import msgspec

        return frozenset(f.name for f in msgspec.structs.fields(ServerArgs))
    except (ImportError, TypeError):
        return None


def user_engine_kwargs(config: Any, server_arg_names: Iterable[str] | None = None) -> dict[str, Any]:
    """``engine_kwargs.sglang`` without ``null`` values, checked against SGLang's server arguments."""
    raw = _plain(cfg_select(config, "engine_kwargs.sglang", None)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{_R}.engine_kwargs.sglang: must be a mapping of SGLang server arguments, got "
                          f"{type(raw).__name__}. Fix: set +{_R}.engine_kwargs.sglang.KEY=VALUE")
    names = frozenset(server_arg_names) if server_arg_names is not None else _server_arg_names()
    out = {}
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        if names is not None and key not in names:
            raise ConfigError(f"{_R}.engine_kwargs.sglang.{key}: not an SGLang server argument (see `python -m "
                              "sglang.launch_server --help`, dashes become underscores). Fix: correct or remove it")
        if value is not None:
            out[key] = value
    return out


def engine_kwargs_from_config(config: Any,
                              model_path: str,
                              on_gpu: bool,
                              load_format: str | None = None,
                              seed_offset: int = 0,
                              server_arg_names: Iterable[str] | None = None) -> dict[str, Any]:
    """SGLang server arguments (``Engine(**kwargs)`` / ``launch_server --key value``) from the rollout config.

    ``engine_kwargs.sglang`` entries win over the mapped ones. On CPU the engine runs in fp32 with the
    ``torch_native`` attention backend, without CUDA graphs, with a KV cache of
    :data:`CPU_DEFAULT_MAX_TOTAL_TOKENS` tokens and a scheduler that sleeps when idle, unless configured otherwise.
    """
    tp = int(_cfg(config, "tensor_model_parallel_size", 1))
    if tp < 1:
        raise ConfigError(f"{_R}.tensor_model_parallel_size: must be >= 1, got {tp}")
    if not on_gpu and tp != 1:
        raise ConfigError(f"{_R}.tensor_model_parallel_size: ={tp}, but SGLang's tensor parallelism needs GPUs. "
                          f"Fix: set {_R}.tensor_model_parallel_size=1 on CPU")
    user = user_engine_kwargs(config, server_arg_names)
    kwargs: dict[str, Any] = {
        "model_path": model_path,
        "tp_size": tp,
        "random_seed": int(_cfg(config, "seed", 0)) + int(seed_offset),
        "skip_tokenizer_init": not _tokenizer_params_requested(config),
        "log_level": "error",
    }
    trust = cfg_select(config, "trust_remote_code", None)
    if trust is not None:
        kwargs["trust_remote_code"] = bool(trust)
    if load_format:
        # verl's "dummy_*" formats (random weights until the first sync) are SGLang's "dummy"
        kwargs["load_format"] = "dummy" if str(load_format).startswith("dummy") else str(load_format)
    max_model_len = cfg_select(config, "max_model_len", None)
    if max_model_len:
        kwargs["context_length"] = int(max_model_len)
    max_num_seqs = cfg_select(config, "max_num_seqs", None)
    if max_num_seqs:
        kwargs["max_running_requests"] = int(max_num_seqs)
    if not bool(_cfg(config, "enable_prefix_caching", True)):
        kwargs["disable_radix_cache"] = True
    if bool(_cfg(config, "enable_chunked_prefill", True)):
        chunk = cfg_select(config, "max_num_batched_tokens", None)
        if chunk:
            kwargs["chunked_prefill_size"] = int(chunk)
    else:
        kwargs["chunked_prefill_size"] = -1
    if on_gpu:
        dtype = str(_cfg(config, "dtype", "bfloat16"))
        kwargs["dtype"] = _DTYPES.get(dtype, dtype)
        kwargs["mem_fraction_static"] = float(_cfg(config, "gpu_memory_utilization", 0.5))
        if bool(_cfg(config, "enforce_eager", False)):
            kwargs["disable_cuda_graph"] = True
        # release/resume_memory_occupation (the hybrid engine's sleep/wake) need the memory saver
        kwargs["enable_memory_saver"] = bool(_cfg(config, "free_cache_engine", True))
    else:
        prompt = int(_cfg(config, "prompt_length", 0) or 0)
        response = int(_cfg(config, "response_length", 0) or 0)
        kwargs.update(device="cpu",
                      dtype="float32",
                      attention_backend="torch_native",
                      disable_cuda_graph=True,
                      max_total_tokens=max(CPU_DEFAULT_MAX_TOTAL_TOKENS, 4 * (prompt + response)),
                      sleep_on_idle=True)  # the scheduler otherwise busy-polls a core while waiting for requests
    names = frozenset(server_arg_names) if server_arg_names is not None else _server_arg_names()
    if names is not None:  # our defaults that this SGLang version does not know (the user's are checked above)
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    kwargs.update(user)
    if kwargs.get("attention_backend") is None:
        kwargs.pop("attention_backend", None)
    if not kwargs["skip_tokenizer_init"] and "tokenizer_path" not in kwargs:
        tok = cfg_select(config, "tokenizer_path", None)
        if tok:
            kwargs["tokenizer_path"] = tok
    return kwargs


def validate_sglang_rollout_config(config: Any) -> None:
    """Driver-side check of the ``actor_rollout_ref.rollout`` node for ``name=sglang`` (no SGLang import needed for
    the sampling part; ``engine_kwargs.sglang`` is checked when SGLang is importable here)."""
    skip = user_engine_kwargs(config).get("skip_tokenizer_init", not _tokenizer_params_requested(config))
    allow = not bool(skip)
    resolve_sampling(config, {}, eos_token_id=[], pad_token_id=0, allow_tokenizer_params=allow)
    resolve_sampling(config, {"validate": True}, eos_token_id=[], pad_token_id=0, allow_tokenizer_params=allow)
