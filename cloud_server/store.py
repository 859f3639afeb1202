"""Devices, bearer tokens and per-period quotas: SQLite (default) and PostgreSQL stores.

Tokens look like ``rt2i_<key id>_<secret>``. The store keeps the key id (a lookup key, not secret) and the
SHA-256 of the secret; the token itself is returned once by `add_device` and never stored or logged. The
device id always comes from the token's row, never from a request. Hashes are compared with
`hmac.compare_digest`, and an unknown key id is compared against a dummy hash so that both failures cost
the same.

Quota accounting is a ledger of charges, one row per (device, request_id), plus a per-(device, period)
counter of committed charges (so a check costs the same after a million requests as after one)::

    reserve  INSERT ... SELECT ... WHERE <committed counter> + <live reservations> < <limit>
             ON CONFLICT DO NOTHING
    commit   UPDATE ... SET state='committed' WHERE ... AND state='reserved' AND expires_unix > now,
             and the counter +1 in the same statement (SQLite: a trigger; PostgreSQL: a data-modifying CTE)
    release  DELETE ... WHERE ... AND state='reserved'

Each is one atomic statement. The reserve's check and insert are serialised per device: in SQLite by
``BEGIN IMMEDIATE`` (one writer at a time, across processes, in WAL mode), in PostgreSQL by a per-device
transaction-scoped advisory lock taken just before the statement (READ COMMITTED gives the statement a
fresh snapshot after the lock). A reservation carries an expiry: a server killed with -9 never commits or
releases, and its reservation simply stops counting once it expires (no sweeper needed, nothing leaks).
A commit after expiry is refused (`ReservationLost`) so that an expired reservation can never over-spend.

Idempotency: the ledger's primary key is (device_id, request_id). A request_id that was already committed
is *replayed*: `reserve` returns ``charged=False`` with the seed stored at the first attempt, and the
server re-generates the same image without charging again. A request_id whose reservation is still live
(a concurrent retry) is refused with `RequestInProgress`.

Usage::

    from routet2i.cloud_server.store import open_store
    store = open_store("sqlite:///quota.db")        # or "postgresql://user@host:5432/db"
    token = store.add_device("device-1", quota=100, period="month")
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routet2i.cloud_server.errors import (
    DeviceExists,
    QuotaExhausted,
    RequestInProgress,
    ReservationLost,
    Unauthenticated,
    UnknownDevice,
)

logger = logging.getLogger(__name__)

PERIODS = ("day", "month", "total")
TOKEN_PREFIX = "rt2i"
_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_DUMMY_HASH = hashlib.sha256(b"routet2i-no-such-key").hexdigest()

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS rt2i_devices (
        device_id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL,
        quota_limit BIGINT NOT NULL,
        period TEXT NOT NULL,
        created_unix BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rt2i_charges (
        device_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        period_start BIGINT NOT NULL,
        state TEXT NOT NULL,
        seed TEXT,
        created_unix DOUBLE PRECISION NOT NULL,
        expires_unix DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device_id, request_id))""",
    "CREATE INDEX IF NOT EXISTS rt2i_charges_live ON rt2i_charges (device_id, state, period_start, expires_unix)",
    """CREATE TABLE IF NOT EXISTS rt2i_usage (
        device_id TEXT NOT NULL,
        period_start BIGINT NOT NULL,
        used BIGINT NOT NULL,
        PRIMARY KEY (device_id, period_start))""",
)
# SQLite: the commit's UPDATE bumps the usage counter through this trigger, inside the same statement.
_SQLITE_TRIGGER = """CREATE TRIGGER IF NOT EXISTS rt2i_count_commit AFTER UPDATE OF state ON rt2i_charges
    WHEN NEW.state = 'committed' AND OLD.state = 'reserved'
    BEGIN
        INSERT INTO rt2i_usage (device_id, period_start, used) VALUES (NEW.device_id, NEW.period_start, 1)
        ON CONFLICT (device_id, period_start) DO UPDATE SET used = used + 1;
    END"""

_RESERVE = """INSERT INTO rt2i_charges
    (device_id, request_id, period_start, state, seed, created_unix, expires_unix)
    SELECT ?, ?, ?, 'reserved', ?, ?, ?
    WHERE COALESCE((SELECT used FROM rt2i_usage WHERE device_id = ? AND period_start = ?), 0)
        + (SELECT count(*) FROM rt2i_charges
           WHERE device_id = ? AND state = 'reserved' AND period_start = ? AND expires_unix > ?)
        < (SELECT quota_limit FROM rt2i_devices WHERE device_id = ?)
    ON CONFLICT (device_id, request_id) DO NOTHING"""
