"""Building blocks of the Megatron-core backend shared by the actor, critic, reference and reward roles.

* :func:`init_megatron_parallel` -- ``parallel_state.initialize_model_parallel`` from a ``*.megatron`` config section
  (tensor x pipeline x context x data, expert parallelism over the data-parallel ranks; context parallelism with
  data parallelism and with TP or PP, not EP, :func:`check_context_parallel_supported`) and
  the model-parallel RNG seeds;
* :func:`build_megatron_model` -- the ``GPTModel`` chunks of this rank (one per virtual-pipeline stage) for a
  Hugging Face config, loaded from the HF checkpoint through :mod:`verl.models.mcore` (only the tensors this rank
  holds are read), optionally with a one-output value head (critic, reward model), wrapped in megatron's
  ``DistributedDataParallel`` when trained;
* :func:`build_megatron_optimizer` / :class:`MegatronLRScheduler` -- megatron's (distributed) optimizer with verl's
  ``optim`` keys and warm-up/cosine schedule;
* offload helpers that free the device memory of parameters, gradients and optimizer state between phases (the
  tensors keep their identity: storages are resized to 0 and refilled, so megatron's buffer views stay valid);
* :func:`vocab_parallel_log_probs` -- log-probs and entropy from vocabulary-parallel logits (TP-sharded vocab).

Megatron-core is imported lazily; on CPU every entry point runs inside :func:`verl.utils.megatron_cpu.device_scope`.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from verl.utils.device import get_device, is_cuda_available
from verl.utils.dp_update import cfg_get

logger = logging.getLogger(__name__)

__all__ = [
    "MegatronParallelInfo",
    "init_megatron_parallel",
    "check_context_parallel_supported",
    "get_parallel_info",
    "megatron_dtype",
    "HFCheckpointWeights",
    "ValueHead",
    "build_megatron_model",
    "unwrap_model",
    "build_megatron_optimizer",
    "MegatronLRScheduler",
    "offload_megatron_model",
    "load_megatron_model",
    "offload_megatron_grads",
    "load_megatron_grads",
    "offload_megatron_optimizer",
    "load_megatron_optimizer",
    "causal_padding_mask",
    "vocab_parallel_log_probs",
    "broadcast_from_last_pp_stage",
    "run_forward_backward",
    "grads_are_finite",
]


# ---------------------------------------------------------------------------------------------- parallel state -----
@dataclass(frozen=True)
class MegatronParallelInfo:
    """This rank's coordinates in megatron's ``tp x dp x pp`` grid (and its expert-parallel rank: EP divides the
    data-parallel ranks, each EP rank holding ``1 / ep_size`` of every MoE layer's experts)."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    vpp_size: Optional[int] = None
    ep_rank: int = 0
    ep_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_collect(self) -> bool:
        """The rank whose outputs the driver keeps: TP rank 0 and CP rank 0 of the last pipeline stage (one per DP
        rank; the other CP ranks of the group return the same gathered tensors)."""
        return self.tp_rank == 0 and self.cp_rank == 0 and self.is_last_stage


def _sizes(megatron_cfg: Any) -> tuple[int, int, Optional[int]]:
    tp = int(cfg_get(megatron_cfg, "tensor_model_parallel_size", 1) or 1)
    pp = int(cfg_get(megatron_cfg, "pipeline_model_parallel_size", 1) or 1)
    vpp = cfg_get(megatron_cfg, "virtual_pipeline_model_parallel_size")
    vpp = int(vpp) if vpp not in (None, 1) else None
    return tp, pp, vpp


def check_context_parallel_supported(megatron_cfg: Any, label: str) -> None:
    """Refuse, with an error that says so, what context parallelism (:mod:`verl.models.mcore.cp_attention`) is not
    supported with (the rule: :func:`verl.utils.config.context_parallel_conflict`): expert parallelism, and TP and PP
    both > 1 (untested: 8 ranks)."""
    from verl.utils.config import context_parallel_conflict

    cp = int(cfg_get(megatron_cfg, "context_parallel_size", 1) or 1)
    tp, pp, _ = _sizes(megatron_cfg)
    ep = int(cfg_get(megatron_cfg, "expert_model_parallel_size", 1) or 1)
    conflict = context_parallel_conflict(cp, tp, pp, ep)
    if conflict is None:
        return
    part, why = conflict
    if part == "expert_model_parallel_size":
        raise NotImplementedError(f"{label}.context_parallel_size={cp} together with {label}.{part}={ep} is not "
                                  f"supported yet ({why}); set {label}.{part}=1 or {label}.context_parallel_size=1")
    raise NotImplementedError(f"{label}.context_parallel_size={cp} together with {label}.tensor_model_parallel_size="
                              f"{tp} and {label}.pipeline_model_parallel_size={pp} is not supported yet ({why}); "
                              f"set one of them to 1 or {label}.context_parallel_size=1")


def init_megatron_parallel(megatron_cfg: Any, label: str) -> MegatronParallelInfo:
    """Initialise (once per process) megatron's parallel groups for the ``*.megatron`` section at ``label``; a
    second role of the same process must use the same sizes. Seeds megatron's RNG tracker with ``megatron.seed``."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    from verl.utils.megatron_cpu import apply_cpu_patches, device_scope

    apply_cpu_patches()
    tp, pp, vpp = _sizes(megatron_cfg)
    cp = int(cfg_get(megatron_cfg, "context_parallel_size", 1) or 1)
    check_context_parallel_supported(megatron_cfg, label)
    ep = int(cfg_get(megatron_cfg, "expert_model_parallel_size", 1) or 1)
    etp = cfg_get(megatron_cfg, "expert_tensor_parallel_size")
    if etp is not None and int(etp) != tp:
        raise NotImplementedError(f"{label}.expert_tensor_parallel_size={etp}: experts are split over TP like the "
                                  f"dense MLP; leave it null (= tensor_model_parallel_size={tp})")
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"{label}.tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp} x "
                         f"context_parallel_size={cp} = {tp * pp * cp} does not divide the {world} worker processes "
                         "(trainer.nnodes x n_gpus_per_node); choose sizes whose product divides it")
    if (world // (tp * pp * cp)) % ep:
        raise ValueError(f"{label}.expert_model_parallel_size={ep} does not divide the data-parallel size "
                         f"{world // (tp * pp * cp)} (= {world} processes / (tensor x pipeline x context parallel)); "
                         "experts are spread over the data-parallel ranks: choose a divisor of it")
    if vpp is not None and pp == 1:
        raise ValueError(f"{label}.virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size > 1; "
                         f"set {label}.virtual_pipeline_model_parallel_size=null")
    with device_scope():
        if mpu.model_parallel_is_initialized():
            have = (mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size(),
                    mpu.get_expert_model_parallel_world_size(), mpu.get_context_parallel_world_size())
            if have != (tp, pp, ep, cp):
                raise ValueError(f"{label}: tensor/pipeline/expert/context sizes {(tp, pp, ep, cp)} differ from those "
                                 f"of another role in the same worker process {have}; colocated roles must share the "
                                 "Megatron layout")
        else:
            mpu.initialize_model_parallel(tensor_model_parallel_size=tp,
                                          pipeline_model_parallel_size=pp,
                                          virtual_pipeline_model_parallel_size=vpp,
                                          context_parallel_size=cp,
                                          expert_model_parallel_size=ep)
            tensor_parallel.model_parallel_cuda_manual_seed(int(cfg_get(megatron_cfg, "seed", 42) or 42))
    return get_parallel_info(vpp)


def get_parallel_info(vpp_size: Optional[int] = None) -> MegatronParallelInfo:
    """This rank's :class:`MegatronParallelInfo` (megatron's parallel state must be initialised)."""
    from megatron.core import parallel_state as mpu

    return MegatronParallelInfo(tp_rank=mpu.get_tensor_model_parallel_rank(),
                                tp_size=mpu.get_tensor_model_parallel_world_size(),
                                pp_rank=mpu.get_pipeline_model_parallel_rank(),
                                pp_size=mpu.get_pipeline_model_parallel_world_size(),
                                dp_rank=mpu.get_data_parallel_rank(),
                                dp_size=mpu.get_data_parallel_world_size(),
                                vpp_size=vpp_size,
                                ep_rank=mpu.get_expert_model_parallel_rank(),
                                ep_size=mpu.get_expert_model_parallel_world_size(),
                                cp_rank=mpu.get_context_parallel_rank(),
                                cp_size=mpu.get_context_parallel_world_size())


def megatron_dtype(megatron_cfg: Any) -> torch.dtype:
    """Parameter dtype: ``megatron.dtype`` (default bf16) on CUDA; fp32 on CPU, where bf16 matmuls are slow."""
    if not is_cuda_available():
        return torch.float32
    from verl.models.mcore.config_converter import _dtype

    return _dtype(cfg_get(megatron_cfg, "dtype", "bfloat16") or "bfloat16")


# ------------------------------------------------------------------------------------------------- HF weights -----
class HFCheckpointWeights(Mapping):
    """The tensors of a Hugging Face checkpoint directory, read on access (safetensors: one tensor at a time;
    ``pytorch_model*.bin``: the file holding it, cached), so a rank reads only what its shards need."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._where: dict[str, str] = {}
        self._bin_cache: dict[str, dict[str, torch.Tensor]] = {}
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = os.path.join(path, index_name)
            if os.path.isfile(index):
                with open(index, encoding="utf-8") as f:
                    self._where = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
                break
        else:
            for single in ("model.safetensors", "pytorch_model.bin"):
                file = os.path.join(path, single)
                if os.path.isfile(file):
                    self._where = {k: file for k in self._keys_of(file)}
                    break
        if not self._where:
            raise FileNotFoundError(f"no model weights (model.safetensors, pytorch_model.bin or their index) in "
                                    f"{path!r}; model.path must be a Hugging Face model directory")

    @staticmethod
    def _keys_of(file: str) -> list[str]:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                return list(f.keys())
        return list(torch.load(file, map_location="cpu", weights_only=True).keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        file = self._where[key]
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                return f.get_tensor(key)
        if file not in self._bin_cache:
            self._bin_cache = {file: torch.load(file, map_location="cpu", weights_only=True)}
        return self._bin_cache[file][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


# ------------------------------------------------------------------------------------------------- value head -----
class ValueHead(torch.nn.Module):
    """A one-output linear head that stands in for ``GPTModel.output_layer`` (critic, reward model). Under
    sequence parallelism it gathers the sequence first; its output grad is not reduced over TP (the head and the
    loss are replicated on every TP rank)."""

    def __init__(self, hidden_size: int, sequence_parallel: bool, dtype: torch.dtype, init_std: float = 0.02) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, hidden_size, dtype=dtype))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same head on every rank and every run
            torch.nn.init.normal_(self.weight, mean=0.0, std=init_std)
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden_states: torch.Tensor, weight: Any = None, runtime_gather_output: Any = None) -> tuple:
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        return torch.nn.functional.linear(hidden_states, self.weight.to(hidden_states.dtype)), None


