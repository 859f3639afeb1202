"""Checks of output paths given on a command line, made before any work starts.

A command that would fail only when it writes its result (after minutes of generation or export) with an
``OSError`` traceback instead says at once, in one line, what is wrong with the path (CONTRACTS.md section 2:
bad arguments are a one-line error, exit code 2).
"""

from __future__ import annotations

import logging
import os
import sys
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
