"""Shared fixtures: tiny random-weight models of the real architectures, built once per test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The cloud tests' store fixtures (SQLite, PostgreSQL in a unique schema, both via store_url), registered here
# for every test module instead of star imports.
from _cloud_helpers import pg_url, sqlite_url, store_url  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ROUTET2I_SHARED_DATA", REPO.parent / "shared" / "data"))
QUALITY_CSV = SHARED_DATA / "quality" / "public_quality_long.csv"
PROMPTS_DIR = SHARED_DATA / "prompts"


@pytest.fixture(scope="session", autouse=True)
def _user_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """The bundle hash cache and ONNX Runtime's optimized graphs of test bundles go to a temporary folder,
    not ~/.cache/routet2i (subprocesses inherit it)."""
    old = os.environ.get("ROUTET2I_CACHE_DIR")
    os.environ["ROUTET2I_CACHE_DIR"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if old is None:
        os.environ.pop("ROUTET2I_CACHE_DIR", None)
    else:
        os.environ["ROUTET2I_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"edge-sd21": Path, "cloud-sd3": Path, "clip": Path}: built offline with fixed seeds."""
    from routet2i.training.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def quality_csv() -> Path:
    """The real public quality table from ../shared/data; tests that need it skip when it is absent."""
    if not QUALITY_CSV.exists():
        pytest.skip(
            f"public quality data not found at {QUALITY_CSV} (../shared/data is not part of the repo)"
        )
    return QUALITY_CSV


@pytest.fixture(scope="session")
def prompts_dir() -> Path:
    if not PROMPTS_DIR.exists():
        pytest.skip(f"prompt corpora not found at {PROMPTS_DIR} (../shared/data is not part of the repo)")
    return PROMPTS_DIR


def _openssl(*args: str, cwd: Path) -> None:
    import subprocess

    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA plus server and client certificates (ca.pem, server.pem/.key, client.pem/.key) for
    127.0.0.1 / localhost, made with the openssl command; TLS tests skip without it."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return d
