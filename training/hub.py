"""A Hugging Face hub id that cannot be reached says so in one line, before any library retries.

``routet2i export edge --pipeline``, ``routet2i train --backbone`` and ``routet2i data build
--edge-pipeline/--cloud-pipeline`` take a local folder or a hub id. Without a network, the hub libraries
retry for half a minute, print a page of warnings and then report a missing file (``does not appear to
have a file named model_index.json``), which reads like a broken model. `check_hub_id` asks first: a local
folder, a hub id already in the Hugging Face cache, or a hub behind a proxy pass; otherwise the hub's host
(``HF_ENDPOINT``, default huggingface.co) must accept a connection within a few seconds, or the command
stops with a `UsageError` that says the hub cannot be reached and how to use a local folder instead.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from routet2i._errors import UsageError

__all__ = ["check_hub_id"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def _in_cache(repo_id: str) -> bool:
    """True when the Hugging Face cache holds a snapshot of ``repo_id`` (the libraries fall back to it)."""
    try:
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers / diffusers
        return False
    snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_hub_id(source: str, option: str, timeout: float = 5.0) -> None:
    """Return when ``source`` is a local path, or a hub id that is cached or whose hub answers; raise a
    one-line `UsageError` naming ``option`` otherwise (a missing folder, or an unreachable hub with the
    local-folder alternative)."""
    text = str(source)
    if Path(text).expanduser().exists():
        return
    if not _HUB_ID.fullmatch(text) or text.startswith("."):
        raise UsageError(f"{option} {text!r}: no such folder (and not a Hugging Face id, owner/name)")
    if _in_cache(text):
        return
    hint = (
        f"download it on a machine with network access (`huggingface-cli download {text} --local-dir DIR`) "
        f"and pass the folder: {option} DIR"
    )
    if _offline():
        raise UsageError(f"{option} {text!r}: not a local folder, not in the Hugging Face cache, and "
                         f"HF_HUB_OFFLINE is set; {hint}")  # fmt: skip
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return  # the libraries go through the proxy; a direct probe would say nothing about it
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parts = urlsplit(endpoint)
    host = parts.hostname or "huggingface.co"
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(
            f"{option} {text!r}: not a local folder, and the Hugging Face Hub ({host}:{port}) cannot be "
            f"reached ({reason}); {hint}"
        ) from None