_COMMIT_SQLITE = """UPDATE rt2i_charges SET state = 'committed', expires_unix = ?
    WHERE device_id = ? AND request_id = ? AND state = 'reserved' AND expires_unix > ?"""
_COMMIT_PG = """WITH c AS (
        UPDATE rt2i_charges SET state = 'committed', expires_unix = ?
        WHERE device_id = ? AND request_id = ? AND state = 'reserved' AND expires_unix > ?
        RETURNING device_id, period_start)
    INSERT INTO rt2i_usage (device_id, period_start, used) SELECT device_id, period_start, 1 FROM c
    ON CONFLICT (device_id, period_start) DO UPDATE SET used = rt2i_usage.used + 1"""
_RELEASE = "DELETE FROM rt2i_charges WHERE device_id = ? AND request_id = ? AND state = 'reserved'"
_DROP_EXPIRED = """DELETE FROM rt2i_charges
    WHERE device_id = ? AND request_id = ? AND state = 'reserved' AND expires_unix <= ?"""
_USAGE = """SELECT
    COALESCE((SELECT used FROM rt2i_usage WHERE device_id = ? AND period_start = ?), 0),
    (SELECT count(*) FROM rt2i_charges
     WHERE device_id = ? AND state = 'reserved' AND period_start = ? AND expires_unix > ?)"""
_DEVICE_COLS = "device_id, quota_limit, period, created_unix"


@dataclass(frozen=True)
class Device:
    device_id: str  # the id the operator chose at `device add`
    limit: int  # units per period
    period: str  # "day" | "month" | "total"
    created_unix: int  # when it was added


@dataclass(frozen=True)
class QuotaSnapshot:
    device_id: str  # whose quota
    limit: int  # units per period
    used: int  # committed units this period
    reserved: int  # units held by requests being generated right now
    remaining: int  # limit - used - reserved, never below 0
    period: str  # "day" | "month" | "total"
    period_end_unix: int  # when the period resets (0 for "total": never)


@dataclass(frozen=True)
class Reservation:
    device_id: str  # whose unit
    request_id: str  # the ledger key
    seed: int  # the seed to generate with (the first attempt's seed on a replay)
    charged: bool  # False: a replay of an already committed request_id, nothing to commit or release


def period_window(period: str, now: float | None = None) -> tuple[int, int]:
    """(start, end) unix seconds of the UTC period containing `now`; (0, 0) for "total"."""
    now = time.time() if now is None else now
    if period == "total":
        return 0, 0
    t = time.gmtime(now)
    if period == "day":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return start, start + 86400
    if period == "month":
        start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return start, calendar.timegm((year, month, 1, 0, 0, 0))
    raise ValueError(f"period={period!r} is not one of {', '.join(PERIODS)}")


def _check_device_args(device_id: str | None, quota: int | None, period: str | None) -> None:
    if device_id is not None and not _DEVICE_ID_RE.match(device_id):
        raise ValueError(
            f"device_id={device_id!r} is not allowed: use 1-128 characters from letters, digits and ._:@- "
            "starting with a letter or digit"
        )
    if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota < 0):
        raise ValueError(f"quota={quota!r} is not allowed: use a whole number >= 0")
    if period is not None and period not in PERIODS:
        raise ValueError(f"period={period!r} is not allowed: use one of {', '.join(PERIODS)}")


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _split_token(token: str) -> tuple[str, str] | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


