"""Single-turn SFT dataset: a prompt column and a response column, loss on the response only.

Items hold ``input_ids``, ``attention_mask``, ``position_ids`` and ``loss_mask``, each of length ``max_length``
and right padded. ``loss_mask[t] == 1`` means token ``t`` is a target (a response token, including the EOS that
ends the turn); a trainer predicting token ``t + 1`` from position ``t`` uses ``loss_mask[:, 1:]`` with
``labels = input_ids[:, 1:]``. The chat template formats the prompt, so what the model learns matches what
rollout shows it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from verl.utils.dataset.chat import (check_truncation, pad_to_length, pad_token_id, position_ids_from_mask,
                                     require_chat_template, tokenize_conversation, truncate)
from verl.utils.dataset.schema import (DataFormatError, as_file_list, load_rows, strip_origin, validate_messages, where)


class _FixedLengthSFTDataset(Dataset):
    """Shared loading, truncation and padding; subclasses turn a row into ``(messages, tools)``."""

    name = "SFTDataset"

    def __init__(self, parquet_files: str | Sequence[str], tokenizer: Any, config: Mapping[str, Any] | None,
                 max_samples: int, required_columns: Sequence[str]) -> None:
        config = config if config is not None else {}
        self.tokenizer = tokenizer
        self.config = config
        self.data_files = as_file_list(parquet_files)
        self.max_length = int(config.get("max_length", 1024))
        self.truncation = check_truncation(config.get("truncation", "error"),
                                           key="data.truncation",
                                           allowed=("error", "left", "right"))
        self.apply_chat_template_kwargs = dict(config.get("apply_chat_template_kwargs", None) or {})
        if self.max_length <= 0:
            raise ValueError(f"data.max_length must be positive, got {self.max_length}.")
        require_chat_template(tokenizer, what=self.name)
        self.pad_token_id = pad_token_id(tokenizer)
        rows = load_rows(self.data_files, list(required_columns), what=self.name)
        if not rows:
            raise DataFormatError(f"{self.name}: the data files {self.data_files} contain no rows; check "
                                  f"data.train_files / data.val_files.")
        if max_samples is not None and 0 <= max_samples < len(rows):
            seed = config.get("seed")
            keep = np.random.default_rng(1 if seed is None else int(seed)).permutation(len(rows))[:max_samples]
            rows = [rows[i] for i in sorted(keep)]
        for row in rows:
            self.conversation(row)  # type errors surface now, naming the row, not in the middle of an epoch
        self.rows = rows

    def conversation(self, row: Mapping[str, Any]) -> tuple[list[dict[str, Any]], Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        row = self.rows[item]
        messages, tools = self.conversation(row)
        ids, mask = tokenize_conversation(self.tokenizer, messages, tools=tools, **self.apply_chat_template_kwargs)
        if len(ids) > self.max_length:
            if self.truncation == "error":
                raise ValueError(f"{self.name}: {where(row)} has {len(ids)} tokens, more than "
                                 f"data.max_length={self.max_length}; raise data.max_length or set "
                                 f"data.truncation=left (keep the end) or right (keep the start).")
            ids = truncate(ids, self.max_length, self.truncation)
            mask = truncate(mask, self.max_length, self.truncation)
        input_ids, attention_mask = pad_to_length(ids, self.max_length, self.pad_token_id, left_pad=False)
        loss_mask = torch.zeros(self.max_length, dtype=torch.long)
        loss_mask[:len(mask)] = torch.tensor(mask, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask),
            "loss_mask": loss_mask,
        }


class SFTDataset(_FixedLengthSFTDataset):
    """Prompt/response pairs for supervised fine-tuning.

    Config keys: ``prompt_key`` (``prompt``) and ``response_key`` (``response``), each optionally followed into
    nested dicts by ``prompt_dict_keys`` / ``response_dict_keys`` (e.g. ``prompt_key=extra_info,
    prompt_dict_keys=[question]`` reads the RL parquet's ``extra_info.question``); ``max_length`` (1024);
    ``truncation`` (``error`` | ``left`` | ``right``); ``apply_chat_template_kwargs``. A prompt is a string (one
    user message) or a list of chat messages; the response is a string.
    """

    name = "SFTDataset"

    def __init__(self,
                 parquet_files: str | Sequence[str],
                 tokenizer: Any,
                 config: Mapping[str, Any] | None = None,
                 max_samples: int = -1) -> None:
        config = config if config is not None else {}
        self.prompt_key = config.get("prompt_key", "prompt")
        self.response_key = config.get("response_key", "response")
        self.prompt_dict_keys = list(config.get("prompt_dict_keys", None) or [])
        self.response_dict_keys = list(config.get("response_dict_keys", None) or [])
        super().__init__(parquet_files, tokenizer, config, max_samples, [self.prompt_key, self.response_key])

    def _field(self, row: Mapping[str, Any], key: str, dict_keys: Sequence[str], config_key: str) -> Any:
        value = row[key]
        path = key
        for k in dict_keys:
            if not isinstance(value, Mapping) or k not in value:
                raise DataFormatError(f"{self.name}: {where(row)}: cannot read {path}[{k!r}] (value is "
                                      f"{type(value).__name__}); check data.{config_key}_dict_keys.")
            value, path = value[k], f"{path}[{k!r}]"
        return value

    def conversation(self, row: Mapping[str, Any]) -> tuple[list[dict[str, Any]], Any]:
        prompt = self._field(row, self.prompt_key, self.prompt_dict_keys, "prompt")
        response = self._field(row, self.response_key, self.response_dict_keys, "response")
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            validate_messages(prompt, where=f"{self.name}: {where(row)}, prompt (data.prompt_key={self.prompt_key!r})")
            messages = [dict(m) for m in prompt]
        if not isinstance(response, str):
            raise DataFormatError(f"{self.name}: {where(row)}: the response (data.response_key={self.response_key!r}) "
                                  f"is {type(response).__name__}, expected a string.")
        return messages + [{"role": "assistant", "content": response}], None

    def raw_row(self, item: int) -> dict[str, Any]:
        """The row as read from the file (for inspection and tests)."""
        return strip_origin(self.rows[item])
