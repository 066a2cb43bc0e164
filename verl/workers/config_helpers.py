"""What every worker role does with its config before it builds anything, in one place.

* :func:`detach_config` -- a private, resolved copy of the role's sub-config (the trainer passes nodes of one tree,
  and the batch-size normalisation below mutates it).
* :func:`normalize_ppo_mini_batch` / :func:`normalize_micro_batch` -- verl's batch-size arithmetic: mini-batches are
  given in prompts for the whole group and become rows per data-parallel rank; the deprecated global
  ``*_micro_batch_size`` become ``*_micro_batch_size_per_gpu``.
* :func:`load_tokenizer`, :func:`load_generation_config`, :func:`update_model_config`, :func:`import_external_libs`
  -- the Hugging Face side of model loading.
* :func:`build_optimizer`, :func:`build_lr_scheduler` -- the ``optim`` config node (AdamW, warm-up, constant or
  cosine schedule).

Nothing here depends on the training backend (FSDP, Megatron).
"""
from __future__ import annotations

import copy
import importlib
import inspect
import logging
import math
from typing import Any, Iterable

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = [
    "detach_config",
    "normalize_ppo_mini_batch",
    "normalize_micro_batch",
    "load_tokenizer",
    "load_generation_config",
    "update_model_config",
    "import_external_libs",
    "get_num_warmup_steps",
    "build_optimizer",
    "build_lr_scheduler",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ config ---
def detach_config(config: Any) -> DictConfig:
    """A resolved, independent DictConfig copy of ``config`` (DictConfig node, dict or dataclass).

    Interpolations (``${oc.select:actor_rollout_ref.actor.ppo_mini_batch_size,256}``) are resolved against the full
    tree the node came from, so later in-place normalisation of one role cannot leak into another role that
    interpolates the same key, even when several roles share one process.
    """
    if config is None:
        return OmegaConf.create({})
    if isinstance(config, DictConfig):
        return OmegaConf.create(OmegaConf.to_container(config, resolve=True))
    if isinstance(config, dict):
        return OmegaConf.create(copy.deepcopy(config))
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(config), resolve=True))


def _set(node: DictConfig, key: str, value: Any) -> None:
    with open_dict(node):
        node[key] = value


def normalize_ppo_mini_batch(node: DictConfig, rollout_n: int, dp_size: int, label: str) -> None:
    """``node.ppo_mini_batch_size`` (prompts, whole group) -> rows per data-parallel rank, in place; also the
    deprecated global ``ppo_micro_batch_size`` -> ``ppo_micro_batch_size_per_gpu``.

    ``label`` is the config path of ``node`` (``actor_rollout_ref.actor`` / ``critic``), used in error messages.
    """
    mini = node.get("ppo_mini_batch_size")
    if mini is None or int(mini) <= 0:
        raise ValueError(f"{label}.ppo_mini_batch_size must be a positive number of prompts, got {mini!r}")
    rows = int(mini) * int(rollout_n)
    if rows % dp_size:
        raise ValueError(f"{label}.ppo_mini_batch_size={mini} x rollout.n={rollout_n} = {rows} rows do not split "
                         f"evenly over {dp_size} data-parallel ranks; make {label}.ppo_mini_batch_size * rollout.n a "
                         f"multiple of {dp_size}")
    per_rank = rows // dp_size
    if per_rank <= 0:
        raise ValueError(f"{label}.ppo_mini_batch_size={mini} x rollout.n={rollout_n} is 0 rows per rank over "
                         f"{dp_size} data-parallel ranks; raise {label}.ppo_mini_batch_size")
    _set(node, "ppo_mini_batch_size", per_rank)
    normalize_micro_batch(node, "ppo_micro_batch_size", "ppo_micro_batch_size_per_gpu", dp_size, label)
    micro = node.get("ppo_micro_batch_size_per_gpu")
    if micro is not None and not bool(node.get("use_dynamic_bsz", False)):
        micro = int(micro)
        if micro <= 0 or per_rank % micro:
            raise ValueError(f"{label}.ppo_micro_batch_size_per_gpu={micro} must divide the {per_rank} rows each rank "
                             f"gets per mini-batch ({label}.ppo_mini_batch_size={mini} x n={rollout_n} / {dp_size} "
                             f"ranks); set it to a divisor of {per_rank}")


def normalize_micro_batch(node: DictConfig, global_key: str, per_gpu_key: str, dp_size: int, label: str) -> None:
    """Deprecated global micro-batch size ``node[global_key]`` -> ``node[per_gpu_key]`` (divided by the DP size),
    in place. Does nothing when the global key is unset."""
    value = node.get(global_key)
    if value is None:
        return
    value = int(value)
    per_gpu = value // dp_size
    if per_gpu <= 0:
        raise ValueError(f"{label}.{global_key}={value} (global, deprecated) is smaller than the {dp_size} "
                         f"data-parallel ranks; set {label}.{per_gpu_key} (rows per device) instead")
    existing = node.get(per_gpu_key)
    if existing is not None and int(existing) != per_gpu:
        raise ValueError(f"{label}.{global_key}={value} (deprecated, global) and {label}.{per_gpu_key}={existing} are "
                         f"both set; remove {label}.{global_key}")
    _set(node, global_key, per_gpu)
    _set(node, per_gpu_key, per_gpu)


# ------------------------------------------------------------------------------------------------ hugging face ---
def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer at ``path``; a missing pad token falls back to the EOS token (generation pads with it)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise OSError(f"cannot load a tokenizer from {path!r} ({exc}); set model.tokenizer_path (or model.path) to a "
                      "Hugging Face model directory with tokenizer files") from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.warning("tokenizer at %s has no pad token; using the EOS token %r", path, tokenizer.eos_token)
    return tokenizer


