"""Checks of output paths given on a command line, made before any work starts.

A command that would fail only when it writes its result (after minutes of generation or export) with an
``OSError`` traceback instead says at once, in one line, what is wrong with the path (CONTRACTS.md section 2:
bad arguments are a one-line error, exit code 2).
"""

from __future__ import annotations

import logging
import os
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
