"""Bundle manifests: sha256 of every file plus the versions that made the bundle.

Shared by the export side (writes) and the device (verifies before loading). numpy-free and torch-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from routet2i._errors import BundleError, BundleFileMissing, UsageError
from routet2i.paths import atomic_write, user_cache_dir

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SIGNATURE = (
    "manifest.sig"  # routet2i.signing writes it; it signs the manifest, so the manifest cannot list it
)
UNLISTED = (MANIFEST, SIGNATURE)  # the only files of a bundle its manifest does not list
HASH_MODES = ("first", "always", "never")  # check_hashes (see verify_bundle)
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


def write_manifest(
    bundle_dir: str | Path, kind: str, extra: dict[str, Any] | None = None, *, sign_key: Any = None
) -> dict[str, Any]:
    """Hash every file under ``bundle_dir`` (except the manifest and its signature) and write
    ``manifest.json``; with ``sign_key`` (an Ed25519 private key, `routet2i.signing.load_private_key`) also
    sign it into ``manifest.sig``."""
    root = Path(bundle_dir)
    files = {}
    for rel in sorted(_present_files(root)):
        path = root / rel
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
    if (root / SIGNATURE).exists():
        (root / SIGNATURE).unlink()  # a signature of an older manifest
    if sign_key is not None:
        from routet2i.signing import sign_manifest

        sign_manifest(root, sign_key)
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


def _read_manifest(root: Path) -> tuple[dict[str, Any], bytes]:
    if not root.is_dir():
        raise BundleFileMissing(f"bundle folder {root} does not exist")
    path = root / MANIFEST
    if not path.is_file():
        raise BundleFileMissing(
            f"{path} is missing: not a routet2i bundle (export one with `routet2i export`)"
        )
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object")
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path} has no 'files' table")
    return manifest, raw


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """The parsed manifest.json of a bundle folder (not verified: see `verify_bundle`)."""
    return _read_manifest(Path(bundle_dir))[0]


# ------------------------------------------------------------------------------------------ verification


def hash_mode(check_hashes: bool | str) -> str:
    """``check_hashes`` as one of HASH_MODES (True: "always", False: "never"); `UsageError` otherwise."""
    if check_hashes is True:
        return "always"
    if check_hashes is False:
        return "never"
    if isinstance(check_hashes, str) and check_hashes in HASH_MODES:
        return check_hashes
    raise UsageError(f"check_hashes={check_hashes!r}: allowed: {', '.join(HASH_MODES)}")


@dataclass
class BundleCheck:
    """What `verify_bundle` checked."""

    manifest: dict[str, Any]  # the parsed manifest.json
    manifest_sha256: str  # sha256 of manifest.json's bytes: identifies the bundle (the ORT graph cache key)
    files: int = 0  # files listed (and present with their sizes)
    hashed_files: int = 0  # files whose sha256 was computed now
    hashed_bytes: int = 0  # bytes read to compute them
    cached_files: int = 0  # files whose sha256 came from the hash cache (stamp unchanged)
    signed_by: str | None = None  # key id of the trusted key that verified manifest.sig, if checked
    seconds: float = 0.0  # wall time of the whole check


def _stamp(st: os.stat_result) -> list[int]:
    # ctime cannot be set by an unprivileged process: an in-place edit that restores size and mtime still
    # changes it, so a stamp match means "not written since it was hashed" (POSIX; see README Security).
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class HashCache:
    """sha256 per file of one bundle folder, keyed by its stamp (size, mtime_ns, ctime_ns, inode, device),
    kept in ``cache_dir/hashes/`` (never in the bundle). A file whose stamp is unchanged since it was
    hashed is not read again. Unreadable or unwritable caches are ignored: the check then hashes."""

    def __init__(self, root: Path, cache_dir: Path) -> None:
        self.root = root.resolve()
        key = hashlib.sha256(str(self.root).encode()).hexdigest()[:24]
        self.path = Path(cache_dir) / "hashes" / f"{key}.json"
        self.entries: dict[str, list[Any]] = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text())
            if data.get("format_version") == 1 and data.get("bundle") == str(self.root):
                self.entries = {k: v for k, v in data["files"].items() if isinstance(v, list) and len(v) == 6}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.info("hash cache %s unreadable (%s): hashing every file", self.path, exc)

    def get(self, rel: str, stamp: list[int]) -> str | None:
        entry = self.entries.get(rel)
        return entry[5] if entry is not None and entry[:5] == stamp else None

    def put(self, rel: str, stamp: list[int], digest: str) -> None:
        self.entries[rel] = [*stamp, digest]
        self.dirty = True

    def save(self, keep: set[str]) -> None:
        self.entries = {k: v for k, v in self.entries.items() if k in keep}
        if not self.dirty:
            return
        body = {"format_version": 1, "bundle": str(self.root), "files": self.entries}
        try:
            atomic_write(self.path, json.dumps(body), fsync=False)  # a cache: rebuilt if lost
        except OSError as exc:
            logger.warning(
                "cannot write the hash cache %s (%s): the next launch hashes again", self.path, exc
            )


def _listed_path(root: Path, rel: Any, manifest_path: Path) -> Path:
    parts = rel.split("/") if isinstance(rel, str) else []
    if not parts or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
        raise BundleError(f"{manifest_path}: file entry {rel!r} is not a relative path inside the bundle")
    return root.joinpath(*parts)


def _present_files(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.relative_to(root).as_posix() not in UNLISTED
    }


def verify_bundle(
    bundle_dir: str | Path,
    kind: str | None = None,
    *,
    check_hashes: bool | str = "always",
    trusted_keys: Sequence[Any] | None = None,
    cache_dir: str | Path | None = None,
) -> BundleCheck:
    """Check a bundle folder against its manifest before anything in it is used.

    - ``trusted_keys`` (Ed25519 public-key PEM paths, or keys from `routet2i.signing.load_public_keys`):
      ``manifest.sig`` must verify with one of them (checked at every call, whatever ``check_hashes`` is);
    - every file in the folder is listed in the manifest (an unlisted file is refused: a manifest entry
      removed to switch that file's check off is caught here), and every listed file exists with its size;
    - sha256 of every file: ``"always"`` hashes all; ``"first"`` hashes a file only when its stamp changed
      since it last matched (the hash cache in ``cache_dir``, default `routet2i.paths.user_cache_dir`);
      ``"never"`` checks sizes only.

    Raises BundleFileMissing / BundleError naming the file; returns a `BundleCheck`."""
    t0 = time.perf_counter()
    mode = hash_mode(check_hashes)
    root = Path(bundle_dir)
    manifest, raw = _read_manifest(root)
    manifest_path = root / MANIFEST
    if kind is not None and manifest.get("kind") != kind:
        raise BundleError(f"{manifest_path}: bundle kind is {manifest.get('kind')!r}, expected {kind!r}")
    check = BundleCheck(manifest, hashlib.sha256(raw).hexdigest())
    if trusted_keys:
        from routet2i.signing import load_public_keys, verify_signature

        if isinstance(trusted_keys, (str, os.PathLike)):
            load_public_keys(trusted_keys)  # raises: one string is not a list of keys
        keys = [k if hasattr(k, "verify") else load_public_keys([k])[0] for k in trusted_keys]
        check.signed_by = verify_signature(root, keys, raw)  # the bytes parsed above, read once

    listed = {rel: _listed_path(root, rel, manifest_path) for rel in manifest["files"]}
    unlisted = sorted(_present_files(root) - set(listed))
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        raise BundleError(
            f"{root}: {shown} {'is' if len(unlisted) == 1 else 'are'} not listed in {MANIFEST}; every file of a "
            "bundle must be listed (re-export the bundle, or remove what was added)"
        )
    cache = HashCache(root, Path(cache_dir) if cache_dir else user_cache_dir()) if mode == "first" else None
    for rel, path in listed.items():
        entry = manifest["files"][rel]
        if not isinstance(entry, dict):
            raise BundleError(f"{manifest_path}: entry {rel!r} is not an object with sha256 and bytes")
        if not path.is_file():
            raise BundleFileMissing(f"{path}: listed in {MANIFEST} but missing")
        st = path.stat()
        if st.st_size != entry.get("bytes"):
            raise BundleError(f"{path}: size {st.st_size} does not match {MANIFEST} ({entry.get('bytes')})")
        check.files += 1
        if mode == "never":
            continue
        stamp = _stamp(st)
        digest = cache.get(rel, stamp) if cache is not None else None
        if digest is not None and digest != entry.get("sha256"):
            digest = None  # a cache entry that disagrees is never the reason to refuse: hash and decide
        if digest is None:
            digest = sha256_file(path)
            check.hashed_files += 1
            check.hashed_bytes += st.st_size
            if cache is not None and _stamp(path.stat()) == stamp:  # unchanged while it was read
                cache.put(rel, stamp, digest)
        else:
            check.cached_files += 1
        if digest != entry.get("sha256"):
            raise BundleError(f"{path}: sha256 does not match {MANIFEST} (the file was modified)")
    if cache is not None:
        cache.save(set(listed))
    check.seconds = time.perf_counter() - t0
    logger.info(
        "%s verified in %.2fs (check_hashes=%s): %d files, %d hashed (%.0f MB), %d from the hash cache%s",
        root,
        check.seconds,
        mode,
        check.files,
        check.hashed_files,
        check.hashed_bytes / 1e6,
        check.cached_files,
        f", signed by key {check.signed_by}" if check.signed_by else "",
    )
    return check


def verify_manifest(
    bundle_dir: str | Path,
    kind: str | None = None,
    *,
    check_hashes: bool | str = "always",
    trusted_keys: Sequence[Any] | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """`verify_bundle`, returning only the manifest."""
    return verify_bundle(
        bundle_dir, kind, check_hashes=check_hashes, trusted_keys=trusted_keys, cache_dir=cache_dir
    ).manifest
