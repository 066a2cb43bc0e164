"""Supervised fine-tuning with FSDP2: ``torchrun --nproc_per_node=N -m verl.trainer.fsdp_sft_trainer key=value ...``.

The config is ``config/sft_trainer.yaml`` (verl's key tree: ``data.*``, ``model.partial_pretrain``, ``optim.*``,
``trainer.*``). Every rank holds a shard of the model (``verl.workers.fsdp_workers.build_fsdp_model``) and a slice of
each batch; one optimizer step consumes ``data.train_batch_size`` rows over all ranks, as micro-batches of
``data.micro_batch_size_per_gpu`` rows with gradient accumulation.

The loss is the mean negative log-likelihood over all target tokens of the global batch (each rank scales its token
sum by ``world_size / global_tokens``, and FSDP averages gradients over ranks), so the same data give the same
update whatever the number of ranks and the micro-batch size. Targets are ``labels = input_ids[:, 1:]`` under
``loss_mask[:, 1:]`` (the SFT datasets mark target tokens themselves, unshifted).

Without a process group (a plain ``python`` call) the trainer starts a one-rank group of its own (gloo on CPU,
NCCL on CUDA, see :mod:`verl.utils.device`) and closes it afterwards, so :func:`run_sft` works in-process too.

Checkpoints: ``trainer.default_local_dir/global_step_N/`` holds the sharded model, optimizer and lr-scheduler/RNG
state (:class:`~verl.utils.checkpoint.FSDPCheckpointManager`), ``huggingface/`` (config and tokenizer; with full
weights in the final checkpoint, so ``from_pretrained(<...>/global_step_N/huggingface)`` loads the trained model)
and ``data.pt`` (the data position); ``latest_checkpointed_iteration.txt`` names the latest complete step.
``trainer.resume_mode=auto`` continues from it, on the same batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import glob
import math
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from typing import Any, Iterator, Optional, Sequence

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from verl.utils.config import ConfigError, cfg_select
from verl.utils.device import get_device, get_device_name, get_nccl_backend, get_torch_device, is_cuda_available

__all__ = [
    "FSDPSFTTrainer",
    "create_sft_dataset",
    "validate_sft_config",
    "run_sft",
    "main",
]

_STEP_DIR = re.compile(r"global_step_(\d+)$")
DATA_STATE_FILE = "data.pt"
HF_SUBDIR = "huggingface"

# ----------------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------------


def _fail(key: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{key}: {problem}. Fix: {fix}")


def _set(config: DictConfig, key: str, value: Any) -> None:
    with open_dict(config):
        OmegaConf.update(config, key, value, merge=False, force_add=True)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _positive_int(config: DictConfig, key: str) -> int:
    value = cfg_select(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(key, f"must be a positive integer, got {value!r}", f"set {key}=N with N >= 1")
    return int(value)


def _check_files(config: DictConfig, key: str, required: bool) -> None:
    files = _as_list(cfg_select(config, key))
    if not files:
        if required:
            _fail(key, "is not set", f"set {key}=/path/to/train.parquet")
        return
    for path in files:
        if not isinstance(path, str) or not path:
            _fail(key, f"entries must be path strings, got {path!r}", f"set {key}=/path/to/file.parquet")
        if "://" not in path and not os.path.exists(os.path.expanduser(path)):
            _fail(key, f"data file {path!r} does not exist",
                  f"point {key} at an existing parquet/jsonl file (e.g. from examples/data_preprocess/)")


def validate_sft_config(config: DictConfig, world_size: int) -> None:
    """Check ``config`` (a resolved ``sft_trainer.yaml`` tree) for ``world_size`` ranks before anything is built;
    each problem raises a :class:`~verl.utils.config.ConfigError` naming the key and the fix. Normalises the
    deprecated global ``data.micro_batch_size`` into ``data.micro_batch_size_per_gpu`` in place."""
    train_bsz = _positive_int(config, "data.train_batch_size")
    legacy_micro = cfg_select(config, "data.micro_batch_size")
    if legacy_micro is not None:
        per_gpu = int(legacy_micro) // world_size
        if per_gpu <= 0:
            _fail("data.micro_batch_size", f"={legacy_micro} (global, deprecated) is smaller than the {world_size} "
                  "ranks", "set data.micro_batch_size_per_gpu (rows per device) instead")
        _set(config, "data.micro_batch_size_per_gpu", per_gpu)
        _set(config, "data.micro_batch_size", None)
    micro = _positive_int(config, "data.micro_batch_size_per_gpu")
    if train_bsz % (world_size * micro):
        _fail(
            "data.train_batch_size", f"={train_bsz} rows do not split into {world_size} ranks x "
            f"data.micro_batch_size_per_gpu={micro} rows", f"make data.train_batch_size a multiple of "
            f"{world_size * micro} (world size x micro_batch_size_per_gpu), or change the micro-batch size")
    _positive_int(config, "data.max_length")
    truncation = cfg_select(config, "data.truncation", "error")
    if truncation not in ("error", "left", "right"):
        _fail("data.truncation", f"unknown value {truncation!r}", "set data.truncation to error, left or right")
    _check_files(config, "data.train_files", required=True)
    _check_files(config, "data.val_files", required=False)
    model_path = cfg_select(config, "model.partial_pretrain")
    if not model_path or not isinstance(model_path, str):
        _fail("model.partial_pretrain", f"must name the model to fine-tune, got {model_path!r}",
              "set model.partial_pretrain=/path/to/hf_model")
    local = os.path.expanduser(model_path)
    looks_like_hub_id = not model_path.startswith(("/", "~", ".")) and model_path.count("/") == 1
    if not os.path.exists(local) and not looks_like_hub_id:
        _fail("model.partial_pretrain", f"model directory {model_path!r} does not exist",
              "set it to a Hugging Face model directory (config.json, weights, tokenizer) or a hub id")
    if int(cfg_select(config, "model.lora_rank", 0) or 0) > 0:
        _fail("model.lora_rank", "LoRA is not supported by this SFT trainer", "set model.lora_rank=0")
    if int(cfg_select(config, "ulysses_sequence_parallel_size", 1) or 1) != 1:
        _fail("ulysses_sequence_parallel_size", "sequence parallelism is not supported by this SFT trainer",
              "set ulysses_sequence_parallel_size=1")
    strategy = str(cfg_select(config, "model.strategy", "fsdp2"))
    if strategy not in ("fsdp", "fsdp2"):
        _fail("model.strategy", f"unknown strategy {strategy!r}", "set model.strategy=fsdp2")
    epochs = cfg_select(config, "trainer.total_epochs")
    steps = cfg_select(config, "trainer.total_training_steps")
    if steps is not None:
        _positive_int(config, "trainer.total_training_steps")
    elif epochs is None:
        _fail("trainer.total_epochs", "and trainer.total_training_steps are both unset",
              "set trainer.total_epochs=N or trainer.total_training_steps=N")
    else:
        _positive_int(config, "trainer.total_epochs")
    for key in ("trainer.save_freq", "trainer.test_freq"):
        value = cfg_select(config, key, -1)
        if isinstance(value, bool) or not isinstance(value, int) or value == 0:
            _fail(key, f"must be a positive step count or -1, got {value!r}", f"set {key}=N or {key}=-1")
    mode = str(cfg_select(config, "trainer.resume_mode", "auto"))
    if mode not in ("auto", "disable", "resume_path"):
        _fail("trainer.resume_mode", f"unknown value {mode!r}", "set trainer.resume_mode to auto, disable or "
              "resume_path")
    if mode == "resume_path":
        path = cfg_select(config, "trainer.resume_from_path")
        if not path or not _STEP_DIR.search(os.path.normpath(str(path))):
            _fail("trainer.resume_from_path", f"must be a global_step_N checkpoint directory, got {path!r}",
                  "set it to <trainer.default_local_dir>/global_step_N")
        if not os.path.isdir(os.path.expanduser(str(path))):
            _fail("trainer.resume_from_path", f"checkpoint directory {path!r} does not exist",
                  "point it at an existing global_step_N directory, or set trainer.resume_mode=auto")
    device = str(cfg_select(config, "trainer.device", "auto") or "auto")
    if device not in ("auto", "cpu", "cuda"):
        _fail("trainer.device", f"unknown device {device!r}", "set trainer.device to auto, cpu or cuda")
    if device == "cuda" and not is_cuda_available():
        _fail("trainer.device", "is cuda but no GPU is visible", "set trainer.device=auto (or cpu)")
    clip = cfg_select(config, "optim.clip_grad", 1.0)
    if clip is not None and float(clip) < 0:
        _fail("optim.clip_grad", f"must be >= 0, got {clip}", "set optim.clip_grad=1.0 (0 or null: no clipping)")
    ratio = float(cfg_select(config, "optim.warmup_steps_ratio", 0.0) or 0.0)
    if not 0.0 <= ratio <= 1.0:
        _fail("optim.warmup_steps_ratio", f"must be in [0, 1], got {ratio}", "set optim.warmup_steps_ratio=0.1")
    scheduler = str(cfg_select(config, "optim.lr_scheduler", "cosine") or "cosine")
    if scheduler not in ("cosine", "constant"):
        _fail("optim.lr_scheduler", f"unknown schedule {scheduler!r}", "set optim.lr_scheduler to cosine or constant")
    from verl.utils.tracking import TrackingBackendError, missing_backend_package, normalize_backends

    try:
        backends = normalize_backends(cfg_select(config, "trainer.logger"))
    except TrackingBackendError as exc:
        raise ConfigError(str(exc)) from None
    for name in backends:
        missing = missing_backend_package(name)
        if missing:
            _fail("trainer.logger", f"backend {name!r} needs the {missing!r} package, which is not installed",
                  f"pip install {missing}, or remove {name} from trainer.logger")


# ----------------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------------


def create_sft_dataset(data_paths: Any, data_config: Any, tokenizer: Any, max_samples: int = -1) -> Dataset:
    """The SFT dataset for ``data_paths``: ``data.custom_cls`` when set, else
    :class:`~verl.utils.dataset.multiturn_sft_dataset.MultiTurnSFTDataset` with ``data.multiturn.enable``, else the
    single-turn :class:`~verl.utils.dataset.sft_dataset.SFTDataset` (prompt/response columns)."""
    if isinstance(data_config, DictConfig):
        data_config = OmegaConf.to_container(data_config, resolve=True)
    data_config = dict(data_config or {})
    custom = data_config.get("custom_cls") or {}
    multiturn = data_config.get("multiturn") or {}
    if custom.get("path"):
        from verl.utils.dataset.sampler import load_object

        cls = load_object(custom["path"], custom.get("name"), "data.custom_cls.path", "data.custom_cls.name")
        if not (isinstance(cls, type) and issubclass(cls, Dataset)):
            raise TypeError(f"data.custom_cls.name {custom.get('name')!r} from {custom['path']!r} must subclass "
                            "torch.utils.data.Dataset")
        dataset_config = data_config
    elif multiturn.get("enable", False):
        from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

        cls = MultiTurnSFTDataset
        dataset_config = dict(data_config)
        dataset_config["messages_key"] = multiturn.get("messages_key", "messages")
        dataset_config["tools_key"] = multiturn.get("tools_key", "tools")
    else:
        from verl.utils.dataset.sft_dataset import SFTDataset

        cls = SFTDataset
        dataset_config = data_config
    return cls(data_paths, tokenizer, config=dataset_config, max_samples=max_samples)


class _ResumableSampler(Sampler[int]):
    """A :class:`DistributedSampler` (this rank's slice of a seeded per-epoch shuffle) that can start an epoch
    ``skip`` indices in, so a resumed run sees exactly the batches an uninterrupted run would have seen."""

    def __init__(self, inner: DistributedSampler) -> None:
        self.inner = inner
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = int(skip)

    def __iter__(self) -> Iterator[int]:
        indices = list(iter(self.inner))
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


class _PaddedEvalDataset(Dataset):
    """``dataset`` padded to ``total`` rows with copies of row 0 whose loss mask is zero, so every rank runs the same
    number of evaluation micro-batches (FSDP collectives) while padding adds nothing to the loss."""

    def __init__(self, dataset: Dataset, total: int) -> None:
        self.dataset, self.total, self.real = dataset, total, len(dataset)

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < self.real:
            return self.dataset[index]
        item = dict(self.dataset[0])
        item["loss_mask"] = torch.zeros_like(item["loss_mask"])
        return item


# ----------------------------------------------------------------------------------------------------------------------
# process group
# ----------------------------------------------------------------------------------------------------------------------


def _ensure_process_group() -> bool:
    """Join torchrun's process group (``WORLD_SIZE`` > 1), or start a one-rank group in this process when there is
    none. Returns True when this call created the group (the caller then destroys it)."""
    if dist.is_initialized():
        return False
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        from verl.workers.fsdp_workers import init_distributed

        init_distributed()
        return True
    if is_cuda_available():
        get_torch_device().set_device(
            int(os.environ.get("LOCAL_RANK", "0")) % max(1,
                                                         get_torch_device().device_count()))
        backend = f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"
    else:
        backend = get_nccl_backend()
    # an in-memory store: a one-rank group needs no rendezvous, hence no port that could clash with another run
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def _all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


# ----------------------------------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------------------------------


class FSDPSFTTrainer:
    """SFT on FSDP2. ``FSDPSFTTrainer(config, device_mesh, ulysses_device_mesh, tokenizer, train_dataset,
    val_dataset)`` then ``fit()``; the process group must exist (see :func:`run_sft`, which builds everything).

    ``device_mesh`` (default: all ranks, ``model.fsdp_config.fsdp_size``) shards the model; ``ulysses_device_mesh``
    is accepted for upstream compatibility and must be None (no sequence parallelism). After ``fit()``,
    ``history`` holds the logged metrics per step and ``last_checkpoint`` the latest checkpoint directory.
    """

    def __init__(self,
                 config: DictConfig,
                 device_mesh: Any = None,
                 ulysses_device_mesh: Any = None,
                 tokenizer: Any = None,
                 train_dataset: Optional[Dataset] = None,
                 val_dataset: Optional[Dataset] = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("FSDPSFTTrainer needs a torch.distributed process group; launch with torchrun or call "
                               "verl.trainer.fsdp_sft_trainer.run_sft(config), which starts one")
        if ulysses_device_mesh is not None:
            raise ConfigError("ulysses_device_mesh: sequence parallelism is not supported by this SFT trainer. Fix: "
                              "pass None (ulysses_sequence_parallel_size=1)")
        if not isinstance(config, DictConfig):
            config = OmegaConf.create(config)
        self.config = config
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        validate_sft_config(config, self.world_size)
        self.device = get_device()
        self.micro_batch_size = int(config.data.micro_batch_size_per_gpu)
        self.batch_per_rank = int(config.data.train_batch_size) // self.world_size
        self.use_remove_padding = bool(cfg_select(config, "use_remove_padding", False))
        self.seed = int(cfg_select(config, "trainer.seed", 1) or 0)
        data_seed = cfg_select(config, "data.seed")
        self.data_seed = self.seed if data_seed is None else int(data_seed)
        torch.manual_seed(self.seed)

        from verl.utils.fsdp_utils import create_device_mesh

        self.device_mesh = device_mesh if device_mesh is not None else create_device_mesh(
            self.world_size, int(cfg_select(config, "model.fsdp_config.fsdp_size", -1) or -1))
        self.tokenizer = tokenizer if tokenizer is not None else self._load_tokenizer()
        self.train_dataset = train_dataset if train_dataset is not None else create_sft_dataset(
            config.data.train_files, self._data_config(), self.tokenizer,
            int(cfg_select(config, "data.train_max_samples", -1) or -1))
        if val_dataset is None and cfg_select(config, "data.val_files"):
            val_dataset = create_sft_dataset(config.data.val_files, self._data_config(), self.tokenizer,
                                             int(cfg_select(config, "data.val_max_samples", -1) or -1))
        self.val_dataset = val_dataset
        self._build_dataloaders()
        self._build_model_optimizer()
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Optional[str] = None
        self.global_step = 0

    # building ---------------------------------------------------------------------------------------------------
    def _data_config(self) -> dict[str, Any]:
        data = OmegaConf.to_container(self.config.data, resolve=True)
        if data.get("seed") is None:
            data["seed"] = self.data_seed
        return data

    def _load_tokenizer(self) -> Any:
        from verl.workers.config_helpers import import_external_libs, load_tokenizer

        import_external_libs(cfg_select(self.config, "model.external_lib"))
        path = cfg_select(self.config, "model.tokenizer_path") or self.config.model.partial_pretrain
        tokenizer = load_tokenizer(os.path.expanduser(str(path)),
                                   trust_remote_code=bool(cfg_select(self.config, "model.trust_remote_code", False)))
        template = cfg_select(self.config, "data.chat_template")
        if template:
            tokenizer.chat_template = str(template)
        return tokenizer

    def _build_dataloaders(self) -> None:
        n = len(self.train_dataset)
        global_bsz = int(self.config.data.train_batch_size)
        if n < global_bsz:
            raise ConfigError(f"data.train_batch_size: ={global_bsz} is larger than the {n} training rows, so not one "
                              f"full batch exists. Fix: set data.train_batch_size <= {n} (a multiple of "
                              f"{self.world_size * self.micro_batch_size}) or add data")
        inner = DistributedSampler(self.train_dataset,
                                   num_replicas=self.world_size,
                                   rank=self.rank,
                                   shuffle=bool(cfg_select(self.config, "data.shuffle", True)),
                                   seed=self.data_seed,
                                   drop_last=True)
        self.train_sampler = _ResumableSampler(inner)
        num_workers = int(cfg_select(self.config, "data.num_workers", 0) or 0)
        self.train_dataloader = DataLoader(self.train_dataset,
                                           batch_size=self.batch_per_rank,
                                           sampler=self.train_sampler,
                                           drop_last=True,
                                           num_workers=num_workers)
        self.steps_per_epoch = n // global_bsz
        steps = cfg_select(self.config, "trainer.total_training_steps")
        if steps is not None:
            self.total_training_steps = int(steps)
        else:
            self.total_training_steps = self.steps_per_epoch * int(self.config.trainer.total_epochs)
        self.val_dataloader = None
        if self.val_dataset is not None and len(self.val_dataset) > 0:
            chunk = self.world_size * self.micro_batch_size
            total = math.ceil(len(self.val_dataset) / chunk) * chunk
            padded = _PaddedEvalDataset(self.val_dataset, total)
            per_rank = total // self.world_size
            # contiguous rows per rank (no shuffle): rank r evaluates rows [r * per_rank, (r + 1) * per_rank)
            subset = torch.utils.data.Subset(padded, range(self.rank * per_rank, (self.rank + 1) * per_rank))
            self.val_dataloader = DataLoader(subset,
                                             batch_size=self.micro_batch_size,
                                             shuffle=False,
                                             num_workers=num_workers)

    def _fsdp_config(self) -> dict[str, Any]:
        cfg = OmegaConf.to_container(cfg_select(self.config, "model.fsdp_config") or OmegaConf.create({}), resolve=True)
        cfg["offload_policy"] = bool(cfg.get("offload_policy") or cfg.get("cpu_offload") or cfg.get("offload_params"))
        return cfg

    def _build_model_optimizer(self) -> None:
        from transformers import AutoModelForCausalLM

        from verl.utils.checkpoint import FSDPCheckpointManager
        from verl.workers.config_helpers import build_lr_scheduler, build_optimizer, import_external_libs
        from verl.workers.fsdp_workers import build_fsdp_model

        model_cfg = self.config.model
        import_external_libs(cfg_select(model_cfg, "external_lib"))
        self.model, self.model_config = build_fsdp_model(
            os.path.expanduser(str(model_cfg.partial_pretrain)),
            AutoModelForCausalLM,
            self.device_mesh,
            fsdp_config=self._fsdp_config(),
            trust_remote_code=bool(cfg_select(model_cfg, "trust_remote_code", False)),
            override_config=cfg_select(model_cfg, "override_config"),
            enable_gradient_checkpointing=bool(cfg_select(model_cfg, "enable_gradient_checkpointing", False)),
            use_liger=bool(cfg_select(model_cfg, "use_liger", False)),
            train=True)
        optim = self.config.optim
        ratio = float(cfg_select(optim, "warmup_steps_ratio", 0.0) or 0.0)
        optim_cfg = {
            "optimizer": cfg_select(optim, "optimizer", "AdamW"),
            "lr": cfg_select(optim, "lr"),
            "weight_decay": cfg_select(optim, "weight_decay", 0.01),
            "betas": OmegaConf.to_container(optim.betas) if cfg_select(optim, "betas") is not None else None,
            "lr_warmup_steps": int(ratio * self.total_training_steps),
            "lr_scheduler_type": cfg_select(optim, "lr_scheduler", "cosine"),
            "total_training_steps": self.total_training_steps,
            "min_lr_ratio": cfg_select(optim, "min_lr_ratio", 0.0),
        }
        self.optimizer = build_optimizer(self.model.parameters(), optim_cfg)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, optim_cfg)
        checkpoint_cfg = cfg_select(self.config, "trainer.checkpoint")
        self.checkpoint_manager = FSDPCheckpointManager(self.model,
                                                        optimizer=self.optimizer,
                                                        lr_scheduler=self.lr_scheduler,
                                                        processing_class=self.tokenizer,
                                                        checkpoint_config=checkpoint_cfg)

    # loss -------------------------------------------------------------------------------------------------------
    def _nll_sum(self, micro: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed negative log-likelihood of the micro-batch's target tokens, and their count."""
        from verl.utils.remove_padding import forward_response_positions
        from verl.utils.torch_functional import logprobs_from_logits

        # rows are right-padded to data.max_length: drop the columns that are padding in every row (they change
        # nothing for the tokens before them under causal attention), so short micro-batches cost less
        valid_columns = micro["attention_mask"].bool().any(dim=0).nonzero()
        width = max(int(valid_columns.max()) + 1 if valid_columns.numel() else 0, 2)
        input_ids = micro["input_ids"][:, :width].to(self.device)
        attention_mask = micro["attention_mask"][:, :width].to(self.device)
        position_ids = micro["position_ids"][:, :width].to(self.device)
        loss_mask = micro["loss_mask"][:, :width].to(self.device)
        seqlen = input_ids.shape[1]
        # positions 0..L-2 predict tokens 1..L-1; only valid positions are computed with use_remove_padding
        logits, selected = forward_response_positions(self.model,
                                                      input_ids,
                                                      attention_mask,
                                                      position_ids,
                                                      response_length=seqlen - 1,
                                                      use_remove_padding=self.use_remove_padding)
        labels = input_ids[:, 1:][selected]
        mask = (loss_mask[:, 1:] * attention_mask[:, 1:])[selected].to(torch.float32)
        log_probs = logprobs_from_logits(logits, labels)
        return -(log_probs * mask).sum(), mask.sum()

    def _micro_batches(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        size = batch["input_ids"].shape[0]
        return [{
            k: v[i:i + self.micro_batch_size] for k, v in batch.items()
        } for i in range(0, size, self.micro_batch_size)]

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on this rank's share of a global batch; returns the metrics (same on every rank)."""
        from verl.utils.fsdp_utils import clip_grad_norm_

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        local_tokens = float((batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).sum())
        global_tokens = _all_reduce_sum([local_tokens], self.device)[0]
        # token mean over the global batch; FSDP averages gradients over ranks, hence the world-size factor
        scale = self.world_size / max(global_tokens, 1.0)
        micro_batches = self._micro_batches(batch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, micro in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            if hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(sync)  # reduce-scatter once, after the last micro-batch
            nll, _ = self._nll_sum(micro)
            (nll * scale).backward()
            loss_sum += nll.detach().to(torch.float64)
        clip = cfg_select(self.config, "optim.clip_grad", 1.0)
        grad_norm = clip_grad_norm_(self.model.parameters(), max_norm=float(clip) if clip else None)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:
            if self.rank == 0:
                print(f"[verl] step {self.global_step + 1}: gradient norm is {grad_norm.item()}; skipping the update",
                      flush=True)
            self.optimizer.zero_grad(set_to_none=True)
        lr = float(self.lr_scheduler.get_last_lr()[0])
        self.lr_scheduler.step()
        total_loss = _all_reduce_sum([loss_sum.item()], self.device)[0]
        return {
            "train/loss": total_loss / max(global_tokens, 1.0),
            "train/lr": lr,
            "train/grad_norm": float(grad_norm.item()),
            "train/global_tokens": global_tokens,
        }

    @torch.no_grad()
    def validation_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """Summed NLL and target-token count of one micro-batch (this rank's)."""
        self.model.eval()
        nll, count = self._nll_sum(batch)
        return float(nll.item()), float(count.item())

    def validate(self) -> dict[str, float]:
        """Token-mean NLL over the whole validation set (``val/loss``); every rank must call it."""
        if self.val_dataloader is None:
            return {}
        nll_sum, tokens = 0.0, 0.0
        for batch in self.val_dataloader:
            nll, count = self.validation_step(batch)
            nll_sum += nll
            tokens += count
        nll_sum, tokens = _all_reduce_sum([nll_sum, tokens], self.device)
        self.model.train()
        return {"val/loss": nll_sum / max(tokens, 1.0)}

    # checkpoints ------------------------------------------------------------------------------------------------
    @property
    def default_local_dir(self) -> str:
        return os.path.abspath(os.path.expanduser(str(self.config.trainer.default_local_dir)))

    def save_checkpoint(self, step: int, with_hf_weights: bool = False) -> str:
        """Save ``global_step_{step}`` (every rank calls it), then move the tracker to it and prune old ones."""
        from verl.utils.checkpoint import atomic_torch_save, write_latest_checkpointed_iteration

        path = os.path.join(self.default_local_dir, f"global_step_{step}")
        contents = list(self.checkpoint_manager.checkpoint_save_contents)
        if with_hf_weights and "hf_model" not in contents:
            self.checkpoint_manager.checkpoint_save_contents = contents + ["hf_model"]
        try:
            hdfs = cfg_select(self.config, "trainer.default_hdfs_dir")
            self.checkpoint_manager.save_checkpoint(local_path=path, global_step=step)
        finally:
            self.checkpoint_manager.checkpoint_save_contents = contents
        if self.rank == 0:
            epoch, offset = divmod(step, self.steps_per_epoch)
            atomic_torch_save(
                {
                    "global_step": step,
                    "epoch": epoch,
                    "batches_into_epoch": offset,
                    "steps_per_epoch": self.steps_per_epoch,
                    "data_seed": self.data_seed,
                    "train_batch_size": int(self.config.data.train_batch_size),
                }, os.path.join(path, DATA_STATE_FILE))
            write_latest_checkpointed_iteration(self.default_local_dir, step)
            self._prune_checkpoints(step)
            if hdfs:
                from verl.utils.checkpoint.fsdp_checkpoint_manager import _copy_dir_to

                _copy_dir_to(path, os.path.join(os.path.expanduser(str(hdfs)), f"global_step_{step}"))
        dist.barrier()
        self.last_checkpoint = path
        if self.rank == 0:
            print(f"[verl] saved checkpoint {path}", flush=True)
        return path

    def _prune_checkpoints(self, newest: int) -> None:
        """Keep the newest ``trainer.max_ckpt_to_keep`` step directories (after the tracker moved: a crash in
        between never leaves the tracker naming a removed step)."""
        keep = cfg_select(self.config, "trainer.max_ckpt_to_keep")
        if not keep or int(keep) <= 0:
            return
        steps = []
        for candidate in glob.glob(os.path.join(glob.escape(self.default_local_dir), "global_step_*")):
            match = _STEP_DIR.search(candidate)
            if match and os.path.isdir(candidate):
                steps.append((int(match.group(1)), candidate))
        steps.sort()
        for step, candidate in steps[:-int(keep)]:
            if step != newest:
                shutil.rmtree(candidate, ignore_errors=True)

    def _resume_path(self) -> Optional[str]:
        from verl.utils.checkpoint import find_latest_ckpt_path

        mode = str(cfg_select(self.config, "trainer.resume_mode", "auto"))
        if mode == "disable":
            return None
        if mode == "resume_path":
            return os.path.abspath(os.path.expanduser(str(self.config.trainer.resume_from_path)))
        return find_latest_ckpt_path(self.default_local_dir) if os.path.isdir(self.default_local_dir) else None

    def load_checkpoint(self) -> int:
        """Restore model, optimizer, scheduler and RNG from the checkpoint that ``trainer.resume_mode`` selects;
        returns its step (0 when starting fresh)."""
        path = self._resume_path()
        if path is None:
            return 0
        state_file = os.path.join(path, DATA_STATE_FILE)
        if not os.path.isfile(state_file):
            raise FileNotFoundError(f"{path} has no {DATA_STATE_FILE}, so it is not a complete SFT checkpoint; set "
                                    "trainer.resume_mode=disable or point trainer.resume_from_path at a global_step_N "
                                    "directory written by this trainer")
        state = torch.load(state_file, weights_only=True)
        for key, now in (("train_batch_size", int(self.config.data.train_batch_size)), ("steps_per_epoch",
                                                                                        self.steps_per_epoch)):
            if int(state.get(key, now)) != now:
                raise ConfigError(f"data.train_batch_size: the checkpoint {path} was written with {key}={state[key]}, "
                                  f"this run has {now}, so the data position cannot be restored. Fix: use the saving "
                                  "run's data settings, or trainer.resume_mode=disable")
        self.checkpoint_manager.load_checkpoint(path)
        step = int(state["global_step"])
        if self.rank == 0:
            print(f"[verl] resumed from {path} (step {step})", flush=True)
        self.last_checkpoint = path
        return step

    # loop -------------------------------------------------------------------------------------------------------
    def _tracker(self) -> Any:
        if self.rank != 0:
            return None
        from verl.utils.tracking import Tracking

        return Tracking(project_name=str(self.config.trainer.project_name),
                        experiment_name=str(self.config.trainer.experiment_name),
                        default_backend=cfg_select(self.config, "trainer.logger", ["console"]),
                        config=OmegaConf.to_container(self.config, resolve=True))

    def _log(self, tracker: Any, metrics: dict[str, Any], step: int) -> None:
        if self.rank != 0:
            return
        self.history.append({"step": step, **metrics})
        if tracker is not None:
            tracker.log(data=metrics, step=step)

    def fit(self) -> None:
        """Train to ``total_training_steps`` (resuming first), validating every ``test_freq`` steps and at the end,
        saving every ``save_freq`` steps and at the end."""
        self.global_step = self.load_checkpoint()
        total = self.total_training_steps
        if self.global_step >= total:
            if self.rank == 0:
                print(
                    f"[verl] the checkpoint is at step {self.global_step}, total_training_steps is {total}: nothing "
                    "to train. Raise trainer.total_training_steps (or total_epochs) to train further, or set "
                    "trainer.resume_mode=disable to start over",
                    flush=True)
            return
        tracker = self._tracker()
        test_freq = int(cfg_select(self.config, "trainer.test_freq", -1))
        save_freq = int(cfg_select(self.config, "trainer.save_freq", -1))
        save_final = bool(cfg_select(self.config, "trainer.save_final", True))
        progress = None
        if self.rank == 0:
            from tqdm import tqdm

            progress = tqdm(total=total, initial=self.global_step, desc="SFT", disable=not sys.stderr.isatty())
        try:
            epoch, offset = divmod(self.global_step, self.steps_per_epoch)
            while self.global_step < total:
                self.train_sampler.set_epoch(epoch, skip=offset * self.batch_per_rank)
                for batch in self.train_dataloader:
                    start = time.time()
                    metrics = self.training_step(batch)
                    self.global_step += 1
                    metrics["train/epoch"] = epoch
                    metrics["timing_s/step"] = time.time() - start
                    last = self.global_step >= total
                    if self.val_dataloader is not None and (last or
                                                            (test_freq > 0 and self.global_step % test_freq == 0)):
                        val_start = time.time()
                        metrics.update(self.validate())
                        metrics["timing_s/validation"] = time.time() - val_start
                    self._log(tracker, metrics, self.global_step)
                    if progress is not None:
                        progress.update(1)
                    if (last and save_final) or (save_freq > 0 and self.global_step % save_freq == 0):
                        self.save_checkpoint(self.global_step, with_hf_weights=last)
                    if last:
                        break
                epoch, offset = epoch + 1, 0
        finally:
            if progress is not None:
                progress.close()
            if tracker is not None:
                tracker.finish()

    @property
    def hf_model_dir(self) -> Optional[str]:
        """``<last checkpoint>/huggingface`` when it holds full weights (the final checkpoint), else None."""
        if self.last_checkpoint is None:
            return None
        path = os.path.join(self.last_checkpoint, HF_SUBDIR)
        has_weights = any(
            f.endswith((".safetensors", ".bin")) for f in os.listdir(path)) if os.path.isdir(path) else False
        return path if has_weights else None


# ----------------------------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------------------------


def _apply_device(config: DictConfig) -> None:
    """``trainer.device=cpu`` on a machine with a GPU: take the CPU path (gloo, fp32) in this process."""
    if str(cfg_select(config, "trainer.device", "auto")) == "cpu" and is_cuda_available():
        os.environ["VERL_DEVICE"] = "cpu"
        is_cuda_available.cache_clear()


def run_sft(config: Any) -> dict[str, Any]:
    """Build and run an SFT job from an ``sft_trainer.yaml``-shaped config (a DictConfig or nested dict; missing
    keys take the yaml defaults). Works under torchrun and in a plain process (a one-rank group is started and
    closed). Returns ``{"global_step", "checkpoint_dir", "hf_model_dir", "history"}`` (history on rank 0)."""
    defaults = OmegaConf.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "sft_trainer.yaml"))
    if not isinstance(config, DictConfig):
        config = OmegaConf.create(config)
    config = OmegaConf.merge(defaults, config)
    OmegaConf.resolve(config)
    _apply_device(config)
    created = _ensure_process_group()
    try:
        trainer = FSDPSFTTrainer(config)
        trainer.fit()
        return {
            "global_step": trainer.global_step,
            "checkpoint_dir": trainer.last_checkpoint,
            "hf_model_dir": trainer.hf_model_dir,
            "history": list(trainer.history),
        }
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


@hydra.main(config_path="config", config_name="sft_trainer", version_base=None)
def main(config: DictConfig) -> None:
    """``torchrun --nproc_per_node=N -m verl.trainer.fsdp_sft_trainer key=value ...``; a config error is printed as
    one line (exit status 2) instead of a traceback."""
    try:
        run_sft(config)
    except ConfigError as exc:
        print(f"[verl] config error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
