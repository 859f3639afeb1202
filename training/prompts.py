"""Prompt files: the input of `routet2i data build`.

Formats, by extension:
- ``.txt``: one prompt per line (blank lines skipped).
- ``.csv`` / ``.tsv``: a header row; the prompt column is ``--column`` or, by default, the first header among
  ``prompt``, ``prompts``, ``caption``, ``text`` (case-insensitive).
- ``.jsonl``: one JSON value per line: an object (prompt key chosen as for CSV) or a plain string.
- ``.json``: a list of such values, or an object whose values are such values (e.g. ``{"id": {...}}``).

Prompts are stripped; empty ones are skipped and repeated ones are kept once (first occurrence); both
counts are logged. Each prompt gets a stable ``prompt_id``: the value of ``--id-column`` when given, else
``p`` + the first 12 hex digits of the sha1 of the prompt text (the same text always gets the same id,
whatever its position, so resumed and sharded runs agree).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routet2i._errors import UsageError

logger = logging.getLogger(__name__)

__all__ = ["PROMPT_COLUMNS", "PromptRecord", "load_prompt_records", "load_prompts", "prompt_id"]

PROMPT_COLUMNS = ("prompt", "prompts", "caption", "text")  # auto-detected prompt columns, in this order
_FORMATS = (".txt", ".csv", ".tsv", ".jsonl", ".json")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a prompt file."""

    prompt_id: str  # stable id (from --id-column, else a hash of the text)
    prompt: str  # the prompt text, stripped


def prompt_id(prompt: str) -> str:
    """Stable id of a prompt text: ``p`` + 12 hex digits of its sha1."""
    return "p" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]


def _pick(keys: list[str], column: str | None, path: Path, what: str = "column") -> str:
    if column is not None:
        if column not in keys:
            raise UsageError(f"--column {column!r} is not in {str(path)!r}; {what}s: {', '.join(keys)}")
        return column
    lower = {k.lower(): k for k in keys}
    for c in PROMPT_COLUMNS:
        if c in lower:
            return lower[c]
    raise UsageError(
        f"{str(path)!r} has no prompt {what} ({', '.join(PROMPT_COLUMNS)}); pick one with --column from: {', '.join(keys)}"
    )


def _from_values(
    values: list[Any], column: str | None, id_column: str | None, path: Path
) -> list[tuple[Any, Any]]:
    rows: list[tuple[Any, Any]] = []
    key: str | None = None
    for i, v in enumerate(values):
        if isinstance(v, str):
            if column is not None:
                raise UsageError(
                    f"{str(path)!r}: entry {i + 1} is a plain string, there is no --column {column!r}"
                )
            rows.append((None, v))
        elif isinstance(v, dict):
            if key is None:
                key = _pick([str(k) for k in v], column, path, what="key")
            if id_column is not None and id_column not in v:
                raise UsageError(f"--id-column {id_column!r} is not in entry {i + 1} of {str(path)!r}")
            rows.append((v.get(id_column) if id_column else None, v.get(key)))
        else:
            raise UsageError(
                f"{str(path)!r}: entry {i + 1} is a {type(v).__name__}, expected an object or a string"
            )
    return rows


def _read_rows(path: Path, column: str | None, id_column: str | None) -> list[tuple[Any, Any]]:
    ext = path.suffix.lower()
    if ext == ".txt":
        if column is not None:
            logger.warning("--column %r ignored: %s has one prompt per line", column, path)
        with open(path, encoding="utf-8") as f:
            return [(None, line.rstrip("\n")) for line in f]
    if ext in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            keys = [k for k in (reader.fieldnames or []) if k is not None]
            if not keys:
                raise UsageError(f"{str(path)!r} is empty (a header row naming the prompt column is needed)")
            col = _pick(keys, column, path)
            if id_column is not None and id_column not in keys:
                raise UsageError(
                    f"--id-column {id_column!r} is not in {str(path)!r}; columns: {', '.join(keys)}"
                )
            return [(row.get(id_column) if id_column else None, row.get(col)) for row in reader]
    if ext == ".jsonl":
        values = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        values.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise UsageError(f"{str(path)!r} line {i} is not JSON: {exc.msg}") from exc
        return _from_values(values, column, id_column, path)
    if ext == ".json":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{str(path)!r} is not JSON: {exc.msg} at line {exc.lineno}") from exc
        if isinstance(data, dict):
            data = list(data.values())
        if not isinstance(data, list):
            raise UsageError(
                f"{str(path)!r}: expected a JSON list or object of prompts, got {type(data).__name__}"
            )
        return _from_values(data, column, id_column, path)
    raise UsageError(
        f"--prompts {str(path)!r}: unknown format {ext or '(none)'}; use one of {', '.join(_FORMATS)}"
    )


def load_prompt_records(
    path: str | os.PathLike[str], column: str | None = None, id_column: str | None = None
) -> list[PromptRecord]:
    """Read a prompt file into :class:`PromptRecord` s (empty prompts skipped, repeats kept once)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--prompts {str(p)!r} does not exist")
    try:
        rows = _read_rows(p, column, id_column)
    except UnicodeDecodeError as exc:
        raise UsageError(f"--prompts {str(p)!r} is not UTF-8 text") from exc
    out: list[PromptRecord] = []
    seen_text: set[str] = set()
    seen_ids: dict[str, str] = {}
    n_empty = n_dup = 0
    for rid, text in rows:
        text = "" if text is None else str(text).strip()
        if not text:
            n_empty += 1
            continue
        if text in seen_text:
            n_dup += 1
            continue
        pid = prompt_id(text) if id_column is None else str(rid).strip()
        if not pid or pid == "None":
            raise UsageError(f"--id-column {id_column!r}: empty id for prompt {text[:60]!r} in {str(p)!r}")
        if pid in seen_ids:
            raise UsageError(
                f"--id-column {id_column!r}: id {pid!r} is used by two different prompts in {str(p)!r}"
            )
        seen_text.add(text)
        seen_ids[pid] = text
        out.append(PromptRecord(pid, text))
    if n_empty or n_dup:
        logger.info("%s: skipped %d empty and %d repeated prompt(s)", p, n_empty, n_dup)
    if not out:
        raise UsageError(f"--prompts {str(p)!r} holds no prompt")
    return out


def load_prompts(path: str | os.PathLike[str], column: str | None = None) -> list[str]:
    """The prompt texts of a prompt file, in file order (see :func:`load_prompt_records`)."""
    return [r.prompt for r in load_prompt_records(path, column)]
