"""Bundle integrity (issue 11 item 9): every file listed, unlisted files refused, optional Ed25519 signatures,
and the hash cache of `check_hashes="first"` (issue 13 item 1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _device_bundles import handmade_router_bundle
from routet2i._errors import BundleError, UsageError
from routet2i.bundle import HashCache, verify_bundle, write_manifest
from routet2i.router_runtime import RouterSession

pytest.importorskip("torch")  # the handmade router bundle is exported from a torch module
pytest.importorskip("cryptography")
from routet2i.signing import generate_key_pair, load_private_key  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("ROUTET2I_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def router_bundle(tmp_path_factory) -> Path:
    return handmade_router_bundle(tmp_path_factory.mktemp("router") / "bundle")[0]


@pytest.fixture()
def bundle(router_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(router_bundle, copy)
    return copy


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    good_private, good_public = generate_key_pair(folder, "good")
    other_private, other_public = generate_key_pair(folder, "other")
    return {
        "private": good_private,
        "public": good_public,
        "other_private": other_private,
        "other_public": other_public,
    }


def _drop_entry(bundle: Path, rel: str) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"][rel]
    (bundle / "manifest.json").write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------- every file listed


def test_removed_manifest_entry_with_edited_routing_is_refused(bundle) -> None:
    """The attack of issue 11: drop routing.json from the manifest, then set alpha to 99 (every prompt to the
    cloud). The old check skipped unlisted files and loaded the bundle."""
    _drop_entry(bundle, "routing.json")
    routing = json.loads((bundle / "routing.json").read_text())
    routing["alpha"] = 99.0
    routing["calibration"] = [{"rate": 0.3, "alpha": 99.0}, {"rate": 0.5, "alpha": 99.0}]
    (bundle / "routing.json").write_text(json.dumps(routing))
    for mode in ("first", "always", "never"):
        with pytest.raises(BundleError, match=r"routing.json is not listed in manifest.json"):
            RouterSession(bundle, check_hashes=mode)
    from routet2i import EdgeClient

    with pytest.raises(BundleError, match="not listed"):
        EdgeClient(router=str(bundle), state_file="", decision_log="")


def test_added_file_is_refused_and_names_it(bundle) -> None:
    (bundle / "tokenizer" / "extra.json").write_text("{}")
    with pytest.raises(BundleError, match=r"tokenizer/extra.json is not listed"):
        RouterSession(bundle)
    (bundle / "tokenizer" / "extra.json").unlink()
    (bundle / ".hidden").write_text("x")
    with pytest.raises(BundleError, match=r"\.hidden is not listed"):
        verify_bundle(bundle, "router")


def test_manifest_entries_must_stay_inside_the_bundle(bundle, tmp_path) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["../outside.txt"] = {"sha256": "0" * 64, "bytes": 6}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"'\.\./outside.txt' is not a relative path inside the bundle"):
        verify_bundle(bundle, "router")


def test_check_hashes_bad_value(bundle) -> None:
    with pytest.raises(UsageError, match=r"check_hashes='sometimes': allowed: first, always, never"):
        RouterSession(bundle, check_hashes="sometimes")


# ------------------------------------------------------------------------------------------------ signing


def test_signed_bundle_loads_with_its_key_and_unsigned_is_refused(bundle, keys) -> None:
    with pytest.raises(BundleError, match=r"manifest.sig is missing: the bundle is unsigned"):
        RouterSession(bundle, trusted_keys=[str(keys["public"])])
    manifest = json.loads((bundle / "manifest.json").read_text())
    extra = {
        k: v
        for k, v in manifest.items()
        if k not in ("format_version", "kind", "created_unix", "versions", "files")
    }
    write_manifest(bundle, "router", extra, sign_key=load_private_key(keys["private"]))
    assert (bundle / "manifest.sig").is_file()
    session = RouterSession(bundle, trusted_keys=[str(keys["public"])], check_hashes="always")
    assert session.check.signed_by is not None and len(session.check.signed_by) == 16
    # Inline PEM text works too, and one matching key of several is enough.
    RouterSession(bundle, trusted_keys=[str(keys["other_public"]), keys["public"].read_text()])
    # No trusted keys: the signature is not required (and an unsigned copy loads as before).
    RouterSession(bundle)


def test_wrong_key_and_modified_manifest_are_refused(bundle, keys) -> None:
    write_manifest(bundle, "router", sign_key=load_private_key(keys["other_private"]))
    with pytest.raises(BundleError, match="does not verify with any trusted key"):
        RouterSession(bundle, trusted_keys=[str(keys["public"])])
    write_manifest(bundle, "router", sign_key=load_private_key(keys["private"]))
    RouterSession(bundle, trusted_keys=[str(keys["public"])])
    # Someone who can write the folder edits routing.json and re-hashes it into the manifest: the manifest
    # is consistent again, but its signature no longer verifies. Also with check_hashes="never".
    routing = json.loads((bundle / "routing.json").read_text())
    routing["alpha"] = 99.0
    (bundle / "routing.json").write_text(json.dumps(routing))
    manifest = json.loads((bundle / "manifest.json").read_text())
    from routet2i.bundle import sha256_file

    manifest["files"]["routing.json"] = {
        "sha256": sha256_file(bundle / "routing.json"),
        "bytes": (bundle / "routing.json").stat().st_size,
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    RouterSession(bundle)  # without trusted keys the manifest alone cannot tell
    for mode in ("first", "never"):
        with pytest.raises(BundleError, match="does not verify"):
            RouterSession(bundle, trusted_keys=[str(keys["public"])], check_hashes=mode)


def test_bad_keys_are_one_line_usage_errors(bundle, keys, tmp_path) -> None:
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(UsageError, match=r"trusted_keys: .*junk.pem: not a PEM public key"):
        RouterSession(bundle, trusted_keys=[str(tmp_path / "junk.pem")])
    with pytest.raises(UsageError, match=r"trusted_keys: .*nope.pem: cannot read it"):
        RouterSession(bundle, trusted_keys=[str(tmp_path / "nope.pem")])
    with pytest.raises(
        UsageError, match="expected an Ed25519 private key|not an unencrypted PEM private key"
    ):
        load_private_key(keys["public"])
    with pytest.raises(UsageError, match="must be a list"):
        RouterSession(bundle, trusted_keys=str(keys["public"]))


def test_keygen_cli_and_toml_trusted_keys(bundle, tmp_path) -> None:
    exe = [sys.executable, "-m", "routet2i.training.cli"]
    out = subprocess.run(
        [*exe, "dev", "keygen", "--out", str(tmp_path / "k")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    private, public = tmp_path / "k" / "routet2i-signing.pem", tmp_path / "k" / "routet2i-signing.pub.pem"
    assert private.stat().st_mode & 0o777 == 0o600 and public.is_file()
    again = subprocess.run(
        [*exe, "dev", "keygen", "--out", str(tmp_path / "k")], capture_output=True, text=True
    )
    assert again.returncode == 2 and "not overwriting" in again.stderr and "Traceback" not in again.stderr

    from routet2i import EdgeClient
    from routet2i.config import load_config

    toml = tmp_path / "routet2i.toml"
    toml.write_text(
        f'router = "{bundle}"\ncheck_hashes = "always"\ntrusted_keys = ["k/routet2i-signing.pub.pem"]\n'
        '[log]\ndecision_log = ""\nstate_file = ""\n'
    )
    config = load_config(toml, environ={})
    assert config.check_hashes == "always" and config.trusted_keys == [str(public)]
    with pytest.raises(BundleError, match="unsigned"):
        EdgeClient(config=config)
    write_manifest(bundle, "router", sign_key=load_private_key(private))
    client = EdgeClient(config=config)
    assert client.router.check.signed_by is not None
    bad = tmp_path / "bad.toml"
    bad.write_text('check_hashes = "sometimes"\n')
    with pytest.raises(UsageError, match="check_hashes='sometimes'"):
        load_config(bad, environ={})


@pytest.mark.parametrize("kind", ["router", "edge"])
def test_export_sign_key_refuses_a_bad_key_before_any_work(kind, tmp_path) -> None:
    (tmp_path / "bad.pem").write_text("junk")
    exe = [sys.executable, "-m", "routet2i.training.cli", "export", kind]
    source = ["--router", str(tmp_path)] if kind == "router" else ["--pipeline", str(tmp_path)]
    proc = subprocess.run(
        [*exe, *source, "--out", str(tmp_path / "out"), "--sign-key", str(tmp_path / "bad.pem")],
        capture_output=True,
        text=True,
    )
    assert (
        proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    )
    assert not (tmp_path / "out").exists()
    if kind == "edge":  # the key is read before the pipeline; the router export checks --router first
        assert "--sign-key" in proc.stderr and "bad.pem" in proc.stderr


# -------------------------------------------------------------------------------------------- hash cache


def test_first_hashes_once_then_only_changed_files(bundle, _cache_dir) -> None:
    first = verify_bundle(bundle, "router", check_hashes="first")
    n = first.files
    assert first.hashed_files == n and first.cached_files == 0
    assert list((_cache_dir / "hashes").glob("*.json"))
    second = verify_bundle(bundle, "router", check_hashes="first")
    assert second.hashed_files == 0 and second.cached_files == n
    always = verify_bundle(bundle, "router", check_hashes="always")
    assert always.hashed_files == n
    never = verify_bundle(bundle, "router", check_hashes="never")
    assert never.hashed_files == 0 and never.cached_files == 0
    # A rewritten file (same size, same bytes count, mtime put back) has a new stamp (ctime): re-hashed, caught.
    path = bundle / "routing.json"
    st = path.stat()
    text = path.read_text()
    path.write_text(text.replace('"alpha": 0.4', '"alpha": 9.9'))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    with pytest.raises(BundleError, match=r"routing.json: sha256 does not match"):
        verify_bundle(bundle, "router", check_hashes="first")
    path.write_text(text)
    third = verify_bundle(bundle, "router", check_hashes="first")
    assert third.hashed_files == 1 and third.cached_files == n - 1


def test_corrupt_or_unwritable_hash_cache_is_ignored(bundle, _cache_dir) -> None:
    verify_bundle(bundle, "router", check_hashes="first")
    cache_file = HashCache(bundle, _cache_dir).path
    cache_file.write_text("{not json")
    again = verify_bundle(bundle, "router", check_hashes="first")
    assert again.hashed_files == again.files  # hashed everything, and wrote a good cache
    assert verify_bundle(bundle, "router", check_hashes="first").cached_files == again.files
    # A cache entry that disagrees with the manifest is checked by hashing the file, not believed.
    data = json.loads(cache_file.read_text())
    data["files"]["routing.json"][5] = "0" * 64
    cache_file.write_text(json.dumps(data))
    check = verify_bundle(bundle, "router", check_hashes="first")
    assert check.hashed_files == 1 and check.cached_files == check.files - 1
    blocked = _cache_dir.parent / "file-not-folder"
    blocked.write_text("x")
    check = verify_bundle(bundle, "router", check_hashes="first", cache_dir=blocked / "cache")
    assert check.hashed_files == check.files