# ---------------------------------------------------------------------------------------------- model building -----
def _transformer_config(hf_config: Any, megatron_cfg: Any, dtype: torch.dtype) -> Any:
    from verl.models.mcore import hf_to_mcore_config, make_transformer_config

    overrides = cfg_get(megatron_cfg, "override_transformer_config", {}) or {}
    parallel = {
        k: cfg_get(megatron_cfg, k)
        for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                  "context_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size",
                  "sequence_parallel")
    }
    kwargs = hf_to_mcore_config(hf_config, dtype=dtype, parallel=parallel, override_transformer_config=overrides)
    if kwargs.get("sequence_parallel") and not _fused_norm_available():
        # megatron-core's torch RMSNorm (the local layer spec without Transformer Engine / Apex) refuses sequence
        # parallelism; it only saves activation memory, the results are the same without it
        logger.warning("sequence_parallel=True needs Transformer Engine or Apex norms; running without it")
        kwargs["sequence_parallel"] = False
    if (kwargs.get("sequence_parallel") and int(kwargs.get("context_parallel_size") or 1) > 1 and
            not _module_available("transformer_engine")):
        # context parallelism without Transformer Engine (verl.models.mcore.cp_attention) is tested without sequence
        # parallelism (Apex norms only); the results are the same without it
        logger.warning("sequence_parallel=True with context_parallel_size > 1 is untested without Transformer Engine; "
                       "running without it")
        kwargs["sequence_parallel"] = False
    kwargs.setdefault("use_cpu_initialization", True)  # weights come from the checkpoint: no device-side init
    kwargs.setdefault("perform_initialization", False)  # build_gpt_model then marks the TP weights as init does
    if not is_cuda_available():
        # the fused kernels (bias+activation, masked softmax) are CUDA-only; torch fallbacks on CPU
        kwargs["bias_activation_fusion"] = False
        kwargs["masked_softmax_fusion"] = False
        kwargs["gradient_accumulation_fusion"] = False
    else:
        kwargs.setdefault("gradient_accumulation_fusion", False)  # needs apex' fused kernels
        if kwargs.get("masked_softmax_fusion") and not _module_available("scaled_masked_softmax_cuda"):
            # megatron's fused softmax imports this compiled extension (built with Apex / Megatron's kernels) for
            # bf16/fp16 attention; without it the unfused softmax gives the same values
            kwargs["masked_softmax_fusion"] = False
    return make_transformer_config(kwargs)


