"""The RL prompt dataset: verl-schema parquet files in, left-padded prompt tensors plus per-row metadata out.

Each item holds ``input_ids``, ``attention_mask``, ``position_ids`` (length ``data.max_prompt_length``, left padded
so generation appends on the right), ``raw_prompt_ids`` (the unpadded token list rollout engines take),
``raw_prompt`` (the messages, with ``data.return_raw_chat``), ``full_prompts`` (the rendered text, with
``data.return_full_prompt``), ``index``, ``tools_kwargs``, ``interaction_kwargs`` and every other column of the
row (``data_source``, ``reward_model``, ``extra_info``, ``ability``, ...). :func:`collate_fn` turns a list of items
into the dict ``DataProto.from_single_dict`` takes.

Files are checked when the dataset is built, so a wrong path, column, prompt type or an over-long prompt fails on
the driver before any worker starts, with the file, row and config key to change.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from verl.utils.dataset.chat import (check_truncation, encode, pad_to_length, pad_token_id, position_ids_from_mask,
                                     render_chat, require_chat_template, truncate)
from verl.utils.dataset.schema import DataFormatError, as_file_list, load_rows, strip_origin, validate_messages, where

logger = logging.getLogger(__name__)


class RLHFDataset(Dataset):
    """Prompts for RL from parquet/jsonl files in verl schema.

    Args:
        data_files: one path or a list (``data.train_files`` / ``data.val_files``).
        tokenizer: a Hugging Face tokenizer with a chat template.
        config: the ``data`` config node (dict or DictConfig). Keys read: ``prompt_key`` (``prompt``),
            ``max_prompt_length`` (512), ``truncation`` (``error`` | ``left`` | ``right`` | ``middle``),
            ``filter_overlong_prompts``, ``return_raw_chat``, ``return_full_prompt``, ``apply_chat_template_kwargs``,
            ``shuffle`` and ``seed`` (for ``max_samples``). ``cache_dir``, ``use_shm`` and
            ``filter_overlong_prompts_workers`` are accepted and unused (files are read in place).
        processor: multimodal processor; accepted for signature compatibility, images/videos are not supported.
        max_samples: keep at most this many rows (-1: all); a seeded random subset when ``shuffle`` is on.
    """

    def __init__(self,
                 data_files: str | Sequence[str],
                 tokenizer: Any,
                 config: Mapping[str, Any] | None = None,
                 processor: Any = None,
                 max_samples: int = -1) -> None:
        config = config if config is not None else {}
        self.tokenizer = tokenizer
        self.processor = processor
        self.config = config
        self.data_files = as_file_list(data_files)
        self.prompt_key = config.get("prompt_key", "prompt")
        self.max_prompt_length = int(config.get("max_prompt_length", 512))
        self.truncation = check_truncation(config.get("truncation", "error"))
        self.filter_overlong_prompts = bool(config.get("filter_overlong_prompts", False))
        self.return_raw_chat = bool(config.get("return_raw_chat", False))
        self.return_full_prompt = bool(config.get("return_full_prompt", False))
        self.apply_chat_template_kwargs = dict(config.get("apply_chat_template_kwargs", None) or {})
        if self.max_prompt_length <= 0:
            raise ValueError(f"data.max_prompt_length must be positive, got {self.max_prompt_length}.")
        require_chat_template(tokenizer, what="RLHFDataset")
        self.pad_token_id = pad_token_id(tokenizer)

        rows = load_rows(self.data_files, [self.prompt_key], what="RLHFDataset")
        if not rows:
            raise DataFormatError(f"RLHFDataset: the data files {self.data_files} contain no rows; check "
                                  f"data.train_files / data.val_files and regenerate them.")
        for row in rows:
            validate_messages(row[self.prompt_key], where=f"RLHFDataset: {where(row)}, column {self.prompt_key!r}")
        self._warn_missing_columns(rows)
        rows = self._subsample(rows, max_samples if max_samples is not None else -1)
        self.rows, self.prompt_lengths = self._check_lengths(rows)

    # -- construction helpers --------------------------------------------------------------------------------------

    def _warn_missing_columns(self, rows: list[dict[str, Any]]) -> None:
        for column in ("data_source", "reward_model"):
            if column not in rows[0]:
                logger.warning("RLHFDataset: data files %s have no %r column; the default reward functions need it.",
                               self.data_files, column)

    def _subsample(self, rows: list[dict[str, Any]], max_samples: int) -> list[dict[str, Any]]:
        if max_samples is None or max_samples < 0 or max_samples >= len(rows):
            return rows
        if self.config.get("shuffle", True):
            seed = self.config.get("seed")
            keep = np.random.default_rng(1 if seed is None else int(seed)).permutation(len(rows))[:max_samples]
            return [rows[i] for i in sorted(keep)]
        return rows[:max_samples]

    def _check_lengths(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], np.ndarray | None]:
        """Tokenise every prompt once when overlong prompts must be filtered or rejected, and do so."""
        if not (self.filter_overlong_prompts or self.truncation == "error"):
            return rows, None
        texts = [self._render(row[self.prompt_key]) for row in rows]
        lengths = np.fromiter((len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]),
                              dtype=np.int64,
                              count=len(texts))
        too_long = lengths > self.max_prompt_length
        if not too_long.any():
            return rows, lengths
        if self.filter_overlong_prompts:
            kept = [row for row, bad in zip(rows, too_long) if not bad]
            logger.info("RLHFDataset: filtered %d of %d prompts longer than data.max_prompt_length=%d",
                        int(too_long.sum()), len(rows), self.max_prompt_length)
            if not kept:
                raise DataFormatError(f"RLHFDataset: all {len(rows)} prompts in {self.data_files} are longer than "
                                      f"data.max_prompt_length={self.max_prompt_length} (shortest: "
                                      f"{int(lengths.min())} tokens), and data.filter_overlong_prompts=True removed "
                                      f"them all; raise data.max_prompt_length or set "
                                      f"data.filter_overlong_prompts=False with data.truncation=left|right|middle.")
            return kept, lengths[~too_long]
        first = int(np.argmax(too_long))
        raise ValueError(self._overlong_message(rows[first], int(lengths[first]), int(too_long.sum()), len(rows)))

    def _overlong_message(self, row: Mapping[str, Any], length: int, count: int = 1, total: int | None = None) -> str:
        scope = f" ({count} of {total} prompts are too long)" if total is not None else ""
        return (f"RLHFDataset: prompt at {where(row)} has {length} tokens after the chat template, more than "
                f"data.max_prompt_length={self.max_prompt_length}{scope}. With data.truncation=error this is an "
                f"error; raise data.max_prompt_length, set data.filter_overlong_prompts=True to drop such prompts, "
                f"or set data.truncation=left|right|middle to cut them.")

    def _render(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return render_chat(self.tokenizer, messages, add_generation_prompt=True, **self.apply_chat_template_kwargs)

    # -- Dataset API -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> dict[str, Any]:
        source = self.rows[item]
        row = strip_origin(source)
        messages = row.pop(self.prompt_key)
        text = self._render(messages)
        ids = encode(self.tokenizer, text)
        if len(ids) > self.max_prompt_length:
            if self.truncation == "error":
                raise ValueError(self._overlong_message(source, len(ids)))
            ids = truncate(ids, self.max_prompt_length, self.truncation)
        input_ids, attention_mask = pad_to_length(ids, self.max_prompt_length, self.pad_token_id, left_pad=True)
        row["input_ids"] = input_ids
        row["attention_mask"] = attention_mask
        row["position_ids"] = position_ids_from_mask(attention_mask)
        row["raw_prompt_ids"] = ids
        if self.return_raw_chat:
            row["raw_prompt"] = [dict(m) for m in messages]
        if self.return_full_prompt:
            row["full_prompts"] = text
        extra = row.get("extra_info") if isinstance(row.get("extra_info"), Mapping) else {}
        row["index"] = extra.get("index") if extra.get("index") is not None else item
        row["tools_kwargs"] = extra.get("tools_kwargs") or {}
        row["interaction_kwargs"] = extra.get("interaction_kwargs") or {}
        return row


def collate_fn(data_list: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack tensors; put every other field in a 1-D ``object`` array (lists and dicts stay one per row)."""
    if not data_list:
        raise ValueError("collate_fn got an empty batch")
    keys: dict[str, None] = {}
    for item in data_list:
        keys.update(dict.fromkeys(item))
    out: dict[str, Any] = {}
    for key in keys:
        values = [item.get(key) for item in data_list]
        if all(isinstance(v, torch.Tensor) for v in values):
            out[key] = torch.stack(values, dim=0)
        else:
            arr = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):
                arr[i] = v
            out[key] = arr
    return out


def get_dataset_class(data_config: Mapping[str, Any] | None) -> type:
    """``RLHFDataset``, or the class named by ``data.custom_cls.{path,name}`` (which must subclass ``Dataset``)."""
    custom = (data_config or {}).get("custom_cls") or {}
    if not custom.get("path"):
        return RLHFDataset
    from verl.utils.dataset.sampler import load_object

    cls = load_object(custom.get("path"), custom.get("name"), "data.custom_cls.path", "data.custom_cls.name")
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        raise TypeError(f"data.custom_cls.name {custom.get('name')!r} from {custom.get('path')!r} must subclass "
                        f"torch.utils.data.Dataset.")
    return cls
