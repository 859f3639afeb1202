"""Bundle manifests: sha256 of every file plus the versions that made the bundle.

Shared by the export side (writes) and the device (verifies before loading). numpy-free and torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from routet2i._errors import BundleError, BundleFileMissing

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Versions recorded in every manifest (whichever are installed where the bundle is made).
_PACKAGES = (
    "routet2i",
    "torch",
    "transformers",
    "diffusers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "tokenizers",
    "numpy",
)
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def publish_folder(tmp: str | Path, out: str | Path) -> None:
    """Move a folder built in a temporary place (``tempfile.mkdtemp``: mode 0700) to ``out``: give it the
    permissions a normal ``mkdir`` would, replace whatever ``out`` was, rename. Nothing half-written is
    ever visible at ``out``."""
    tmp, out = Path(tmp), Path(out)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_manifest(bundle_dir: str | Path, kind: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file under ``bundle_dir`` (except the manifest) and write ``manifest.json``."""
    root = Path(bundle_dir)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(root).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "created_unix": int(time.time()),
        "versions": _versions(),
        "files": files,
        **(extra or {}),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in a bundle file; `BundleError` (a ValueError) naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleFileMissing(f"bundle folder {root} does not exist")
    path = root / MANIFEST
    if not path.is_file():
        raise BundleFileMissing(
            f"{path} is missing: not a routet2i bundle (export one with `routet2i export`)"
        )
    manifest = read_json_object(path)
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path} has no 'files' table")
    return manifest


def verify_manifest(
    bundle_dir: str | Path, kind: str | None = None, *, check_hashes: bool = True
) -> dict[str, Any]:
    """Check that every file of the manifest exists with its size (and sha256 unless ``check_hashes``
    is False). Raises BundleFileMissing / BundleError naming the file. Returns the manifest."""
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    if kind is not None and manifest.get("kind") != kind:
        raise BundleError(f"{root / MANIFEST}: bundle kind is {manifest.get('kind')!r}, expected {kind!r}")
    for rel, entry in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise BundleFileMissing(f"{path}: listed in {MANIFEST} but missing")
        if path.stat().st_size != entry.get("bytes"):
            raise BundleError(
                f"{path}: size {path.stat().st_size} does not match {MANIFEST} ({entry.get('bytes')})"
            )
        if check_hashes and sha256_file(path) != entry.get("sha256"):
            raise BundleError(f"{path}: sha256 does not match {MANIFEST} (the file was modified)")
    return manifest
