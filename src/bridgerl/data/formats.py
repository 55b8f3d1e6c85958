"""Load prompt, SFT and preference rows from JSONL/JSON files or `datasets` (folder or hub id).

Rows are plain dicts. Prompt rows: `prompt` (a string, or a list of `{"role", "content"}`
messages), optional `answer` (string), `task` (string), plus every other column, kept as is.
A malformed row raises `DataError` naming the file, the row (its line in a JSONL file, else
its 1-based row number) and the field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "DataError",
    "read_records",
    "normalize_rows",
    "load_rows",
    "load_sft_rows",
    "load_preference_rows",
    "prompt_from_messages",
]


class DataError(ValueError):
    """A data source or row is malformed; the message names the source, row and field."""


def _where(source: str, location: str | None, field: str | None = None) -> str:
    at = source if location is None else f"{source}, {location}"
    return at if field is None else f"{at}, field {field!r}"


def _numbered(records: Iterable[Any]) -> list[tuple[str, Any]]:
    return [(f"row {k}", r) for k, r in enumerate(records, start=1)]


# ---- reading records ------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (often a trailing newline) are not rows
            try:
                records.append((f"line {line_no}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    return records


def _read_json(path: Path, split: str | None) -> list[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if isinstance(data, dict):
        wanted = split or "train"
        if wanted not in data or not isinstance(data[wanted], list):
            lists = [k for k, v in data.items() if isinstance(v, list)]
            raise DataError(f"{path}: expected a list of rows, or an object whose {wanted!r} key holds one "
                            f"(list-valued keys: {lists}); pass split=<key>")
        data = data[wanted]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
    return _numbered(data)


def _pick_split(ds: Any, source: str, split: str | None) -> Any:
    from datasets import DatasetDict

    if not isinstance(ds, DatasetDict):
        return ds
    if split is None:
        split = "train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None)
        if split is None:
            raise DataError(f"{source}: holds splits {sorted(ds)}; pass split=<name>")
    if split not in ds:
        raise DataError(f"{source}: no split {split!r}; it has {sorted(ds)}")
    return ds[split]


def _looks_like_path(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json", ".csv", ".parquet"))
            or source.count("/") > 1 or "\\" in source)


def read_records(source: str | Path, split: str | None = None) -> list[tuple[str, Any]]:
    """`(location, record)` pairs ("line 7" for JSONL, 1-based "row 3" otherwise) from a
    .jsonl/.json/.csv/.parquet file, a `save_to_disk` folder, or (when `source` is not a local
    path) a `datasets` hub id."""
    source_str = str(source)
    path = Path(source_str).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path, split)
        if suffix in (".csv", ".parquet"):
            from datasets import load_dataset

            ds = load_dataset(suffix[1:], data_files=str(path), split="train")
            return _numbered(ds.to_list())
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    if path.is_dir():
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise DataError(f"{path}: a folder but not a dataset saved with datasets' save_to_disk ({exc})") from exc
        return _numbered(_pick_split(ds, str(path), split).to_list())
    if _looks_like_path(source_str):
        raise DataError(f"{source_str}: no such file or folder")
    from datasets import load_dataset

    try:
        ds = load_dataset(source_str, split=split)
    except Exception as exc:  # noqa: BLE001 — hub/network errors come in many types
        raise DataError(f"{source_str}: not a local file or folder, and loading it as a datasets hub id "
                        f"failed: {exc}") from exc
    return _numbered(_pick_split(ds, source_str, split).to_list())


# ---- validating fields ----------------------------------------------------------------------


def _check_messages(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages, "
                        f"got {type(value).__name__}")
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {k} must be a dict with string 'role' and 'content', got {m!r:.80}")
    return value


def prompt_from_messages(messages: list[dict], where: str = "messages") -> list[dict]:
    """The conversation up to and including its last user turn: what the model answers."""
    last_user = max((k for k, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise DataError(f"{where}: the conversation has no 'user' turn to answer")
    return messages[:last_user + 1]


def _prompt_of(record: dict, prompt_field: str, where: str) -> str | list[dict]:
    if prompt_field in record and record[prompt_field] is not None:
        prompt = record[prompt_field]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DataError(f"{where}, field {prompt_field!r}: empty prompt")
            return prompt
        return _check_messages(prompt, f"{where}, field {prompt_field!r}")
    if record.get("messages") is not None:
        messages = _check_messages(record["messages"], f"{where}, field 'messages'")
        return prompt_from_messages(messages, f"{where}, field 'messages'")
    raise DataError(f"{where}: missing field {prompt_field!r} (or a 'messages' conversation); "
                    f"the row has {sorted(record)}")


def _text_of(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: expected a string or number, got {type(value).__name__}")
    return str(value)


def _renamed(record: dict, src: str, dst: str) -> None:
    if src != dst and src in record:
        record[dst] = record.pop(src)


def _objects(records: Iterable[tuple[str, Any]], source: str):
    """(location, "file, row" label, record) for each record, refusing anything but a JSON object."""
    for location, record in records:
        where = _where(source, location)
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield location, where, record


def normalize_rows(records: Iterable[tuple[str, Any]], source: str, prompt_field: str = "prompt",
                   answer_field: str = "answer", task_field: str = "task",
                   default_task: str = "default") -> list[dict]:
    """Validate and normalise prompt rows (see module docstring)."""
    rows = []
    for location, where, record in _objects(records, source):
        row = dict(record)
        row["prompt"] = _prompt_of(record, prompt_field, where)
        if prompt_field != "prompt":
            row.pop(prompt_field, None)
        _renamed(row, answer_field, "answer")
        if row.get("answer") is not None:
            row["answer"] = _text_of(row["answer"], f"{where}, field {answer_field!r}")
        _renamed(row, task_field, "task")
        task = row.get("task")
        if task is None:
            row["task"] = default_task
        elif not isinstance(task, str) or not task:
            raise DataError(f"{where}, field {task_field!r}: expected a non-empty string, got {task!r:.80}")
        rows.append(row)
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


def load_rows(source: str | Path, split: str | None = None, prompt_field: str = "prompt",
              answer_field: str = "answer", task_field: str = "task", default_task: str = "default") -> list[dict]:
    """Prompt rows for RL from a file, a saved `datasets` folder, or a hub id."""
    return normalize_rows(read_records(source, split), str(source), prompt_field, answer_field, task_field,
                          default_task)


def load_sft_rows(source: str | Path, split: str | None = None, prompt_field: str = "prompt",
                  completion_fields: Sequence[str] = ("completion", "solution", "answer"),
                  task_field: str = "task", default_task: str = "default") -> list[dict]:
    """SFT rows `{prompt, completion, task, ...}`.

    A row is either a full `messages` conversation ending with an assistant turn (the
    prompt is everything before it), or a prompt plus the first present of
    `completion_fields` as the target text.
    """
    rows = []
    for location, where, record in _objects(read_records(source, split), str(source)):
        row = dict(record)
        if record.get(prompt_field) is None and record.get("messages") is not None:
            messages = _check_messages(record["messages"], f"{where}, field 'messages'")
            if messages[-1]["role"] != "assistant" or len(messages) < 2:
                raise DataError(f"{where}, field 'messages': an SFT conversation must end with an 'assistant' "
                                "turn that follows the prompt")
            row["prompt"], row["completion"] = messages[:-1], messages[-1]["content"]
        else:
            row["prompt"] = _prompt_of(record, prompt_field, where)
            if prompt_field != "prompt":
                row.pop(prompt_field, None)
            field = next((f for f in completion_fields if record.get(f) is not None), None)
            if field is None:
                raise DataError(f"{where}: missing the target text; expected one of {list(completion_fields)} "
                                "(or a 'messages' conversation)")
            row["completion"] = _text_of(record[field], f"{where}, field {field!r}")
        _renamed(row, task_field, "task")
        row.setdefault("task", default_task)
        if row["task"] is None:
            row["task"] = default_task
        rows.append(row)
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


def _completion_of(value: Any, where: str) -> tuple[str, list[dict] | None]:
    """(completion text, the conversation before it if `value` is a message list)."""
    if isinstance(value, str):
        return value, None
    messages = _check_messages(value, where)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: a conversational chosen/rejected must end with an 'assistant' turn")
    return messages[-1]["content"], messages[:-1] or None


def load_preference_rows(source: str | Path, split: str | None = None, prompt_field: str = "prompt",
                         chosen_field: str = "chosen", rejected_field: str = "rejected") -> list[dict]:
    """Preference rows `{prompt, chosen, rejected, ...}` (chosen/rejected as completion text).

    Conversational chosen/rejected (message lists ending with the assistant turn) are
    accepted; without a prompt column the prompt is chosen's conversation before that turn.
    """
    rows = []
    for location, where, record in _objects(read_records(source, split), str(source)):
        row = dict(record)
        for field in (chosen_field, rejected_field):
            if record.get(field) is None:
                raise DataError(f"{where}: missing field {field!r}; the row has {sorted(record)}")
        chosen, implicit_prompt = _completion_of(record[chosen_field], _where(str(source), location, chosen_field))
        rejected, _ = _completion_of(record[rejected_field], _where(str(source), location, rejected_field))
        if record.get(prompt_field) is None and implicit_prompt is not None:
            row["prompt"] = prompt_from_messages(implicit_prompt, f"{where}, field {chosen_field!r}")
        else:
            row["prompt"] = _prompt_of(record, prompt_field, where)
        for field in {prompt_field, chosen_field, rejected_field} - {"prompt", "chosen", "rejected"}:
            row.pop(field, None)
        row["chosen"], row["rejected"] = chosen, rejected
        rows.append(row)
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows
