"""The rollout output schema, built in one place for every backend (HF, vLLM, SGLang).

A backend only produces, for each output row, the generated token ids (and optionally their log-probs); this module
turns them and the prompt batch into the ``DataProto`` the trainer consumes:

===================== ============== =================================================================================
key                   shape          meaning
===================== ============== =================================================================================
``prompts``           ``[N, P]``     the left-padded prompt ids, as given
``responses``         ``[N, R]``     generated ids, right-padded with the pad id to ``R = response_length``
``input_ids``         ``[N, P+R]``   ``cat(prompts, responses)``
``attention_mask``    ``[N, P+R]``   the prompt mask, then ``response_mask``
``position_ids``      ``[N, P+R]``   the prompt positions, then ``last prompt position + 1, + 2, ...`` (also
                                     ``[N, C, P+R]`` for multi-axis rope, e.g. Qwen2-VL's ``C=3``)
``response_mask``     ``[N, R]``     1 for generated tokens up to and including the first EOS, 0 after and on padding
``rollout_log_probs`` ``[N, R]``     optional: the engine's log-prob of each generated token, 0 where masked
===================== ============== =================================================================================

``N = B * n``: each of the ``B`` prompts yields ``n`` consecutive rows (interleaved, ``a a b b``), and every
non-tensor column of the prompt batch (``uid``, ``data_source``, ``reward_model``, ...) is repeated the same way, so
that groups sharing a ``uid`` stay contiguous.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np
import torch

from verl.protocol import DataProto
from verl.utils.torch_functional import get_response_mask, pad_2d_list_to_length, pad_sequence_to_length

__all__ = [
    "ROLLOUT_OUTPUT_KEYS", "normalize_eos_token_id", "build_rollout_output", "build_rollout_output_from_prompts",
    "check_prompt_batch"
]

ROLLOUT_OUTPUT_KEYS = ("prompts", "responses", "input_ids", "attention_mask", "position_ids", "response_mask")

TokenRows = Union[torch.Tensor, Sequence[Sequence[int]]]
FloatRows = Union[torch.Tensor, Sequence[Sequence[float]]]


def normalize_eos_token_id(eos_token_id: Any) -> list[int]:
    """``None`` / one id / a list of ids -> a list of ints (empty: no EOS, responses end only by length)."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        return [int(x) for x in eos_token_id.reshape(-1).tolist()]
    if isinstance(eos_token_id, (list, tuple, np.ndarray)) or hasattr(eos_token_id, "__iter__"):
        return [int(x) for x in eos_token_id]
    return [int(eos_token_id)]


def _repeat_rows(value: Any, n: int) -> Any:
    """Interleaved repetition (``a a b b``) of a tensor or a numpy column along dim 0."""
    if n == 1:
        return value
    if isinstance(value, torch.Tensor):
        return value.repeat_interleave(n, dim=0)
    index = np.repeat(np.arange(len(value)), n)
    return value[index]