def load_generation_config(path: str, trust_remote_code: bool = False) -> Any:
    """The model's ``generation_config.json`` (None when it has none)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def update_model_config(hf_config: Any, overrides: Any) -> Any:
    """Apply ``model.override_config`` (nested dicts update nested sub-configs) to a transformers config."""
    if not overrides:
        return hf_config
    if isinstance(overrides, DictConfig):
        overrides = OmegaConf.to_container(overrides, resolve=True)
    for key, value in overrides.items():
        current = getattr(hf_config, key, None)
        if isinstance(value, dict) and current is not None and not isinstance(current, dict):
            update_model_config(current, value)
        else:
            setattr(hf_config, key, value)
    return hf_config


def import_external_libs(external_lib: str | Iterable[str] | None) -> None:
    """Import ``model.external_lib`` (modules that register custom model classes with transformers)."""
    if not external_lib:
        return
    for name in [external_lib] if isinstance(external_lib, str) else list(external_lib):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"model.external_lib={name!r} cannot be imported ({exc}); install it or remove the "
                              "key") from exc


# ------------------------------------------------------------------------------------------------ optimisation ---
def _optim_get(optim_config: Any, key: str, default: Any = None) -> Any:
    value = optim_config.get(key, None) if hasattr(optim_config, "get") else getattr(optim_config, key, None)
    return default if value is None else value


def get_num_warmup_steps(optim_config: Any) -> int:
    """``lr_warmup_steps`` when >= 0, else ``lr_warmup_steps_ratio * total_training_steps``."""
    steps = int(_optim_get(optim_config, "lr_warmup_steps", -1))
    if steps >= 0:
        return steps
    ratio = float(_optim_get(optim_config, "lr_warmup_steps_ratio", 0.0))
    if ratio == 0.0:
        return 0
    total = int(_optim_get(optim_config, "total_training_steps", -1))
    if total <= 0:
        raise ValueError(f"optim.lr_warmup_steps_ratio={ratio} needs optim.total_training_steps > 0 (the trainer fills "
                         f"it in), got {total}; set optim.lr_warmup_steps to a number of steps instead")
    return int(ratio * total)


def build_optimizer(params: Iterable[torch.nn.Parameter], optim_config: Any) -> torch.optim.Optimizer:
    """The ``optim.optimizer`` class of ``torch.optim`` (default AdamW) with ``lr``, ``weight_decay``, ``betas``."""
    name = str(_optim_get(optim_config, "optimizer", "AdamW"))
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"optim.optimizer={name!r} is not an optimizer class of torch.optim; use e.g. AdamW")
    lr = _optim_get(optim_config, "lr")
    if lr is None:
        raise ValueError("optim.lr is not set; set the learning rate (e.g. actor_rollout_ref.actor.optim.lr=1e-6)")
    accepted = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {"lr": float(lr)}
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = float(_optim_get(optim_config, "weight_decay", 0.01))
    betas = _optim_get(optim_config, "betas")
    if betas is not None and "betas" in accepted:
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2:
            raise ValueError(f"optim.betas must be two numbers, got {list(betas)}")
        kwargs["betas"] = betas
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters to optimise")
    return cls(params, **kwargs)


class _WarmupSchedule:
    """lr factor: linear warm-up to 1 over ``warmup`` steps, then constant or cosine decay to ``min_lr_ratio``.

    A small class instead of a closure so that ``LambdaLR.state_dict()`` records its settings in checkpoints.
    """

    def __init__(self, kind: str, warmup: int, total: int, min_lr_ratio: float, num_cycles: float) -> None:
        self.kind, self.warmup, self.total = kind, warmup, total
        self.min_lr_ratio, self.num_cycles = min_lr_ratio, num_cycles

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return float(step) / float(max(1, self.warmup))
        if self.kind == "constant":
            return 1.0
        progress = float(step - self.warmup) / float(max(1, self.total - self.warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * 2.0 * self.num_cycles * min(progress, 1.0)))
        return max(0.0, self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_config: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """``optim.lr_scheduler_type`` (``constant`` | ``cosine``; ``warmup_style`` is the deprecated name) with
    ``get_num_warmup_steps`` warm-up steps; cosine decays over ``total_training_steps`` to ``min_lr_ratio``."""
    kind = _optim_get(optim_config, "lr_scheduler_type")
    style = _optim_get(optim_config, "warmup_style")
    if style is not None:
        logger.warning("optim.warmup_style is deprecated; use optim.lr_scheduler_type")
        kind = kind if kind is not None and kind != "constant" else style
    kind = str(kind or "constant")
    if kind not in ("constant", "cosine"):
        raise ValueError(f"optim.lr_scheduler_type={kind!r} is not supported; use constant or cosine")
    warmup = get_num_warmup_steps(optim_config)
    total = int(_optim_get(optim_config, "total_training_steps", -1))
    if kind == "cosine" and total <= 0:
        raise ValueError("optim.lr_scheduler_type=cosine needs optim.total_training_steps > 0 (the trainer fills it in "
                         f"from trainer.total_training_steps / total_epochs), got {total}")
    min_lr_ratio = float(_optim_get(optim_config, "min_lr_ratio", 0.0))
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    schedule = _WarmupSchedule(kind, warmup, total, min_lr_ratio, float(_optim_get(optim_config, "num_cycles", 0.5)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
