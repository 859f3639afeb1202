"""The device's decision log: one JSON object per generation, appended to a local JSONL file.

Prompt text is written only when ``log_prompts`` is on; otherwise only its length in characters. Each
record is written with one ``write`` on a file opened in append mode under an exclusive lock, so concurrent
writers (threads or processes) never interleave inside a line; when the file does not end with a newline
(a writer died mid-line), the next record starts on a new line. `read_decisions` skips a torn last line
with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: O_APPEND alone
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class DecisionLog:
    """Appends decisions to ``path``; ``path`` None disables the log."""

    def __init__(self, path: str | os.PathLike[str] | None, log_prompts: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.log_prompts = log_prompts
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any], prompt: str | None = None) -> None:
        """Write one record (``ts`` added). The prompt is stored only with ``log_prompts``."""
        if self.path is None:
            return
        rec = {"ts": round(time.time(), 3), **record}
        if prompt is not None:
            rec["prompt_chars"] = len(prompt)
            if self.log_prompts:
                rec["prompt"] = prompt
        line = json.dumps(_clean(rec), separators=(",", ":"), allow_nan=False) + "\n"
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    if fcntl is not None:
                        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
                    data = line.encode()
                    size = os.fstat(fd).st_size
                    if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line: start afresh
                        data = b"\n" + data
                    os.write(fd, data)
                finally:
                    os.close(fd)
        except OSError as exc:  # the log must never fail a generation
            logger.warning("could not append to decision log %s: %s", self.path, exc)


def read_decisions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a decision log (for analysis and tests).

    A line that is not a whole JSON object (a writer died mid-line) is skipped with a warning naming the
    file and line; any other line that does not parse is an error."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
            continue
        torn = i == len(lines) or not line.rstrip().endswith("}")  # unterminated, or cut short mid-line
        if not torn:
            raise ValueError(f"decision log {path}, line {i}: not a JSON object: {line[:80]!r}")
        msg = f"decision log {path}, line {i}: torn record skipped ({len(line)} characters)"
        logger.warning("%s", msg)
    return records
