"""Rollout with Hugging Face ``generate``: the backend that runs everywhere (CPU included) without an engine.

It generates from the dataset's left-padded ``input_ids`` / ``attention_mask`` / ``position_ids`` and returns the
shared output schema (:mod:`verl.workers.rollout.schemas`). Sampling follows ``actor_rollout_ref.rollout``:

* ``do_sample``, ``temperature``, ``top_p``, ``top_k`` (``-1``/``0`` = off), ``response_length``, ``ignore_eos``;
  ``meta_info`` keys of the same names override them per call (``do_sample=False`` = greedy).
* ``meta_info["validate"]``: sampling from ``rollout.val_kwargs`` (greedy when ``val_kwargs.do_sample`` is false or
  its temperature is 0).
* ``meta_info["n"]`` (default 1): samples per input row, returned as consecutive rows with the non-tensor columns
  repeated (``a a b b``). The trainer applies ``rollout.n`` / ``val_kwargs.n`` itself by repeating the batch
  (interleaved) before calling the rollout, as upstream verl does, so ``rollout.n`` is *not* applied again here.
* ``micro_batch_size`` (prompts per ``generate`` call; default: the whole batch) bounds the KV-cache memory.
* ``calculate_log_probs``: also return ``rollout_log_probs``, ``log_softmax(logits / temperature)`` of each
  generated token from the raw model logits (temperature 1 for greedy), recorded step by step so that only one
  ``[batch, vocab]`` distribution is held at a time.
* ``seed`` (default 0, plus the data-parallel rank): the rollout keeps its own random stream, so sampling is
  reproducible and independent of other uses of the global generator.

Only the sampling parameters given here act: the model's ``generation_config.json`` (repetition penalty, default
top-k, ...) is ignored while generating, as for the vLLM/SGLang backends.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from verl.protocol import DataProto
from verl.utils.config import cfg_select
from verl.utils.device import get_torch_device, is_cuda_available
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.schemas import build_rollout_output, check_prompt_batch, normalize_eos_token_id

__all__ = ["HFRollout", "SamplingSettings"]


@dataclass
class SamplingSettings:
    """The resolved sampling parameters of one ``generate_sequences`` call."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    n: int
    response_length: int
    eos_token_id: list[int]
    pad_token_id: int
    calculate_log_probs: bool

    @property
    def log_prob_temperature(self) -> float:
        """Temperature the returned log-probs are taken at (1 for greedy decoding)."""
        return self.temperature if self.do_sample and self.temperature > 0 else 1.0