def _module_available(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _fused_norm_available() -> bool:
    return _module_available("transformer_engine") or _module_available("apex")


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside a DDP / Float16 wrapper."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def build_megatron_model(
    hf_config: Any,
    megatron_cfg: Any,
    model_path: Optional[str],
    *,
    value_head: bool = False,
    wrap_ddp: bool = True,
    load_weights: bool = True,
    head_weight_names: tuple[str, ...] = ("score.weight", "classifier.weight")) -> tuple:
    """This rank's model chunks (``[GPTModel or DDP(GPTModel)]`` per virtual stage), the ``TransformerConfig`` and the
    weight converter of their layout.

    Weights are read from ``model_path`` (an HF checkpoint, through :class:`HFCheckpointWeights`). ``value_head``:
    the last stage's output layer is a :class:`ValueHead`, loaded from the first of ``head_weight_names`` the
    checkpoint has (a reward model's ``score``), else initialised from a fixed seed. ``wrap_ddp``: wrap each chunk in
    megatron's ``DistributedDataParallel`` (training roles; ``megatron.use_distributed_optimizer`` and
    ``override_ddp_config`` apply).
    """
    from megatron.core import parallel_state as mpu

    from verl.models.mcore import build_gpt_model, get_weight_converter, layout_from_transformer_config
    from verl.utils.megatron_cpu import device_scope

    dtype = megatron_dtype(megatron_cfg)
    if value_head:
        hf_config = copy.deepcopy(hf_config)
        hf_config.tie_word_embeddings = False  # the head replaces the LM head; nothing to tie
    with device_scope():
        tf_config = _transformer_config(hf_config, megatron_cfg, dtype)
        layout = layout_from_transformer_config(tf_config, use_transformer_engine=False)
        converter = get_weight_converter(hf_config, layout)
        pp_rank = mpu.get_pipeline_model_parallel_rank()
        tp_rank = mpu.get_tensor_model_parallel_rank()
        ep_rank = mpu.get_expert_model_parallel_rank()
        weights = HFCheckpointWeights(model_path) if (load_weights and model_path) else None
        chunks = []
        for vp_stage in range(layout.num_chunks):
            pre, post = layout.is_first_stage(pp_rank, vp_stage), layout.is_last_stage(pp_rank, vp_stage)
            model = build_gpt_model(hf_config,
                                    tf_config,
                                    pre_process=pre,
                                    post_process=post,
                                    vp_stage=vp_stage if layout.vpp_size else None,
                                    use_transformer_engine=False)
            if post and value_head:
                model.output_layer = ValueHead(tf_config.hidden_size, bool(tf_config.sequence_parallel), dtype,
                                               float(tf_config.init_method_std))
            if weights is not None:
                _load_chunk(model, converter, weights, tp_rank, pp_rank, vp_stage, value_head and post,
                            head_weight_names, ep_rank)
            model.to(get_device())
            chunks.append(model)
        if wrap_ddp:
            chunks = _wrap_ddp(chunks, tf_config, megatron_cfg)
    return chunks, tf_config, converter


