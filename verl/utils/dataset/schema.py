"""The on-disk data contract: verl-schema rows, how they are written, and how data files are read back.

One row per prompt: ``data_source`` (selects the reward function), ``prompt`` (list of ``{role, content}`` chat
messages), ``ability``, ``reward_model: {style, ground_truth}``, ``extra_info: {split, index, ...}``. SFT files carry
a ``messages`` column (a whole conversation) instead of ``prompt``. The preprocessors in
``examples/data_preprocess/`` write these rows and the datasets in this package read them, so both sides share the
helpers below and bad files fail with one kind of message (the file, the row, the column and what to do).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable, Mapping, Sequence

RL_COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info")
SFT_COLUMNS = ("data_source", "messages", "ability", "reward_model", "extra_info")
_READABLE_SUFFIXES = (".parquet", ".jsonl", ".json")


class DataFormatError(ValueError):
    """A data file exists but its content does not follow the verl schema (wrong column, wrong type, no rows)."""


def make_rl_row(data_source: str,
                prompt: str | Sequence[Mapping[str, str]],
                ground_truth: Any,
                split: str,
                index: int,
                ability: str = "math",
                style: str = "rule",
                extra_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One RL row in verl schema; a plain string prompt becomes a single user message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    validate_messages(messages, where=f"row {index} built for data_source {data_source!r}")
    info = {"split": split, "index": int(index)}
    info.update(extra_info or {})
    return {
        "data_source": data_source,
        "prompt": messages,
        "ability": ability,
        "reward_model": {
            "style": style,
            "ground_truth": ground_truth
        },
        "extra_info": info,
    }


def make_sft_row(data_source: str,
                 messages: Sequence[Mapping[str, str]],
                 split: str,
                 index: int,
                 ability: str = "math",
                 ground_truth: Any = None,
                 extra_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One SFT row: the whole conversation in ``messages`` (loss goes on the assistant turns)."""
    messages = [dict(m) for m in messages]
    validate_messages(messages, where=f"row {index} built for data_source {data_source!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"SFT row {index} ({data_source!r}) has no assistant message: nothing to learn from.")
    info = {"split": split, "index": int(index)}
    info.update(extra_info or {})
    row = {"data_source": data_source, "messages": messages, "ability": ability, "extra_info": info}
    if ground_truth is not None:
        row["reward_model"] = {"style": "rule", "ground_truth": ground_truth}
    return row


def validate_messages(value: Any, where: str) -> None:
    """Raise a ``DataFormatError`` unless ``value`` is a non-empty list of ``{role: str, content: str}`` dicts."""
    expected = ("expected a list of chat messages like [{'role': 'user', 'content': '...'}] "
                "(role and content are strings)")
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise DataFormatError(f"{where}: got {type(value).__name__} {_short(value)}; {expected}.")
    if len(value) == 0:
        raise DataFormatError(f"{where}: got an empty list; {expected}.")
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DataFormatError(f"{where}: message {i} is {type(message).__name__} {_short(message)}; {expected}.")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataFormatError(f"{where}: message {i} has {key}={_short(message.get(key))} "
                                      f"(keys: {sorted(message)}); {expected}.")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def write_splits(splits: Mapping[str, Sequence[Mapping[str, Any]]], local_dir: str) -> dict[str, str]:
    """Write each split to ``local_dir/{split}.parquet`` atomically; return ``{split: path}``.

    Writing to a temporary file and renaming means a crashed or concurrent run never leaves a half-written parquet
    that a trainer would later read.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    local_dir = os.path.abspath(os.path.expanduser(local_dir))
    os.makedirs(local_dir, exist_ok=True)
    paths = {}
    for split, rows in splits.items():
        if len(rows) == 0:
            raise DataFormatError(f"split {split!r} has no rows; refusing to write an empty {split}.parquet "
                                  f"to {local_dir} (check the input sizes).")
        table = pa.Table.from_pylist([dict(r) for r in rows])
        path = os.path.join(local_dir, f"{split}.parquet")
        fd, tmp = tempfile.mkstemp(dir=local_dir, prefix=f".{split}.", suffix=".parquet.tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        paths[split] = path
    return paths


def as_file_list(data_files: Any) -> list[str]:
    """Accept one path, a list, or an OmegaConf ListConfig; return a list of expanded paths."""
    if data_files is None:
        return []
    if isinstance(data_files, (str, os.PathLike)):
        return [os.path.expanduser(os.fspath(data_files))]
    return [os.path.expanduser(os.fspath(f)) for f in data_files]


def read_records(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of one parquet / jsonl / json file as Python dicts and lists, plus the file's column names.

    Nested columns come back as plain lists and dicts (not numpy arrays), which is what chat templates and reward
    functions expect.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path!r}. Check data.train_files / data.val_files "
                                f"(or the path you passed); generate it with a script in examples/data_preprocess/.")
    if os.path.isdir(path):
        raise IsADirectoryError(f"data file {path!r} is a directory; pass the parquet file(s) inside it "
                                f"(e.g. {os.path.join(path, 'train.parquet')!r}).")
    lower = path.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataFormatError(f"cannot read parquet file {path!r}: {e}") from e
        return table.to_pylist(), list(table.column_names)
    if lower.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataFormatError(f"{path}:{lineno}: invalid JSON line: {e}") from e
        return rows, _columns_of(rows)
    if lower.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}: invalid JSON: {e}") from e
        if isinstance(data, dict):  # column-oriented {"col": [..]} as pandas.to_json(orient="columns") writes
            keys = list(data)
            n = len(data[keys[0]]) if keys else 0
            data = [{k: data[k][i] for k in keys} for i in range(n)]
        if not isinstance(data, list):
            raise DataFormatError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}.")
        return data, _columns_of(data)
    raise DataFormatError(f"unsupported data file {path!r}: expected one of {', '.join(_READABLE_SUFFIXES)}.")


def _columns_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        if not isinstance(row, Mapping):
            raise DataFormatError(f"expected each row to be a JSON object, got {type(row).__name__}.")
        columns.update(dict.fromkeys(row))
    return list(columns)


def load_rows(data_files: Any, required_columns: Sequence[str], what: str = "dataset") -> list[dict[str, Any]]:
    """Read and concatenate data files, checking that each has ``required_columns``.

    Every row gets every column seen in any file (missing ones as ``None``) so batches collate cleanly. Rows carry
    their origin in the private keys ``__file__`` / ``__row__`` so later errors can name the file and row; callers
    pop them.
    """
    files = as_file_list(data_files)
    if not files:
        raise ValueError(f"{what}: no data files given (data.train_files / data.val_files is empty).")
    all_rows: list[dict[str, Any]] = []
    all_columns: dict[str, None] = {}
    for path in files:
        rows, columns = read_records(path)
        missing = [c for c in required_columns if c not in columns]
        if missing:
            raise DataFormatError(f"{what}: data file {path!r} has no column {missing[0]!r} "
                                  f"(required: {list(required_columns)}; available: {columns}). "
                                  f"Set the matching key (e.g. data.prompt_key) to one of the available columns, or "
                                  f"regenerate the file with examples/data_preprocess/.")
        all_columns.update(dict.fromkeys(columns))
        for i, row in enumerate(rows):
            row["__file__"] = path
            row["__row__"] = i
        all_rows.extend(rows)
    for row in all_rows:
        for column in all_columns:
            row.setdefault(column, None)
    return all_rows


def where(row: Mapping[str, Any]) -> str:
    """``'row 3 of file x.parquet'`` for a row read by :func:`load_rows`."""
    return f"row {row.get('__row__')} of file {row.get('__file__')!r}"


def strip_origin(row: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``row`` without the private origin keys added by :func:`load_rows`."""
    return {k: v for k, v in row.items() if k not in ("__file__", "__row__")}