class _RolloutRNG:
    """A private random stream: entering swaps it in for the global CPU (and accelerator) generator, leaving saves
    where it got to and restores the caller's state."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._cpu_state = torch.get_rng_state()
        self._device_state = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        device = get_torch_device() if is_cuda_available() else None
        saved_cpu = torch.get_rng_state()
        saved_device = device.get_rng_state() if device is not None else None
        torch.set_rng_state(self._cpu_state)
        if device is not None:
            if self._device_state is None:
                device.manual_seed(self.seed)
            else:
                device.set_rng_state(self._device_state)
        try:
            yield
        finally:
            self._cpu_state = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if device is not None:
                self._device_state = device.get_rng_state()
                device.set_rng_state(saved_device)


class _LogProbRecorder:
    """A logits processor that leaves the scores untouched and records ``log_softmax(raw_logits / T)`` of each
    generated token. It runs before the temperature / top-k / top-p warpers (custom processors come first in
    ``generate``), so it sees the raw logits. At step ``t`` the last input token is the one chosen at step ``t-1``."""

    def __init__(self, temperature: float) -> None:
        self.temperature = float(temperature)
        self._previous: torch.Tensor | None = None
        self.log_probs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._previous is not None:
            self._take(input_ids[:, -1])
        self._previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        self.log_probs.append(self._previous.gather(-1, tokens[:, None].long()).squeeze(-1))
        self._previous = None

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """``[batch, steps]`` log-probs given the generated ids ``[batch, steps]``."""
        if self._previous is not None:
            self._take(generated[:, len(self.log_probs)])
        if len(self.log_probs) != generated.shape[1]:
            raise RuntimeError(
                f"recorded {len(self.log_probs)} log-prob steps for {generated.shape[1]} generated tokens")
        if not self.log_probs:
            return torch.zeros(generated.shape, dtype=torch.float32, device=generated.device)
        return torch.stack(self.log_probs, dim=1)


@contextlib.contextmanager
def _only_explicit_generation_config(module: nn.Module) -> Iterator[None]:
    """``generate`` fills every unset parameter from ``module.generation_config`` (e.g. a checkpoint's repetition
    penalty or top-k); swap in an empty one so that only the rollout config acts."""
    from transformers import GenerationConfig

    had = hasattr(module, "generation_config")
    previous = getattr(module, "generation_config", None)
    module.generation_config = GenerationConfig()
    try:
        yield
    finally:
        if had:
            module.generation_config = previous
        else:
            del module.generation_config


def _first_not_none(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


class HFRollout(BaseRollout):
    """Generate with ``module.generate`` (a Hugging Face causal LM, unsharded: the hybrid engine's sharding
    manager keeps its weights equal to the actor's).

    Args:
        module: the causal LM to generate with (``transformers`` ``GenerationMixin``).
        config: the ``actor_rollout_ref.rollout`` config node (DictConfig or dict).
        tokenizer: optional; supplies ``eos_token_id`` / ``pad_token_id`` when neither ``meta_info`` nor the model
            config has them.
    """

    def __init__(self, module: nn.Module, config: Any, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__()
        if not hasattr(module, "generate"):
            raise TypeError(f"HFRollout needs a Hugging Face generation model (with .generate), got "
                            f"{type(module).__name__}; build it with AutoModelForCausalLM")
        self.module = module
        self.config = config if config is not None else {}
        self.tokenizer = tokenizer
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._rng = _RolloutRNG(int(self._cfg("seed", 0) or 0) + rank)

    # --------------------------------------------------------------------------------------------- settings ---
    def _cfg(self, key: str, default: Any = None) -> Any:
        value = cfg_select(self.config, key, default)
        return default if value is None else value

    def _token_ids(self, meta_info: dict) -> tuple[list[int], int]:
        gen_cfg = getattr(self.module, "generation_config", None)
        model_cfg = getattr(self.module, "config", None)
        tok = self.tokenizer
        eos = _first_not_none(meta_info.get("eos_token_id"), getattr(tok, "eos_token_id", None),
                              getattr(gen_cfg, "eos_token_id", None), getattr(model_cfg, "eos_token_id", None))
        pad = _first_not_none(meta_info.get("pad_token_id"), getattr(tok, "pad_token_id", None),
                              getattr(gen_cfg, "pad_token_id", None), getattr(model_cfg, "pad_token_id", None))
        eos_ids = normalize_eos_token_id(eos)
        if pad is None:
            if not eos_ids:
                raise ValueError("HFRollout: no pad_token_id (nor eos_token_id to pad with); pass meta_info"
                                 "['pad_token_id'] or a tokenizer with a pad token")
            pad = eos_ids[0]
        if self._cfg("ignore_eos", False):
            eos_ids = []
        return eos_ids, int(pad)

    def sampling_settings(self, meta_info: dict) -> SamplingSettings:
        """Resolve the sampling parameters of a call from the rollout config and ``meta_info`` overrides."""
        validate = bool(meta_info.get("validate", False))
        if validate:
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
            raise ValueError(f"rollout top_p must be in (0, 1], got {top_p}; set actor_rollout_ref.rollout.top_p=1.0")
        response_length = meta_info.get("response_length", self._cfg("response_length"))
        if response_length is None or int(response_length) < 1:
            raise ValueError(f"rollout response_length must be a positive int, got {response_length!r}; set "
                             "actor_rollout_ref.rollout.response_length (data.max_response_length)")
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

    def _generation_config(self, s: SamplingSettings) -> Any:
        from transformers import GenerationConfig

        kwargs: dict[str, Any] = dict(max_new_tokens=s.response_length,
                                      min_new_tokens=0,
                                      do_sample=s.do_sample,
                                      num_beams=1,
                                      num_return_sequences=1,
                                      eos_token_id=s.eos_token_id or None,
                                      pad_token_id=s.pad_token_id,
                                      use_cache=True,
                                      return_dict_in_generate=True)
        if s.do_sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        return GenerationConfig(**kwargs)

    # ------------------------------------------------------------------------------------------- generation ---
    @torch.no_grad()
    def generate_sequences(self, prompts: DataProto) -> DataProto:
        """Generate for every prompt row (see the module docstring); returns the rollout output schema."""
        check_prompt_batch(prompts)
        settings = self.sampling_settings(prompts.meta_info or {})
        batch_size = len(prompts)
        micro = self._cfg("micro_batch_size", None)
        micro = batch_size if micro is None or int(micro) <= 0 else int(micro)

        was_training = self.module.training
        self.module.eval()
        responses, log_probs = [], []
        try:
            for start in range(0, batch_size, micro):
                resp, lp = self._generate_micro_batch(prompts.batch[start:start + micro], settings)
                responses.append(resp)
                log_probs.append(lp)
        finally:
            self.module.train(was_training)

        longest = max(r.shape[1] for r in responses)
        pad = settings.pad_token_id
        responses_t = torch.cat([torch.nn.functional.pad(r, (0, longest - r.shape[1]), value=pad) for r in responses])
        log_probs_t = None
        if settings.calculate_log_probs:
            log_probs_t = torch.cat([torch.nn.functional.pad(lp, (0, longest - lp.shape[1])) for lp in log_probs])
        batch = prompts.batch
        return build_rollout_output(batch["input_ids"],
                                    batch["attention_mask"],
                                    batch["position_ids"] if "position_ids" in batch.keys() else None,
                                    responses_t,
                                    response_length=settings.response_length,
                                    pad_token_id=pad,
                                    eos_token_id=settings.eos_token_id,
                                    n=settings.n,
                                    rollout_log_probs=log_probs_t,
                                    non_tensor_batch=prompts.non_tensor_batch)

    def _generate_micro_batch(self, batch: Any, s: SamplingSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``generate`` on one micro-batch; returns its responses ``[rows * n, r]`` (and log-probs) on the input's
        device, ``r <= response_length``."""
        from transformers import LogitsProcessorList

        device = next(self.module.parameters()).device
        input_device = batch["input_ids"].device
        # prompts are left-padded to data.max_prompt_length: columns that are padding in every row only cost KV-cache
        # and attention work at every decode step, and change nothing, so generate without them
        real_columns = batch["attention_mask"].bool().any(dim=0).nonzero()
        first = int(real_columns[0]) if len(real_columns) else 0
        input_ids = batch["input_ids"][:, first:].to(device)
        attention_mask = batch["attention_mask"][:, first:].to(device)
        position_ids = batch["position_ids"][..., first:].to(device) if "position_ids" in batch.keys() else None
        if s.n > 1:
            input_ids = input_ids.repeat_interleave(s.n, dim=0)
            attention_mask = attention_mask.repeat_interleave(s.n, dim=0)
            position_ids = position_ids.repeat_interleave(s.n, dim=0) if position_ids is not None else None
        kwargs: dict[str, Any] = {}
        if position_ids is not None and position_ids.dim() == 2:
            kwargs["position_ids"] = position_ids  # (multi-axis rope positions are the model's own business)
        recorder = _LogProbRecorder(s.log_prob_temperature) if s.calculate_log_probs else None
        if recorder is not None:
            kwargs["logits_processor"] = LogitsProcessorList([recorder])

        with _only_explicit_generation_config(self.module), self._rng.active():
            output = self.module.generate(input_ids=input_ids,
                                          attention_mask=attention_mask,
                                          generation_config=self._generation_config(s),
                                          **kwargs)
        sequences = output.sequences if hasattr(output, "sequences") else output
        generated = sequences[:, input_ids.shape[1]:]
        log_probs = recorder.finish(generated).to(input_device) if recorder is not None else None
        return generated.to(input_device), log_probs