class QuotaStore(ABC):
    """Devices, tokens and quota ledger. Methods are synchronous and thread-safe; the server calls them
    from worker threads."""

    url: str
    _commit_sql: str  # the dialect's single commit statement (flips the charge, bumps the usage counter)

    # -- the SQL dialect -----------------------------------------------------------------------------------
    @abstractmethod
    @contextmanager
    def _write(self, device_id: str | None = None) -> Iterator[Any]:
        """A write transaction (yields a cursor-like object with execute/fetchone/rowcount); serialised per
        device when `device_id` is given."""

    @abstractmethod
    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Run one read-only statement."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection this store opened."""

    # -- connections in use: close() never pulls a connection from under a worker thread -----------------
    def _init_use_tracking(self) -> None:
        self._idle = threading.Condition()
        self._users = 0

    @contextmanager
    def _in_use(self) -> Iterator[None]:
        with self._idle:
            self._users += 1
        try:
            yield
        finally:
            with self._idle:
                self._users -= 1
                self._idle.notify_all()

    @contextmanager
    def _closing(self, timeout_s: float = 30.0) -> Iterator[None]:
        """Hold off new statements and wait (up to `timeout_s`) for running ones before closing: a release
        still running on a worker thread at shutdown would otherwise use a closed connection (SQLite: a
        crash, not an exception)."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._users == 0, timeout_s):
                logger.warning("closing the quota store with %d statement(s) still running", self._users)
            yield

    def __enter__(self) -> QuotaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- admin ---------------------------------------------------------------------------------------------
    def add_device(self, device_id: str, quota: int, period: str = "total") -> str:
        """Create a device and return its bearer token (the only time it is ever available)."""
        _check_device_args(device_id, quota, period)
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        with self._write() as cur:
            cur.execute("SELECT 1 FROM rt2i_devices WHERE device_id = ?", (device_id,))
            if cur.fetchone() is not None:
                raise DeviceExists(
                    f"device {device_id!r} already exists (use `device set-quota` to change it)"
                )
            cur.execute(
                "INSERT INTO rt2i_devices (device_id, key_id, token_hash, quota_limit, period, created_unix)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (device_id, key_id, _hash_secret(secret), quota, period, int(time.time())),
            )
        logger.info("device added device_id=%s quota=%d period=%s", device_id, quota, period)
        return f"{TOKEN_PREFIX}_{key_id}_{secret}"

    def set_quota(self, device_id: str, quota: int | None = None, period: str | None = None) -> Device:
        """Change a device's limit and/or period (a new period starts a fresh count)."""
        _check_device_args(None, quota, period)
        with self._write() as cur:
            cur.execute(
                "UPDATE rt2i_devices SET quota_limit = COALESCE(?, quota_limit), period = COALESCE(?, period)"
                " WHERE device_id = ?",
                (quota, period, device_id),
            )
            if cur.rowcount != 1:
                raise UnknownDevice(f"no device {device_id!r} in {self.url} (see `device list`)")
        return self.get_device(device_id)

    def get_device(self, device_id: str) -> Device:
        rows = self._read(f"SELECT {_DEVICE_COLS} FROM rt2i_devices WHERE device_id = ?", (device_id,))
        if not rows:
            raise UnknownDevice(f"no device {device_id!r} in {self.url} (see `device list`)")
        return Device(rows[0][0], int(rows[0][1]), rows[0][2], int(rows[0][3]))

    def list_devices(self) -> list[Device]:
        rows = self._read(f"SELECT {_DEVICE_COLS} FROM rt2i_devices ORDER BY device_id")
        return [Device(r[0], int(r[1]), r[2], int(r[3])) for r in rows]

    # -- serving -------------------------------------------------------------------------------------------
    def authenticate(self, token: str) -> Device:
        """The device a bearer token belongs to; `Unauthenticated` for anything else."""
        parts = _split_token(token) if token else None
        key_id, secret = parts if parts else ("", "")
        rows = (
            self._read(f"SELECT {_DEVICE_COLS}, token_hash FROM rt2i_devices WHERE key_id = ?", (key_id,))
            if parts
            else []
        )
        stored = rows[0][4] if rows else _DUMMY_HASH
        ok = hmac.compare_digest(_hash_secret(secret), stored)
        if not (rows and ok):
            raise Unauthenticated("unknown or malformed bearer token")
        r = rows[0]
        return Device(r[0], int(r[1]), r[2], int(r[3]))

    def quota(self, device: Device | str, now: float | None = None) -> QuotaSnapshot:
        """The device's usage in its current period (re-reads the device, so set-quota shows at once)."""
        now = time.time() if now is None else now
        dev = self.get_device(device if isinstance(device, str) else device.device_id)
        start, end = period_window(dev.period, now)
        used, reserved = (
            int(x) for x in self._read(_USAGE, (dev.device_id, start, dev.device_id, start, now))[0]
        )
        return QuotaSnapshot(
            dev.device_id, dev.limit, used, reserved, max(dev.limit - used - reserved, 0), dev.period, end
        )

    def reserve(
        self, device: Device, request_id: str, seed: int, ttl_s: float, now: float | None = None
    ) -> Reservation:
        """Hold one unit for `request_id` until `ttl_s` from now (see the module docstring)."""
        for _ in range(3):
            now = time.time() if now is None else now
            start, _end = period_window(device.period, now)
            with self._write(device.device_id) as cur:
                cur.execute(
                    _RESERVE,
                    (device.device_id, request_id, start, str(seed), now, now + ttl_s)
                    + (device.device_id, start, device.device_id, start, now, device.device_id),
                )
                if cur.rowcount == 1:
                    return Reservation(device.device_id, request_id, seed, charged=True)
            rows = self._read(
                "SELECT state, seed, expires_unix FROM rt2i_charges WHERE device_id = ? AND request_id = ?",
                (device.device_id, request_id),
            )
            if not rows:
                snap = self.quota(device, now)
                raise QuotaExhausted(device.device_id, snap.limit, snap.used, snap.period, snap.reserved)
            state, stored_seed, expires = rows[0]
            if state == "committed":
                return Reservation(device.device_id, request_id, int(stored_seed), charged=False)
            if float(expires) > now:
                raise RequestInProgress(
                    f"request_id {request_id!r} is being generated right now; retry later"
                )
            with self._write() as cur:  # an expired reservation of a killed server: drop it, try again
                cur.execute(_DROP_EXPIRED, (device.device_id, request_id, now))
            now = None
        raise RequestInProgress(f"request_id {request_id!r} keeps changing state; retry later")

    def commit(self, res: Reservation, now: float | None = None) -> None:
        """Turn a live reservation into a charge; `ReservationLost` if it expired meanwhile."""
        if not res.charged:
            return
        now = time.time() if now is None else now
        with self._write() as cur:
            cur.execute(self._commit_sql, (now, res.device_id, res.request_id, now))
            if cur.rowcount != 1:
                raise ReservationLost(
                    f"the quota reservation of request_id {res.request_id!r} expired before the image was "
                    "ready; nothing was charged, retry"
                )

    def release(self, res: Reservation) -> None:
        """Give a reserved unit back (a failed, cancelled or shed request). Idempotent."""
        if not res.charged:
            return
        with self._write() as cur:
            cur.execute(_RELEASE, (res.device_id, res.request_id))


