"""Countdown data for the APR recipe: verl's countdown rows (:func:`verl.utils.dataset.tasks.countdown_rows`) with
the recipe's instruction appended to each prompt (how to spawn children, and the child budget for ``hsp_cond10``).

Rows keep the countdown ``data_source``, so the built-in countdown reward scores them (the parent's last
``<answer>`` equation, each number used once).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from recipe.apr.spawn import AprSettings

__all__ = ["SPAWN_INSTRUCTION", "instruction_for", "apr_countdown_rows", "write_apr_countdown_task", "default_data_dir"]

SPAWN_INSTRUCTION = ("You may split the search into parallel sub-searches: write <spawn>, then one self-contained "
                     "sub-problem per line, then </spawn>. Each line is solved by a child thread; their answers come "
                     "back as <join><result>...</result></join>, and you continue.")


def instruction_for(settings: AprSettings) -> str:
    """The text appended to each question: nothing for single-thread search (hs), the spawn protocol for hsp, plus
    the child budget when ``apr.announce_child_budget`` (hsp_cond10)."""
    if not settings.enable_spawn:
        return ""
    text = SPAWN_INSTRUCTION
    if settings.announce_child_budget and settings.max_child_calls is not None:
        text += f" Start at most {settings.max_child_calls} child threads in total."
    return text


def apr_countdown_rows(num_rows: int, split: str, instruction: str = "", **countdown_kwargs: Any) -> list[dict]:
    """Countdown rows whose question ends with ``instruction`` (on a new line)."""
    from verl.utils.dataset.tasks import countdown_rows

    rows = countdown_rows(num_rows, split, **countdown_kwargs)
    if instruction:
        for row in rows:
            question = f"{row['prompt'][-1]['content']}\n{instruction}"
            row["prompt"][-1]["content"] = question
            row["extra_info"]["question"] = question
    return rows


def write_apr_countdown_task(local_dir: str,
                             instruction: str = "",
                             train_size: int = 1024,
                             test_size: int = 64,
                             **countdown_kwargs: Any) -> dict[str, str]:
    """Write train/test parquet files of :func:`apr_countdown_rows` to ``local_dir``; return ``{split: path}``."""
    from verl.utils.dataset.schema import write_splits

    return write_splits(
        {
            "train": apr_countdown_rows(train_size, "train", instruction, **countdown_kwargs),
            "test": apr_countdown_rows(test_size, "test", instruction, **countdown_kwargs)
        }, local_dir)


def default_data_dir(instruction: str, sizes: dict[str, Any]) -> str:
    """Where the generated data goes: ``$VERL_DATA_CACHE`` (default ``~/.cache/verl/data``)``/apr_countdown/<hash>``,
    one directory per instruction and size settings."""
    root = os.path.abspath(
        os.path.expanduser(os.environ.get("VERL_DATA_CACHE") or os.path.join("~", ".cache", "verl", "data")))
    key = hashlib.sha256(json.dumps([instruction, sizes], sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(root, "apr_countdown", key)
