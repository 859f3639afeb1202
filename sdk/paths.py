"""Output paths: checks made before any work starts, the per-user cache folder, and atomic file writes.

A command that would fail only when it writes its result (after minutes of generation or export) with an
``OSError`` traceback instead says at once, in one line, what is wrong with the path (the rule of every
routet2i command: bad arguments are a one-line error, exit code 2).

Every file routet2i writes whole (images, reports, tables, labels, the device state, caches) goes through
`atomic_path` / `atomic_write`: written to a temporary file in the same folder, flushed to disk, then
renamed over the destination, so a reader sees the old file or the new one, never half of one. **Mode rule**:
a new file gets the mode a plain ``open(path, "w")`` would give, ``0o666 & ~umask`` (so a report or an image
is as readable as the user's other files); ``private=True`` gives ``0o600`` (owner only) for files that hold
account state or secrets (the device's state file, signing keys). Replacing a file does not keep the old
file's mode: the rule decides.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from routet2i._errors import UsageError

logger = logging.getLogger(__name__)


def check_output_path(path: str | os.PathLike[str], option: str, *, folder: bool = False) -> Path:
    """Raise `UsageError` naming ``option`` when ``path`` cannot be written: it is an existing folder (for a
    file) or an existing file (for a ``folder``), or its nearest existing ancestor is a file or not writable.
    Returns ``path`` as a `Path`; creates nothing."""
    p = Path(path)
    if not folder and p.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a folder; give a file path")
    if folder and p.exists() and not p.is_dir():
        raise UsageError(f"{option} {str(path)!r} exists and is not a folder")
    for parent in p.absolute().parents:  # nearest first; the root always exists
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{option} {str(path)!r}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"{option} {str(path)!r}: folder {parent} is not writable")
            break
    return p


def user_cache_dir() -> Path:
    """routet2i's per-user cache folder (created by whoever writes into it, not here):
    ``$ROUTET2I_CACHE_DIR``, else ``$XDG_CACHE_HOME/routet2i`` or ``~/.cache/routet2i`` (Linux),
    ``~/Library/Caches/routet2i`` (macOS), ``%LOCALAPPDATA%\\routet2i\\Cache`` (Windows). Holds the bundle
    hash cache and ONNX Runtime's optimized graphs; it is never inside a bundle."""
    if os.environ.get("ROUTET2I_CACHE_DIR"):
        return Path(os.environ["ROUTET2I_CACHE_DIR"]).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "routet2i" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "routet2i"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "routet2i"


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; restored at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, private: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the file into (by any writer: pandas, PIL, json);
    on success it gets the mode rule's mode (module docstring), is flushed to disk (``fsync=False``: not,
    for caches and state rewritten on every request) and renamed over ``path``; on an exception it is
    deleted and ``path`` is left as it was. Creates the parent folder."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o600 if private else 0o666 & ~_umask())
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(
    path: str | os.PathLike[str], data: bytes | str, *, private: bool = False, fsync: bool = True
) -> Path:
    """Write ``data`` (str: UTF-8) to ``path`` atomically with the mode rule's mode; returns ``path``."""
    dest = Path(path)
    with atomic_path(dest, private=private, fsync=fsync) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return dest
