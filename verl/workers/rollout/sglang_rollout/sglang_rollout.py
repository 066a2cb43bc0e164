"""Rollout on SGLang (``actor_rollout_ref.rollout.name=sglang``): the same prompts in and output schema out as the
HF and vLLM rollouts (:mod:`verl.workers.rollout.schemas`).

The engine is SGLang's offline ``Engine`` in this process group, or, with
``actor_rollout_ref.rollout.http_server.enable=True``, an SGLang HTTP server (launched on ``127.0.0.1`` by this
worker, or an existing one at ``http_server.address``); both through the adapters of
:mod:`verl.workers.rollout.sglang_rollout.engine`. With ``tensor_model_parallel_size > 1`` (GPU only) one engine
serves each tensor-parallel group: the group's first rank owns it (its TP ranks run on the group's GPUs), generates
for the group's prompts (which the sharding manager all-gathers first) and broadcasts the results to the others.

Per call:

* prompts are the unpadded tokens of the left-padded ``input_ids`` (``attention_mask == 1``), so the engine is
  conditioned on exactly what the actor will score;
* sampling: :func:`verl.workers.rollout.sglang_rollout.sampling.resolve_sampling` (``val_kwargs`` when
  ``meta_info["validate"]``; ``meta_info["n"]`` samples per row, interleaved; the trainer applies ``rollout.n`` by
  repeating the batch, as for the other backends);
* ``max_new_tokens`` is clamped per request to ``context_length - prompt_length``, so a long prompt gets a shorter
  response instead of an SGLang error (no engine patch needed);
* EOS: the ``meta_info`` / tokenizer / model EOS ids are passed as ``stop_token_ids``, and ``response_mask`` stops
  after the first of them, as for the HF rollout;
* ``calculate_log_probs``: ``rollout_log_probs`` from SGLang's ``output_token_logprobs`` (log-softmax of the logits
  at the sampling temperature; temperature 1 for greedy, like the HF rollout).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from verl.protocol import DataProto
from verl.utils.config import ConfigError, cfg_select
from verl.utils.device import get_device_id, is_cuda_available
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.schemas import build_rollout_output, check_prompt_batch, normalize_eos_token_id
from verl.workers.rollout.sglang_rollout.engine import HttpServerEngine, OfflineEngine
from verl.workers.rollout.sglang_rollout.sampling import engine_kwargs_from_config, resolve_sampling

__all__ = ["SGLangRollout", "prompt_token_lists"]

logger = logging.getLogger(__name__)

_R = "actor_rollout_ref.rollout"


def _first_not_none(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def prompt_token_lists(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The tokens of each (left-padded) row where ``attention_mask`` is 1."""
    ids = input_ids.detach().cpu()
    mask = attention_mask.detach().cpu().bool()
    return [row[m].tolist() for row, m in zip(ids, mask)]