def _rows_to_tensor(rows: TokenRows, length: int, pad: int | float, dtype: torch.dtype, what: str,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``rows`` (a tensor or lists) to ``length``; returns ``(padded [N, length], valid_lengths [N])``."""
    if isinstance(rows, torch.Tensor):
        if rows.dim() != 2:
            raise ValueError(f"{what} must be a 2-D tensor [rows, tokens], got shape {tuple(rows.shape)}")
        if rows.shape[1] > length:
            raise ValueError(f"{what} has {rows.shape[1]} tokens per row, more than response_length={length}; "
                             "generate with max_tokens=response_length (rollout.response_length)")
        lengths = torch.full((rows.shape[0],), rows.shape[1], dtype=torch.long)
        padded = pad_sequence_to_length(rows.to(device=device, dtype=dtype), length, pad)
        return padded, lengths
    rows = [list(r) for r in rows]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    too_long = [i for i, r in enumerate(rows) if len(r) > length]
    if too_long:
        raise ValueError(f"{what}: rows {too_long[:8]} have more than response_length={length} tokens; generate with "
                         "max_tokens=response_length (rollout.response_length)")
    if dtype.is_floating_point:
        padded = torch.full((len(rows), length), float(pad), dtype=dtype)
        for i, r in enumerate(rows):
            if r:
                padded[i, :len(r)] = torch.as_tensor(r, dtype=dtype)
    else:
        padded = pad_2d_list_to_length(rows, int(pad), max_length=length).to(dtype)
    return padded.to(device), lengths


def build_rollout_output(prompt_ids: torch.Tensor,
                         prompt_attention_mask: torch.Tensor,
                         prompt_position_ids: torch.Tensor | None,
                         responses: TokenRows,
                         response_length: int,
                         pad_token_id: int,
                         eos_token_id: int | Sequence[int] | None,
                         n: int = 1,
                         rollout_log_probs: FloatRows | None = None,
                         non_tensor_batch: dict[str, np.ndarray] | None = None,
                         meta_info: dict | None = None) -> DataProto:
    """Assemble the rollout output schema (see the module docstring).

    Args:
        prompt_ids, prompt_attention_mask: ``[B, P]`` left-padded prompts and their mask, one row per prompt.
        prompt_position_ids: ``[B, P]`` or ``[B, C, P]``; ``None`` computes them from the mask.
        responses: ``B * n`` rows in interleaved order (row ``i * n + j`` is sample ``j`` of prompt ``i``), each the
            generated ids: lists of any length up to ``response_length`` (vLLM/SGLang token lists) or a tensor
            ``[B * n, r]``, ``r <= response_length`` (HF ``generate``, finished rows already padded). Tokens after
            the first EOS are kept but masked out.
        eos_token_id: one id or several (any ends a response); ``None`` or ``[]``: responses end only by length
            (``rollout.ignore_eos``).
        rollout_log_probs: optional, the same layout as ``responses``.
        non_tensor_batch: the prompt batch's non-tensor columns (``B`` rows each), repeated ``n`` times interleaved.
        meta_info: put on the output as is.
    """
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
    if response_length < 1:
        raise ValueError(f"response_length must be >= 1, got {response_length}; set rollout.response_length "
                         "(data.max_response_length)")
    if prompt_ids.dim() != 2 or prompt_attention_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt input_ids {tuple(prompt_ids.shape)} and attention_mask "
                         f"{tuple(prompt_attention_mask.shape)} must both be [batch, prompt_length]")
    batch_size = prompt_ids.shape[0]
    rows = len(responses)
    if rows != batch_size * n:
        raise ValueError(f"got {rows} responses for {batch_size} prompts x n={n}; expected {batch_size * n} "
                         "(row i * n + j = sample j of prompt i)")
    device = prompt_ids.device

    resp, lengths = _rows_to_tensor(responses, response_length, pad_token_id, prompt_ids.dtype, "responses", device)
    valid = torch.arange(response_length, device=device)[None, :] < lengths.to(device)[:, None]
    eos = normalize_eos_token_id(eos_token_id)
    if eos:
        response_mask = get_response_mask(resp, eos, dtype=torch.bool) & valid
    else:
        response_mask = valid
    response_mask = response_mask.to(prompt_attention_mask.dtype)

    prompts = _repeat_rows(prompt_ids, n)
    prompt_mask = _repeat_rows(prompt_attention_mask, n)
    if prompt_position_ids is None:
        prompt_position_ids = torch.clamp(prompt_attention_mask.long().cumsum(-1) - 1, min=0)
    prompt_pos = _repeat_rows(prompt_position_ids.to(device), n)
    delta = torch.arange(1, response_length + 1, device=device, dtype=prompt_pos.dtype)
    delta = delta.view(*([1] * (prompt_pos.dim() - 1)), response_length)
    response_pos = prompt_pos[..., -1:] + delta

    tensors = {
        "prompts": prompts,
        "responses": resp,
        "input_ids": torch.cat([prompts, resp], dim=-1),
        "attention_mask": torch.cat([prompt_mask, response_mask], dim=-1),
        "position_ids": torch.cat([prompt_pos, response_pos], dim=-1),
        "response_mask": response_mask,
    }
    if rollout_log_probs is not None:
        if len(rollout_log_probs) != rows:
            raise ValueError(f"rollout_log_probs has {len(rollout_log_probs)} rows, responses {rows}")
        log_probs, _ = _rows_to_tensor(rollout_log_probs, response_length, 0.0, torch.float32, "rollout_log_probs",
                                       device)
        tensors["rollout_log_probs"] = log_probs * response_mask.to(log_probs.dtype)

    non_tensors = {}
    for key, value in (non_tensor_batch or {}).items():
        value = value if isinstance(value, np.ndarray) else np.array(value, dtype=object)
        if len(value) != batch_size:
            raise ValueError(f"non-tensor column {key!r} has {len(value)} rows, the prompts {batch_size}")
        non_tensors[key] = _repeat_rows(value, n)
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info=dict(meta_info or {}))


def build_rollout_output_from_prompts(prompts: DataProto,
                                      responses: TokenRows,
                                      response_length: int,
                                      pad_token_id: int,
                                      eos_token_id: int | Sequence[int] | None,
                                      n: int = 1,
                                      rollout_log_probs: FloatRows | None = None,
                                      meta_info: dict | None = None) -> DataProto:
    """:func:`build_rollout_output` reading ``input_ids``, ``attention_mask``, ``position_ids`` (optional) and the
    non-tensor columns from the prompt ``DataProto``."""
    check_prompt_batch(prompts)
    batch = prompts.batch
    position_ids = batch["position_ids"] if "position_ids" in batch.keys() else None
    return build_rollout_output(batch["input_ids"],
                                batch["attention_mask"],
                                position_ids,
                                responses,
                                response_length=response_length,
                                pad_token_id=pad_token_id,
                                eos_token_id=eos_token_id,
                                n=n,
                                rollout_log_probs=rollout_log_probs,
                                non_tensor_batch=prompts.non_tensor_batch,
                                meta_info=meta_info)


def check_prompt_batch(prompts: DataProto) -> None:
    """Raise a clear error when the prompt batch lacks the tensors every rollout needs."""
    if prompts.batch is None:
        raise ValueError("the rollout needs a prompt batch with tensors input_ids and attention_mask (left-padded, "
                         "as RLHFDataset's collate_fn gives them); got a DataProto without tensors")
    missing = [k for k in ("input_ids", "attention_mask") if k not in prompts.batch.keys()]
    if missing:
        raise ValueError(f"the rollout's prompt batch lacks {missing}; it has {sorted(prompts.batch.keys())}. Pass "
                         "the dataset's left-padded input_ids/attention_mask/position_ids to generate_sequences")