@torch.no_grad()
def _load_chunk(model: torch.nn.Module,
                converter: Any,
                weights: Mapping,
                tp_rank: int,
                pp_rank: int,
                vp_stage: int,
                has_value_head: bool,
                head_weight_names: tuple[str, ...],
                ep_rank: int = 0) -> None:
    local = converter.mcore_param_names(pp_rank, vp_stage, local=True, ep_rank=ep_rank)
    global_ = converter.mcore_param_names(pp_rank, vp_stage, local=False, ep_rank=ep_rank)
    state = model.state_dict()
    missing = []
    for ln, gn in zip(local, global_):
        if has_value_head and gn == "output_layer.weight":
            continue
        if ln not in state:
            missing.append(ln)
            continue
        tensor = converter.hf_to_mcore_param(gn, weights)[tp_rank]
        if tuple(tensor.shape) != tuple(state[ln].shape):
            raise ValueError(f"{gn}: the checkpoint gives shape {tuple(tensor.shape)} for this rank, the model has "
                             f"{tuple(state[ln].shape)}; the HF config and weights of model.path disagree")
        state[ln].copy_(tensor)
    if missing:
        raise KeyError(f"the Megatron model lacks parameters the converter expects: {missing[:8]}")
    if has_value_head:
        for name in head_weight_names:
            if name in weights:
                head = weights[name]
                if head.shape[0] != 1:
                    raise ValueError(f"{name} has {head.shape[0]} outputs; a value / reward head needs num_labels=1")
                model.output_layer.weight.copy_(head)
                break