class SGLangRollout(BaseRollout):
    """Generate with SGLang; see the module docstring.

    Args:
        model_path: local Hugging Face model directory the engine loads (config, tokenizer, and the weights unless
            ``load_format="dummy"``, where the hybrid engine's first weight sync supplies them).
        config: the ``actor_rollout_ref.rollout`` node.
        tokenizer: supplies ``eos_token_id`` / ``pad_token_id`` when ``meta_info`` does not.
        model_hf_config: the model's ``PretrainedConfig`` (EOS/pad fallback, context length).
        engine: an already built engine adapter (``OfflineEngine`` / ``HttpServerEngine``); built from ``config``
            when omitted.
        device_mesh: a 2-D mesh ``("dp", "infer_tp")`` over the worker ranks when tensor parallel; ``None``: every
            rank is its own engine.
        load_format: SGLang ``load_format`` (``"dummy"``: random weights until the first sync); default: the real
            weights from ``model_path``.
        trust_remote_code: passed to SGLang.
    """

    def __init__(self,
                 model_path: str,
                 config: Any,
                 tokenizer: Any = None,
                 model_hf_config: Any = None,
                 *,
                 engine: Any = None,
                 device_mesh: Any = None,
                 load_format: str | None = None,
                 trust_remote_code: bool = False,
                 **kwargs: Any) -> None:
        super().__init__()
        self.model_path = model_path
        self.config = config if config is not None else {}
        self.tokenizer = tokenizer
        self.model_hf_config = model_hf_config
        self.device_mesh = device_mesh
        self.on_gpu = is_cuda_available()
        self.tp_size, self.tp_rank, self.tp_group, self.tp_src = 1, 0, None, 0
        dp_rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if device_mesh is not None and "infer_tp" in (device_mesh.mesh_dim_names or ()):
            self.tp_size = int(device_mesh["infer_tp"].size())
            self.tp_rank = int(device_mesh["infer_tp"].get_local_rank())
            self.tp_group = device_mesh["infer_tp"].get_group()
            self.tp_src = int(device_mesh["infer_tp"].mesh.flatten()[0].item())
            dp_rank = int(device_mesh["dp"].get_local_rank())
        self.engine_kwargs = engine_kwargs_from_config(self.config,
                                                       model_path,
                                                       on_gpu=self.on_gpu,
                                                       load_format=load_format,
                                                       seed_offset=dp_rank)
        if trust_remote_code:
            self.engine_kwargs.setdefault("trust_remote_code", True)
        if self.on_gpu:
            self.engine_kwargs.setdefault("base_gpu_id", get_device_id())
        self.engine = engine
        if self.engine is None and self.tp_rank == 0:
            self.engine = self._build_engine()
        self.context_length = self._context_length()
        self.max_input_length = getattr(self.engine, "max_input_length", None) if self.engine is not None else None
        if self.max_input_length is None and self.context_length:
            self.max_input_length = int(self.context_length) - 7  # SGLang keeps 6 tokens of the context in reserve

    # ------------------------------------------------------------------------------------------------ engine ---
    def _build_engine(self) -> Any:
        http = cfg_select(self.config, "http_server", None) or {}
        if bool(cfg_select(http, "enable", False)):
            return HttpServerEngine(address=cfg_select(http, "address", None),
                                    engine_kwargs=self.engine_kwargs,
                                    request_timeout_s=float(cfg_select(http, "request_timeout_s", None) or 3600),
                                    launch_timeout_s=float(cfg_select(http, "launch_timeout_s", None) or 600),
                                    log_path=cfg_select(http, "log_path", None))
        return OfflineEngine(self.engine_kwargs)

    def _context_length(self) -> int | None:
        from_engine = getattr(self.engine, "context_length", None) if self.engine is not None else None
        return _first_not_none(from_engine, self.engine_kwargs.get("context_length"),
                               getattr(self.model_hf_config, "max_position_embeddings", None))

    @property
    def skip_tokenizer_init(self) -> bool:
        return bool(self.engine_kwargs.get("skip_tokenizer_init", True))

    def shutdown(self) -> None:
        """Stop the engine (and a server this rollout launched)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()

    # --------------------------------------------------------------------------------------------- settings ---
    def _token_ids(self, meta_info: dict) -> tuple[list[int], int]:
        tok, cfg = self.tokenizer, self.model_hf_config
        eos = _first_not_none(meta_info.get("eos_token_id"), getattr(tok, "eos_token_id", None),
                              getattr(cfg, "eos_token_id", None))
        pad = _first_not_none(meta_info.get("pad_token_id"), getattr(tok, "pad_token_id", None),
                              getattr(cfg, "pad_token_id", None))
        eos_ids = normalize_eos_token_id(eos)
        if pad is None:
            if not eos_ids:
                raise ValueError("SGLangRollout: no pad_token_id (nor eos_token_id to pad with); pass meta_info"
                                 "['pad_token_id'] or a tokenizer with a pad token")
            pad = eos_ids[0]
        return eos_ids, int(pad)

    def _max_new_tokens(self, prompt_len: int, response_length: int) -> int:
        if self.max_input_length is not None and prompt_len > self.max_input_length:
            raise ConfigError(f"{_R}: a prompt of {prompt_len} tokens is longer than the {self.max_input_length} "
                              f"tokens the engine accepts (its context is {self.context_length} tokens). Fix: lower "
                              f"data.max_prompt_length (with data.filter_overlong_prompts=True) or raise "
                              f"{_R}.max_model_len")
        if not self.context_length:
            return response_length
        return max(1, min(response_length, int(self.context_length) - prompt_len))

    # ------------------------------------------------------------------------------------------- generation ---
    @torch.no_grad()
    def generate_sequences(self, prompts: DataProto) -> DataProto:
        """Generate for every prompt row (see the module docstring); returns the rollout output schema."""
        check_prompt_batch(prompts)
        meta_info = prompts.meta_info or {}
        eos, pad = self._token_ids(meta_info)
        sampling = resolve_sampling(self.config,
                                    meta_info,
                                    eos_token_id=eos,
                                    pad_token_id=pad,
                                    allow_tokenizer_params=not self.skip_tokenizer_init)
        batch = prompts.batch
        rows = [p for p in prompt_token_lists(batch["input_ids"], batch["attention_mask"]) for _ in range(sampling.n)]

        responses: list[list[int]] | None = None
        log_probs: list[list[float]] | None = None
        if self.engine is not None:
            responses, log_probs = self._generate(rows, sampling)
        if self.tp_size > 1:  # the group's first rank generated; everyone builds the same output
            box = [(responses, log_probs)]
            dist.broadcast_object_list(box, src=self.tp_src, group=self.tp_group)
            responses, log_probs = box[0]
        if responses is None:
            raise RuntimeError("SGLangRollout: this rank has no engine and received no responses")
        return build_rollout_output(batch["input_ids"],
                                    batch["attention_mask"],
                                    batch["position_ids"] if "position_ids" in batch.keys() else None,
                                    responses,
                                    response_length=sampling.response_length,
                                    pad_token_id=pad,
                                    eos_token_id=sampling.eos_token_id,
                                    n=sampling.n,
                                    rollout_log_probs=log_probs if sampling.return_logprob else None,
                                    non_tensor_batch=prompts.non_tensor_batch)

    def _generate(self, rows: list[list[int]], sampling: Any) -> tuple[list[list[int]], list[list[float]] | None]:
        params = [sampling.request_params(self._max_new_tokens(len(r), sampling.response_length)) for r in rows]
        outputs = self.engine.generate(rows, params, sampling.return_logprob)
        if len(outputs) != len(rows):
            raise RuntimeError(f"SGLang returned {len(outputs)} results for {len(rows)} requests")
        responses, log_probs = [], []
        for out in outputs:
            ids = [int(t) for t in out["output_ids"]][:sampling.response_length]
            responses.append(ids)
            if sampling.return_logprob:
                entries = (out.get("meta_info") or {}).get("output_token_logprobs") or []
                lp = [float(e[0]) if e[0] is not None else 0.0 for e in entries][:len(ids)]
                if len(lp) != len(ids):
                    raise RuntimeError(f"SGLang returned {len(lp)} log-probs for {len(ids)} generated tokens")
                log_probs.append(lp)
        return responses, (log_probs if sampling.return_logprob else None)
