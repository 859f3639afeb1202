"""Ed25519 signatures of bundle manifests (optional): who made a bundle, not just whether it is whole.

``manifest.json`` lists the sha256 of every file of a bundle, so the device notices a file that changed or
appeared. But anyone who can write the bundle folder can also rewrite the manifest. A signature closes that:
the exporter signs the exact bytes of ``manifest.json`` with an Ed25519 private key (``routet2i export ...
--sign-key KEY.pem``) and writes ``manifest.sig`` next to it; a device configured with ``trusted_keys``
refuses a bundle that is unsigned or whose signature no trusted public key verifies.

Keys are PEM files: the private key PKCS#8 (what ``routet2i dev keygen`` and ``openssl genpkey -algorithm
ed25519`` write), the public key SubjectPublicKeyInfo (``openssl pkey -in KEY.pem -pubout``). The
cryptography library (a dependency of the ``edge`` extras) does the maths; it is imported only when a key
is used.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from routet2i._errors import BundleError, UsageError
from routet2i.bundle import MANIFEST, SIGNATURE

__all__ = [
    "SIGNATURE",
    "load_private_key",
    "load_public_keys",
    "sign_manifest",
    "verify_signature",
    "generate_key_pair",
    "key_id",
]

ALGORITHM = "ed25519"


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "bundle signatures need the cryptography package: pip install 'routet2i[edge]' (or cryptography)"
        ) from exc
    return serialization, ed25519


def _raw_public(public_key: Any) -> bytes:
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Any) -> str:
    """A short fingerprint of a public key (sha256 of its 32 raw bytes, 16 hex digits)."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def load_private_key(path: str | os.PathLike[str], option: str = "--sign-key") -> Any:
    """An Ed25519 private key from a PEM (PKCS#8) file; `UsageError` naming ``option`` otherwise."""
    serialization, ed25519 = _crypto()
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(
            f"{option} {path}: not an unencrypted PEM private key ({exc}); make one with `routet2i dev keygen`"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"{option} {path}: a {type(key).__name__}, expected an Ed25519 private key")
    return key


def _load_public(entry: str | os.PathLike[str], option: str) -> Any:
    serialization, ed25519 = _crypto()
    text = str(entry)
    if text.lstrip().startswith("-----BEGIN"):
        data, where = text.encode(), "inline PEM"
    else:
        path = Path(text).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"{option}: {path}: cannot read it ({exc.strerror or exc})") from None
        where = str(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{option}: {where}: not a PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UsageError(f"{option}: {where}: a {type(key).__name__}, expected an Ed25519 public key")
    return key


def load_public_keys(
    entries: Sequence[str | os.PathLike[str]] | None, option: str = "trusted_keys"
) -> list[Any]:
    """Ed25519 public keys from PEM file paths (or inline PEM text). ``None`` or ``[]``: no keys."""
    if entries is None:
        return []
    if isinstance(entries, (str, os.PathLike)):
        raise UsageError(f"{option}={str(entries)!r}: must be a list of public-key PEM files, not one string")
    return [_load_public(e, option) for e in entries]


def sign_manifest(bundle_dir: str | Path, private_key: Any) -> Path:
    """Sign ``bundle_dir/manifest.json`` as it is on disk; write ``manifest.sig``. Returns its path."""
    root = Path(bundle_dir)
    data = (root / MANIFEST).read_bytes()
    signature = private_key.sign(data)
    public = private_key.public_key()
    body = {
        "format_version": 1,
        "algorithm": ALGORITHM,
        "signed_file": "manifest.json",
        "key_id": key_id(public),
        "signature": base64.b64encode(signature).decode(),
    }
    path = root / SIGNATURE
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return path


def verify_signature(
    bundle_dir: str | Path, trusted: Sequence[Any], manifest_bytes: bytes | None = None
) -> str:
    """Check ``manifest.sig`` against the exact bytes of ``manifest.json`` (``manifest_bytes``: as the
    caller read and parsed them; default: read now) with each trusted key.

    Returns the key id that verified. Raises `BundleError` naming the file when the bundle is unsigned,
    the signature file is malformed, or no trusted key verifies it (modified manifest or another signer)."""
    from cryptography.exceptions import InvalidSignature

    root = Path(bundle_dir)
    path = root / SIGNATURE
    if not path.is_file():
        raise BundleError(
            f"{path} is missing: the bundle is unsigned and trusted_keys is set "
            "(export it with --sign-key, or remove trusted_keys to accept unsigned bundles)"
        )
    try:
        body = json.loads(path.read_text())
        if body.get("algorithm") != ALGORITHM:
            raise ValueError(f"algorithm {body.get('algorithm')!r}, expected {ALGORITHM!r}")
        signature = base64.b64decode(body["signature"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not a routet2i signature file ({exc})") from None
    data = (root / MANIFEST).read_bytes() if manifest_bytes is None else manifest_bytes
    for public in trusted:
        try:
            public.verify(signature, data)
        except InvalidSignature:
            continue
        return key_id(public)
    ids = ", ".join(key_id(k) for k in trusted)
    raise BundleError(
        f"{path}: the signature of manifest.json does not verify with any trusted key ({ids}); "
        f"signed by key {body.get('key_id', '?')!r}, or the manifest was modified after signing"
    )


def generate_key_pair(out_dir: str | Path, name: str = "routet2i-signing") -> tuple[Path, Path]:
    """Write ``NAME.pem`` (private, mode 0600) and ``NAME.pub.pem`` (public) into ``out_dir``; refuses to
    overwrite either."""
    serialization, ed25519 = _crypto()
    out = Path(out_dir)
    private_path, public_path = out / f"{name}.pem", out / f"{name}.pub.pem"
    for p in (private_path, public_path):
        if p.exists():
            raise UsageError(f"--out {out}: {p.name} exists; not overwriting a key (choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


# ------------------------------------------------------------------------------- `routet2i dev keygen`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder for NAME.pem and NAME.pub.pem")
    parser.add_argument(
        "--name", default="routet2i-signing", help="file name stem (default routet2i-signing)"
    )


def run(args: argparse.Namespace) -> int:
    from routet2i.paths import check_output_path

    check_output_path(args.out, "--out", folder=True)
    private_path, public_path = generate_key_pair(args.out, args.name)
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_path.read_bytes())
    print(f"private key {private_path} (keep it secret: `routet2i export ... --sign-key {private_path}`)")
    print(f"public key  {public_path} (key id {key_id(key)}: list it in the device's trusted_keys)")
    return 0