def _wrap_ddp(chunks: list, tf_config: Any, megatron_cfg: Any) -> list:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_kwargs = dict(use_distributed_optimizer=bool(cfg_get(megatron_cfg, "use_distributed_optimizer", True)),
                      grad_reduce_in_fp32=True,
                      overlap_grad_reduce=False,
                      overlap_param_gather=False)
    overrides = cfg_get(megatron_cfg, "override_ddp_config", {}) or {}
    from omegaconf import OmegaConf

    if OmegaConf.is_config(overrides):
        overrides = OmegaConf.to_container(overrides, resolve=True)
    known = {f.name for f in fields(DistributedDataParallelConfig)}
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ValueError(f"unknown megatron-core DistributedDataParallelConfig field(s) {unknown} in "
                         "*.megatron.override_ddp_config; check the names against "
                         "megatron/core/distributed/distributed_data_parallel_config.py")
    ddp_kwargs.update(overrides)
    ddp_config = DistributedDataParallelConfig(**ddp_kwargs)
    wrapped = [
        DistributedDataParallel(config=tf_config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    tf_config.finalize_model_grads_func = finalize_model_grads
    tf_config.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


# -------------------------------------------------------------------------------------------------- optimizer -----
def build_megatron_optimizer(chunks: list, optim_cfg: Any, megatron_cfg: Any, grad_clip: Any) -> Any:
    """Megatron's optimizer (Adam with decoupled weight decay; distributed when ``megatron.use_distributed_optimizer``)
    for the DDP-wrapped ``chunks``, from verl's ``optim`` keys (``lr``, ``weight_decay``, ``betas``, ``eps``);
    gradients are clipped to ``grad_clip``. Megatron keeps fp32 main weights when the model is bf16/fp16."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from verl.utils.megatron_cpu import device_scope

    name = str(cfg_get(optim_cfg, "optimizer", "AdamW")).lower()
    if name not in ("adamw", "adam"):
        raise ValueError(f"optim.optimizer={cfg_get(optim_cfg, 'optimizer')!r} is not available with "
                         "strategy=megatron; use AdamW")
    lr = cfg_get(optim_cfg, "lr")
    if lr is None:
        raise ValueError("optim.lr is not set; set the learning rate (e.g. actor_rollout_ref.actor.optim.lr=1e-6)")
    betas = list(cfg_get(optim_cfg, "betas", [0.9, 0.999]) or [0.9, 0.999])
    dtype = megatron_dtype(megatron_cfg)
    config = OptimizerConfig(optimizer="adam",
                             lr=float(lr),
                             min_lr=0.0,
                             weight_decay=float(cfg_get(optim_cfg, "weight_decay", 0.01)),
                             adam_beta1=float(betas[0]),
                             adam_beta2=float(betas[1]),
                             adam_eps=float(cfg_get(optim_cfg, "eps", 1e-8)),
                             clip_grad=float(grad_clip) if grad_clip else 0.0,
                             bf16=dtype is torch.bfloat16,
                             fp16=dtype is torch.float16,
                             params_dtype=dtype,
                             use_distributed_optimizer=bool(cfg_get(megatron_cfg, "use_distributed_optimizer", True)))
    with device_scope():
        return get_megatron_optimizer(config, chunks)


class MegatronLRScheduler:
    """verl's lr schedule (``lr_scheduler_type`` constant|cosine, warm-up, ``min_lr_ratio``) applied to a megatron
    optimizer's param groups (megatron optimizers are not ``torch.optim.Optimizer`` subclasses, so ``LambdaLR``
    cannot drive them). ``step()`` / ``get_last_lr()`` / ``state_dict()`` as torch schedulers."""

    def __init__(self, optimizer: Any, optim_cfg: Any) -> None:
        from verl.workers.config_helpers import _WarmupSchedule, get_num_warmup_steps

        kind = str(
            cfg_get(optim_cfg, "lr_scheduler_type", None) or cfg_get(optim_cfg, "warmup_style", None) or "constant")
        if kind not in ("constant", "cosine"):
            raise ValueError(f"optim.lr_scheduler_type={kind!r} is not supported; use constant or cosine")
        total = int(cfg_get(optim_cfg, "total_training_steps", -1) or -1)
        if kind == "cosine" and total <= 0:
            raise ValueError("optim.lr_scheduler_type=cosine needs optim.total_training_steps > 0")
        self.optimizer = optimizer
        self.base_lr = float(cfg_get(optim_cfg, "lr"))
        self.schedule = _WarmupSchedule(kind, get_num_warmup_steps(optim_cfg), total,
                                        float(cfg_get(optim_cfg, "min_lr_ratio", 0.0) or 0.0),
                                        float(cfg_get(optim_cfg, "num_cycles", 0.5) or 0.5))
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        lr = self.base_lr * self.schedule(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr]

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "base_lr": self.base_lr}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()


# --------------------------------------------------------------------------------------------------- offload -----
def _free(tensor: torch.Tensor, store: dict, key: Any) -> None:
    """Copy ``tensor`` to host memory and release its storage (views of it stay valid, see module docstring)."""
    storage = tensor.untyped_storage()
    if storage.size() == 0 or key in store:
        return
    store[key] = (tensor.detach().to("cpu", copy=True), storage.size())
    storage.resize_(0)


def _restore(tensor: torch.Tensor, store: dict, key: Any, copy_back: bool = True) -> None:
    if key not in store:
        return
    host, size = store.pop(key)
    tensor.untyped_storage().resize_(size)
    with torch.no_grad():
        if copy_back:
            tensor.copy_(host)
        else:
            tensor.zero_()


def _buffers(chunks: list) -> Iterator[Any]:
    for chunk in chunks:
        for attr in ("buffers", "expert_parallel_buffers"):
            value = getattr(chunk, attr, None)  # megatron DDP: lists of buffers (nn.Module.buffers is a method)
            if isinstance(value, (list, tuple)):
                yield from value


def offload_megatron_model(chunks: list, store: dict) -> None:
    """Move the parameters of ``chunks`` (DDP-wrapped: their flat buffers) to host memory, freeing device memory."""
    ddp_buffers = list(_buffers(chunks))
    if ddp_buffers:
        for i, buf in enumerate(ddp_buffers):
            if buf.param_data is not None:
                _free(buf.param_data, store, ("param", i))
        return
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            _free(param.data, store, ("param", id(chunk), name))


def load_megatron_model(chunks: list, store: dict) -> None:
    """Undo :func:`offload_megatron_model`."""
    ddp_buffers = list(_buffers(chunks))
    if ddp_buffers:
        for i, buf in enumerate(ddp_buffers):
            if buf.param_data is not None:
                _restore(buf.param_data, store, ("param", i))
        return
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            _restore(param.data, store, ("param", id(chunk), name))


def offload_megatron_grads(chunks: list, store: dict) -> None:
    """Release the DDP gradient buffers (they are zeroed before the next backward anyway)."""
    for i, buf in enumerate(_buffers(chunks)):
        storage = buf.grad_data.untyped_storage()
        if storage.size() and ("grad", i) not in store:
            store[("grad", i)] = (None, storage.size())
            storage.resize_(0)


def load_megatron_grads(chunks: list, store: dict) -> None:
    """Re-allocate (zeroed) the gradient buffers released by :func:`offload_megatron_grads`."""
    for i, buf in enumerate(_buffers(chunks)):
        key = ("grad", i)
        if key in store:
            _, size = store.pop(key)
            buf.grad_data.untyped_storage().resize_(size)
            buf.grad_data.zero_()


def _inner_optimizers(optimizer: Any) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _optimizer_tensors(optimizer: Any) -> Iterator[tuple[Any, torch.Tensor]]:
    """Optimizer-owned tensors: Adam moments and the fp32 main copies of bf16/fp16 parameters (never the model's own
    parameters, whose storage the model buffers own)."""
    for i, opt in enumerate(_inner_optimizers(optimizer)):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for p_idx, (param, state) in enumerate(inner.state.items()):
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    yield ("state", i, p_idx, key), value
        for attr in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            groups = getattr(opt, attr, None) or []
            for g, group in enumerate(groups):
                for j, main in enumerate(group):
                    if main is not None:
                        yield ("main", i, attr, g, j), main.data


def offload_megatron_optimizer(optimizer: Any, store: dict) -> None:
    """Move the optimizer state (and fp32 main weights) to host memory."""
    if optimizer is None:
        return
    for key, tensor in _optimizer_tensors(optimizer):
        _free(tensor, store, key)


def load_megatron_optimizer(optimizer: Any, store: dict) -> None:
    """Undo :func:`offload_megatron_optimizer`."""
    if optimizer is None:
        return
    for key, tensor in _optimizer_tensors(optimizer):
        _restore(tensor, store, key)


# --------------------------------------------------------------------------------------------- forward helpers -----
def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Megatron's boolean attention mask ``(b, 1, s, s)``, True where attention is *not* allowed: a query attends to
    earlier (and its own) positions whose ``attention_mask`` is 1. Rows of padding queries keep their own position
    so that no softmax row is empty."""
    b, s = attention_mask.shape
    valid = attention_mask.bool()
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & valid[:, None, :]
    allowed = allowed | torch.eye(s, dtype=torch.bool, device=attention_mask.device)[None]
    return (~allowed).unsqueeze(1)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group whose members all compute the same downstream loss: the backward is the identity."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None


@torch.no_grad()
def _sum_exp_times_logits_in_chunks(exp: torch.Tensor, z: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """``sum(exp * z, -1)`` (``-inf`` logits counted as 0) over chunks of rows (the row count of
    :mod:`verl.utils.torch_functional`'s chunked log-probs), so that the product never exists for all rows at once."""
    from verl.utils.torch_functional import _rows_per_chunk

    part = z.shape[-1]
    flat_exp, flat_z = exp.reshape(-1, part), z.reshape(-1, part)
    step = _rows_per_chunk(part, chunk_rows)
    pieces = []
    for start in range(0, flat_z.shape[0], step):
        chunk = flat_z[start:start + step]
        pieces.append((flat_exp[start:start + step] * chunk.masked_fill(torch.isinf(chunk), 0.0)).sum(dim=-1))
    return torch.cat(pieces).view(z.shape[:-1])


def vocab_parallel_log_probs(logits: torch.Tensor,
                             labels: torch.Tensor,
                             vocab_size: int,
                             calculate_entropy: bool = False,
                             tp_group: Any = None,
                             tp_rank: int = 0,
                             tp_size: int = 1,
                             entropy_grad: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-prob of ``labels`` and the entropy from logits whose last dim is this TP rank's slice of the (padded)
    vocabulary. Rows of the padding vocabulary (ids >= ``vocab_size``) are excluded. Float32 results of shape
    ``labels.shape``; differentiable (each TP rank gets the gradient of its own slice). ``entropy_grad=False``: the
    entropy is for metrics only, without a graph, and its ``sum(p * z)`` is taken in chunks of rows so that no
    extra full-size product of the logits is formed."""
    z = logits.float()
    part = z.shape[-1]
    start = tp_rank * part
    ids = torch.arange(start, start + part, device=z.device)
    if start + part > vocab_size:
        z = z.masked_fill(ids >= vocab_size, float("-inf"))
    with torch.no_grad():
        zmax = z.max(dim=-1).values
        if tp_size > 1:
            dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=tp_group)
    z = z - zmax.unsqueeze(-1)
    exp = torch.exp(z)
    sum_exp = exp.sum(dim=-1)
    local = labels - start
    in_range = (local >= 0) & (local < part)
    picked = z.gather(-1, local.clamp(0, part - 1).unsqueeze(-1)).squeeze(-1) * in_range
    if tp_size > 1:
        sum_exp = _AllReduceSum.apply(sum_exp, tp_group)
        picked = _AllReduceSum.apply(picked, tp_group)
    lse = torch.log(sum_exp)
    log_probs = picked - lse
    entropy = None
    if calculate_entropy:
        if entropy_grad:
            pz = (exp * z.masked_fill(torch.isinf(z), 0.0)).sum(dim=-1)
        else:
            pz = _sum_exp_times_logits_in_chunks(exp.detach(), z.detach())
        if tp_size > 1:
            pz = _AllReduceSum.apply(pz, tp_group)
        entropy = lse - pz / sum_exp
        if not entropy_grad:
            entropy = entropy.detach()
    return log_probs, entropy


def broadcast_from_last_pp_stage(tensor: Optional[torch.Tensor], shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` of the last pipeline stage on every stage of this rank's pipeline group."""
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    device = get_device() if is_cuda_available() else torch.device("cpu")
    if mpu.is_pipeline_last_stage(ignore_virtual=True):
        buf = tensor.to(device=device, dtype=dtype).contiguous()
    else:
        buf = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(buf, src=mpu.get_pipeline_model_parallel_last_rank(), group=mpu.get_pipeline_model_parallel_group())
    return buf.cpu()


def run_forward_backward(chunks: list, micro_batches: list, forward_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
                         loss_fn: Callable[[torch.Tensor, Any], tuple[torch.Tensor,
                                                                      dict]], forward_only: bool) -> list[dict]:
    """Run megatron's micro-batch schedule (1F1B over pipeline stages, interleaved with virtual stages) over
    ``micro_batches`` (TensorDicts). ``forward_fn(model_chunk, micro_batch)`` returns the chunk's output;
    ``loss_fn(last_stage_output, micro_batch) -> (loss, metrics)`` runs on the last stage only, and its ``loss`` is
    what backward starts from (megatron divides it by the number of micro-batches; callers pre-multiply).
    Returns the last stage's list of ``metrics`` dicts (empty on other stages)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    device = get_device()

    def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple:
        mb = next(data_iterator).to(device)
        output = forward_fn(model, mb)
        return output, lambda out: loss_fn(out, mb)

    iterators = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    seq_len = max(int(mb["input_ids"].shape[-1]) for mb in micro_batches)
    mb_size = max(int(mb["input_ids"].shape[0]) for mb in micro_batches)
    fb = get_forward_backward_func()
    out = fb(forward_step_func=forward_step,
             data_iterator=iterators,
             model=chunks if len(chunks) > 1 else chunks[0],
             num_microbatches=len(micro_batches),
             seq_length=seq_len,
             micro_batch_size=mb_size,
             forward_only=forward_only)
    return list(out or [])


def grads_are_finite(chunks: list) -> bool:
    """Whether every DDP gradient buffer of every rank is finite (one all-reduce over the world)."""
    bad = 0.0
    for buf in _buffers(chunks):
        if buf.grad_data.numel() and not bool(torch.isfinite(buf.grad_data).all()):
            bad = 1.0
    flag = torch.tensor([bad], device=get_device() if is_cuda_available() else "cpu")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0
