"""Shared helpers of the cloud endpoint tests: store URLs (SQLite, PostgreSQL in a unique schema), a client,
and `routet2i-cloud serve` subprocesses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import grpc
import pytest
from routet2i.cloud.v1 import cloud_pb2, cloud_pb2_grpc

__all__ = ["pg_url", "sqlite_url", "store_url"]  # the fixtures: registered by conftest.py

PG_URL = os.environ.get("ROUTET2I_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
CLOUD_CLI = [sys.executable, "-m", "routet2i.cloud_server.cli"]


def _pg_admin_connect():
    psycopg = pytest.importorskip(
        "psycopg", reason="psycopg 3 is not installed (pip install 'routet2i[cloud]')"
    )
    try:
        return psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error as e:
        pytest.skip(
            f"PostgreSQL not reachable at ROUTET2I_TEST_PG_URL={PG_URL} ({str(e).splitlines()[0]}); "
            "run scripts/ensure_postgres.sh or set ROUTET2I_TEST_PG_URL"
        )


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards (parallel runs never collide)."""
    conn = _pg_admin_connect()
    schema = f"rt2i_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'quota.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str:
    """Both stores: every test using it runs on SQLite and on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return request.getfixturevalue(name)


def stub_for(address: str) -> tuple[grpc.Channel, cloud_pb2_grpc.CloudGenerationStub]:
    channel = grpc.insecure_channel(address)
    return channel, cloud_pb2_grpc.CloudGenerationStub(channel)


def auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def request(prompt: str = "a red fox in the snow", **kw) -> cloud_pb2.GenerateRequest:
    return cloud_pb2.GenerateRequest(prompt=prompt, **kw)


class ServeProcess:
    """`routet2i-cloud serve` in a subprocess on a free port; `.address`, `.kill9()`, `.terminate()`."""

    def __init__(
        self, db: str, *extra: str, env: dict[str, str] | None = None, timeout: float = 60.0
    ) -> None:
        cmd = [*CLOUD_CLI, "serve", "--listen", "127.0.0.1:0", "--db", db, *extra]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "ROUTET2I_LOG_LEVEL": "WARNING", **(env or {})}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env
        )
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line and self.proc.poll() is not None:
                break
            m = re.search(r"serving on port (\d+)", line)
            if m:
                self.port = int(m.group(1))
                self.address = f"127.0.0.1:{self.port}"
                return
        err = self.proc.stderr.read() if self.proc.poll() is not None else ""  # type: ignore[union-attr]
        self.proc.kill()
        raise RuntimeError(f"server did not start: {line!r} {err[-2000:]}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)