class _SqliteCursor:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._cur = conn.cursor()

    def execute(self, sql: str, params: tuple = ()) -> None:
        self._cur.execute(sql, params)

    def fetchone(self) -> tuple | None:
        return self._cur.fetchone()

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount


class SqliteStore(QuotaStore):
    """SQLite in WAL mode: safe for several server processes on one host (writers take turns)."""

    _commit_sql = _COMMIT_SQLITE

    def __init__(self, path: str | os.PathLike[str], busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._init_use_tracking()
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"the folder of the SQLite store {self.path} does not exist")
        try:
            with self._write() as cur:
                for stmt in (*_SCHEMA, _SQLITE_TRIGGER):
                    cur.execute(stmt)
        except sqlite3.DatabaseError as e:  # e.g. "file is not a database"
            self.close()
            raise ValueError(f"--db {self.url!r}: {self.path} is not a usable SQLite store ({e})") from e

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def _write(self, device_id: str | None = None) -> Iterator[_SqliteCursor]:
        with self._in_use():
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteCursor(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._in_use():
            return self._conn().execute(sql, params).fetchall()

    def close(self) -> None:
        with self._closing(self._busy_timeout_s), self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
            self._local = threading.local()


class _PgCursor:
    def __init__(self, conn: Any) -> None:
        self._cur = conn.cursor()

    def execute(self, sql: str, params: tuple = ()) -> None:
        self._cur.execute(sql.replace("?", "%s"), params)

    def fetchone(self) -> tuple | None:
        return self._cur.fetchone()

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount


class PostgresStore(QuotaStore):
    """PostgreSQL through psycopg 3: one store shared by several server replicas.

    Tables live in the connection's search_path (choose a schema with
    ``?options=-csearch_path%3Dmyschema`` in the URL)."""

    _commit_sql = _COMMIT_PG

    def __init__(self, url: str, connect_timeout_s: float = 10.0) -> None:
        try:
            import psycopg
        except ImportError as e:  # pragma: no cover - the cloud extra installs it
            raise ImportError("PostgreSQL stores need psycopg 3: pip install 'routet2i[cloud]'") from e
        self._psycopg = psycopg
        self.url = url
        self._connect_timeout_s = connect_timeout_s
        self._local = threading.local()
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        self._init_use_tracking()
        with self._write() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(7302114)")  # one schema creator at a time
            for stmt in _SCHEMA:
                cur.execute(stmt)

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.closed:
            conn = None
        if conn is None:
            conn = self._psycopg.connect(
                self.url, autocommit=True, connect_timeout=int(self._connect_timeout_s)
            )
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def _write(self, device_id: str | None = None) -> Iterator[_PgCursor]:
        with self._in_use():
            conn = self._conn()
            with conn.transaction():
                cur = _PgCursor(conn)
                if device_id is not None:
                    cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (device_id,))
                yield cur

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._in_use():
            return self._conn().execute(sql.replace("?", "%s"), params).fetchall()

    def close(self) -> None:
        with self._closing(), self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
            self._local = threading.local()


def open_store(url: str) -> QuotaStore:
    """`sqlite:///relative.db`, `sqlite:////absolute/path.db` or `postgresql://...` -> a store."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path or path == ":memory:":
            raise ValueError(
                f"--db {url!r}: give a file path, e.g. sqlite:///quota.db (several processes share it)"
            )
        return SqliteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    raise ValueError(
        f"--db {url!r} is not supported: use sqlite:///PATH.db or postgresql://USER@HOST:PORT/DB"
    )
