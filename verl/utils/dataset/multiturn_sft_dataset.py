"""Multi-turn SFT dataset: whole conversations from a ``messages`` column, loss only on assistant tokens.

Items have the same fixed-length layout and ``loss_mask`` convention as :class:`~verl.utils.dataset.sft_dataset.
SFTDataset` (1 on every assistant turn's tokens, through its EOS; 0 on system, user and tool turns and on the
generation prompts such as ``<|im_start|>assistant\\n``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Sequence

from verl.utils.dataset.schema import DataFormatError, validate_messages, where
from verl.utils.dataset.sft_dataset import _FixedLengthSFTDataset


class MultiTurnSFTDataset(_FixedLengthSFTDataset):
    """Conversations for supervised fine-tuning.

    Config keys: ``messages_key`` (``messages``), ``tools_key`` (``tools``: an optional column of tool schemas, a
    list or a JSON string, passed to the chat template), ``max_length`` (1024), ``truncation`` (``error`` |
    ``left`` | ``right``), ``apply_chat_template_kwargs``.
    """

    name = "MultiTurnSFTDataset"

    def __init__(self,
                 parquet_files: str | Sequence[str],
                 tokenizer: Any,
                 config: Mapping[str, Any] | None = None,
                 max_samples: int = -1) -> None:
        config = config if config is not None else {}
        self.messages_key = config.get("messages_key", "messages")
        self.tools_key = config.get("tools_key", "tools")
        super().__init__(parquet_files, tokenizer, config, max_samples, [self.messages_key])

    def conversation(self, row: Mapping[str, Any]) -> tuple[list[dict[str, Any]], Any]:
        messages = row[self.messages_key]
        validate_messages(messages, where=f"{self.name}: {where(row)}, column {self.messages_key!r}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataFormatError(f"{self.name}: {where(row)} has no assistant message, so nothing would be "
                                  f"trained on; drop the row or add the assistant reply.")
        tools = row.get(self.tools_key)
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{self.name}: {where(row)}: column {self.tools_key!r} is not valid JSON: "
                                      f"{e}") from e
        # parquet stores absent optional message fields (tool_calls, ...) as None; drop them for the template
        clean = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return clean, tools or None
