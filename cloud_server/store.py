"""Devices, bearer tokens and per-period quotas: SQLite (default) and PostgreSQL stores.

Tokens look like ``rt2i_<key id>_<secret>``. The store keeps the key id (a lookup key, not secret) and the
SHA-256 of the secret; the token itself is returned once by `add_device` and never stored or logged. The
device id always comes from the token's row, never from a request. Hashes are compared with
`hmac.compare_digest`, and an unknown key id is compared against a dummy hash so that both failures cost
the same.

Quota accounting is a ledger of charges, one row per (device, request_id) holding its `units` (the served
model's cost, 1 by default), plus a per-(device, period) counter of committed units (so a check costs the
same after a million requests as after one)::

    reserve  INSERT ... SELECT ... WHERE <committed units> + <units of live reservations>
             <= <limit> - <units> ON CONFLICT DO NOTHING
    commit   UPDATE ... SET state='committed' WHERE ... AND state='reserved' AND holder=<token>
             AND expires_unix > now, and the counter + the row's units in the same statement (SQLite: a
             trigger; PostgreSQL: a data-modifying CTE)
    release  DELETE ... WHERE ... AND state='reserved' AND holder=<token>

Each runs in one transaction, serialised per device: in SQLite by ``BEGIN IMMEDIATE`` (one writer at a
time, across processes, in WAL mode), in PostgreSQL by a per-device transaction-scoped advisory lock taken
first (READ COMMITTED gives the later statements a fresh snapshot after the lock).

Reservations are short-lived: one lives until its request's deadline plus a margin (the caller passes that
as `ttl_s`), records the server instance that holds it (`owner`), and carries a random `holder` token. A
server killed with -9 never commits or releases; its reservations stop counting when they expire, and a
restarted server with the same instance id releases them at once (`release_owner`). A commit after expiry
is refused (`ReservationLost`) so that an expired reservation can never over-spend.

Idempotency and replays: the ledger's primary key is (device_id, request_id), and each row stores a salted
SHA-256 (`binding_digest`) of every parameter that shapes the image plus the seed. The same request_id
again:

- with other parameters (another digest): `RequestIdReused`, whatever the row's state; nothing is
  generated;
- while its reservation is live, or while another replay of it runs: `RequestInProgress`;
- after its commit, with the same parameters: a *replay*: not charged, generated again with the first
  seed (the same image), under a replay lease (``held_until``) that makes concurrent replays
  `RequestInProgress`;
- once the committed row's idempotency window is over (`keep_s` after the commit, and never past the end of
  the quota period it was charged in), or after a period change: a new request, charged in the current
  period. A charge can never pay for a generation in a later period. `purge` deletes such dead rows.

Every ledger transaction is idempotent (a retried one recognises its own `holder` token), so PostgreSQL
transactions that fail with a dropped connection are retried once on a fresh pooled connection
(psycopg_pool, health-checked on checkout). Store faults reach the server as `StoreUnavailable`.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from routet2i.cloud_server.errors import (
    DeviceExists,
    QuotaExhausted,
    RequestIdReused,
    RequestInProgress,
    ReservationLost,
    StoreUnavailable,
    Unauthenticated,
    UnknownDevice,
)
from routet2i.cloud_server.safe_text import redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

PERIODS = ("day", "month", "total")
TOKEN_PREFIX = "rt2i"
INT64_MAX = 2**63 - 1
IDEMPOTENCY_S = 86400.0  # default: how long after its commit a request_id can be replayed without a charge
_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_DUMMY_HASH = hashlib.sha256(b"routet2i-no-such-key").hexdigest()

_TABLES = ("rt2i_devices", "rt2i_charges", "rt2i_usage", "rt2i_meta")
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
    "CREATE TABLE IF NOT EXISTS rt2i_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
# Columns added after the first release (stores created before them are migrated in place):
#   params_digest  binding_digest() of the request's parameters and seed (NULL on older rows: never replayed)
#   holder         random token of the reservation or replay lease holding the row
#   owner          the server instance that holds it (release_owner frees a dead incarnation's rows)
#   held_until     end of the replay lease of a committed row (NULL: no replay running)
#   units          quota units the row reserves or charged (older rows: 1, the only cost there was)
_COLUMNS = (
    ("params_digest", "TEXT"),
    ("holder", "TEXT"),
    ("owner", "TEXT"),
    ("held_until", "DOUBLE PRECISION"),
    ("units", "BIGINT NOT NULL DEFAULT 1"),
)
_INDEXES = ("rt2i_charges_live",)
# SQLite: the commit's UPDATE adds the row's units to the usage counter through this trigger, inside the
# same statement. (It replaces `rt2i_count_commit`, which added 1 before rows had units.)
_SQLITE_TRIGGER_NAME = "rt2i_count_commit_units"
_SQLITE_OLD_TRIGGERS = ("rt2i_count_commit",)
_SQLITE_TRIGGER = """CREATE TRIGGER IF NOT EXISTS rt2i_count_commit_units AFTER UPDATE OF state ON rt2i_charges
    WHEN NEW.state = 'committed' AND OLD.state = 'reserved'
    BEGIN
        INSERT INTO rt2i_usage (device_id, period_start, used)
        VALUES (NEW.device_id, NEW.period_start, NEW.units)
        ON CONFLICT (device_id, period_start) DO UPDATE SET used = used + NEW.units;
    END"""

_RESERVE = """INSERT INTO rt2i_charges
    (device_id, request_id, period_start, state, seed, created_unix, expires_unix, params_digest, holder, owner,
     units)
    SELECT ?, ?, ?, 'reserved', ?, ?, ?, ?, ?, ?, ?
    WHERE COALESCE((SELECT used FROM rt2i_usage WHERE device_id = ? AND period_start = ?), 0)
        + (SELECT COALESCE(sum(units), 0) FROM rt2i_charges
           WHERE device_id = ? AND state = 'reserved' AND period_start = ? AND expires_unix > ?)
        <= (SELECT quota_limit FROM rt2i_devices WHERE device_id = ?) - ?
    ON CONFLICT (device_id, request_id) DO NOTHING"""
_ROW = """SELECT state, seed, expires_unix, period_start, params_digest, holder, held_until
    FROM rt2i_charges WHERE device_id = ? AND request_id = ?"""
_DELETE_ROW = "DELETE FROM rt2i_charges WHERE device_id = ? AND request_id = ?"
_LEASE = """UPDATE rt2i_charges SET holder = ?, owner = ?, held_until = ?
    WHERE device_id = ? AND request_id = ? AND state = 'committed'"""
_COMMIT_SQLITE = """UPDATE rt2i_charges SET state = 'committed', expires_unix = ?, held_until = NULL
    WHERE device_id = ? AND request_id = ? AND state = 'reserved' AND holder = ? AND expires_unix > ?"""
_COMMIT_PG = """WITH c AS (
        UPDATE rt2i_charges SET state = 'committed', expires_unix = ?, held_until = NULL
        WHERE device_id = ? AND request_id = ? AND state = 'reserved' AND holder = ? AND expires_unix > ?
        RETURNING device_id, period_start, units)
    INSERT INTO rt2i_usage (device_id, period_start, used) SELECT device_id, period_start, units FROM c
    ON CONFLICT (device_id, period_start) DO UPDATE SET used = rt2i_usage.used + excluded.used"""
_COMMITTED_BY = """SELECT 1 FROM rt2i_charges
    WHERE device_id = ? AND request_id = ? AND state = 'committed' AND holder = ?"""
_RELEASE = (
    "DELETE FROM rt2i_charges WHERE device_id = ? AND request_id = ? AND state = 'reserved' AND holder = ?"
)
_END_REPLAY = """UPDATE rt2i_charges SET held_until = NULL
    WHERE device_id = ? AND request_id = ? AND state = 'committed' AND holder = ?"""
_RELEASE_OWNER = "DELETE FROM rt2i_charges WHERE owner = ? AND state = 'reserved'"
_END_OWNER_REPLAYS = """UPDATE rt2i_charges SET held_until = NULL
    WHERE owner = ? AND state = 'committed' AND held_until IS NOT NULL"""
# per device, through rt2i_charges_live (device_id, state, ...): no index of its own to slow every write
_PURGE = """DELETE FROM rt2i_charges
    WHERE device_id = ? AND state IN ('reserved', 'committed') AND expires_unix <= ?
    AND (held_until IS NULL OR held_until <= ?)"""
_USAGE = """SELECT
    COALESCE((SELECT used FROM rt2i_usage WHERE device_id = ? AND period_start = ?), 0),
    (SELECT COALESCE(sum(units), 0) FROM rt2i_charges
     WHERE device_id = ? AND state = 'reserved' AND period_start = ? AND expires_unix > ?)"""
_WRITE_PROBE = """INSERT INTO rt2i_meta (key, value) VALUES ('write_probe', ?)
    ON CONFLICT (key) DO UPDATE SET value = excluded.value"""
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
    reserved: int  # units held by requests being generated right now (each its model's cost)
    remaining: int  # limit - used - reserved, never below 0
    period: str  # "day" | "month" | "total"
    period_end_unix: int  # when the period resets (0 for "total": never)


@dataclass(frozen=True)
class Reservation:
    device_id: str  # whose unit
    request_id: str  # the ledger key
    seed: int  # the seed to generate with (the first attempt's seed on a replay)
    charged: bool  # False: a replay of an already committed request_id, nothing to commit
    token: str = ""  # the holder token of this reservation (charged) or replay lease (not charged)
    keep_s: float = IDEMPOTENCY_S  # how long after the commit the request_id may be replayed
    period_end: int = 0  # end of the period charged (0: "total"); the replay window never passes it
    units: int = 1  # quota units of the request's model (charged: what the commit adds; a replay: none)


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


def binding_digest(binding: bytes, seed: int, salt: str | None = None) -> str:
    """``v1$<salt>$<sha256>`` of a request's parameters (`binding`, a canonical encoding of everything but
    the seed) and its seed. The random per-row salt keeps the ledger from confirming a guessed prompt."""
    salt = secrets.token_hex(8) if salt is None else salt
    h = hashlib.sha256(b"routet2i-request\0" + salt.encode() + b"\0" + binding + b"\0" + str(seed).encode())
    return f"v1${salt}${h.hexdigest()}"


def _digest_matches(stored: str | None, binding: bytes, seed: int) -> bool:
    parts = (stored or "").split("$")
    if len(parts) != 3 or parts[0] != "v1":
        return False  # a row from before request_ids were bound to parameters: never replayed
    return hmac.compare_digest(binding_digest(binding, seed, parts[1]), stored or "")


def _check_device_args(device_id: str | None, quota: int | None, period: str | None) -> None:
    if device_id is not None and not _DEVICE_ID_RE.match(device_id):
        raise ValueError(
            f"device_id={device_id!r} is not allowed: use 1-128 characters from letters, digits and ._:@- "
            "starting with a letter or digit"
        )
    if quota is not None and (
        isinstance(quota, bool) or not isinstance(quota, int) or not 0 <= quota <= INT64_MAX
    ):
        raise ValueError(f"quota={quota!r} is not allowed: use a whole number from 0 to 2**63-1")
    if period is not None and period not in PERIODS:
        raise ValueError(f"period={period!r} is not allowed: use one of {', '.join(PERIODS)}")


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _split_token(token: str) -> tuple[str, str] | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return redact(text.splitlines()[0] if text else type(exc).__name__)


class QuotaStore(ABC):
    """Devices, tokens and quota ledger. Methods are synchronous and thread-safe; the server calls them
    from worker threads."""

    url: str  # the store's URL with any password replaced by *** (safe to show)
    _commit_sql: str  # the dialect's single commit statement (flips the charge, bumps the usage counter)
    _retry_errors: tuple[type[BaseException], ...] = ()  # a transaction failing so is retried once
    _no_retry_errors: tuple[type[BaseException], ...] = ()  # ... unless it is one of these (a pool timeout)
    _fault_errors: tuple[type[BaseException], ...] = ()  # ... and then becomes StoreUnavailable

    # -- the SQL dialect -----------------------------------------------------------------------------------
    @abstractmethod
    @contextmanager
    def _write(self, device_id: str | None = None) -> Iterator[Any]:
        """A write transaction (yields a cursor-like object with execute/fetchone/rowcount); serialised per
        device when `device_id` is given."""

    @abstractmethod
    def _read_once(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Run one read-only statement."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection this store opened."""

    @abstractmethod
    def _integrity_problem(self) -> str | None:
        """What is wrong with the database's own structure (None: nothing found)."""

    def _is_fault(self, exc: BaseException) -> bool:
        return isinstance(exc, self._fault_errors)

    def _transact(self, fn: Callable[[Any], T], device_id: str | None = None, *, retry: bool = True) -> T:
        """Run `fn(cursor)` in one write transaction. A transaction that fails with a lost connection is run
        once more on a fresh connection when `retry` (every ledger transaction is idempotent); a store
        fault after that is `StoreUnavailable`."""

        def once() -> T:
            with self._write(device_id) as cur:
                return fn(cur)

        return self._retrying(once, retry)

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        """One read-only statement (retried once on a lost connection)."""
        return self._retrying(lambda: self._read_once(sql, params), True)

    def _retrying(self, once: Callable[[], T], retry: bool) -> T:
        """`once()`, run a second time after a lost connection when `retry`; store faults (after the retry)
        become `StoreUnavailable` naming --db."""
        attempts = 2 if retry and self._retry_errors else 1
        for attempt in range(1, attempts + 1):
            try:
                return once()
            except self._retry_errors as e:
                if attempt < attempts and not isinstance(e, self._no_retry_errors):
                    logger.warning("quota store connection lost (%s); retrying once", _first_line(e))
                    continue
                raise StoreUnavailable(detail=f"--db {self.url}: {_first_line(e)}") from e
            except Exception as e:
                if self._is_fault(e):
                    raise StoreUnavailable(detail=f"--db {self.url}: {_first_line(e)}") from e
                raise
        raise AssertionError("unreachable")  # pragma: no cover

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

    # -- start-up checks -----------------------------------------------------------------------------------
    def check_ready(self) -> None:
        """Refuse a store the server could not work with, with one line naming --db: a damaged database
        (SQLite integrity check) or one that cannot be written (a write probe: read-only file, read-only
        PostgreSQL transaction or replica)."""
        try:
            problem = self._integrity_problem()
        except Exception as e:  # noqa: BLE001 - a damaged file can fail the check itself
            problem = _first_line(e)
        if problem:
            raise ValueError(f"--db {self.url}: the database is damaged ({problem})")
        try:
            self._transact(lambda cur: cur.execute(_WRITE_PROBE, (str(int(time.time())),)), retry=False)
        except StoreUnavailable as e:
            raise ValueError(f"{e.detail} (a write probe failed: the store must be writable)") from e
        except Exception as e:
            raise ValueError(
                f"--db {self.url}: {_first_line(e)} (a write probe failed: the store must be writable)"
            ) from e

    # -- admin ---------------------------------------------------------------------------------------------
    def add_device(self, device_id: str, quota: int, period: str = "total") -> str:
        """Create a device and return its bearer token (the only time it is ever available)."""
        _check_device_args(device_id, quota, period)
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)

        def tx(cur: Any) -> None:
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

        self._transact(tx, retry=False)  # not idempotent: a lost commit would read as DeviceExists
        logger.info("device added device_id=%s quota=%d period=%s", device_id, quota, period)
        return f"{TOKEN_PREFIX}_{key_id}_{secret}"

    def set_quota(self, device_id: str, quota: int | None = None, period: str | None = None) -> Device:
        """Change a device's limit and/or period (a new period starts a fresh count)."""
        _check_device_args(None, quota, period)

        def tx(cur: Any) -> None:
            cur.execute(
                "UPDATE rt2i_devices SET quota_limit = COALESCE(?, quota_limit), period = COALESCE(?, period)"
                " WHERE device_id = ?",
                (quota, period, device_id),
            )
            if cur.rowcount != 1:
                raise UnknownDevice(f"no device {device_id!r} in {self.url} (see `device list`)")

        self._transact(tx)
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
        self,
        device: Device,
        request_id: str,
        seed: int | None = None,
        ttl_s: float = 900.0,
        now: float | None = None,
        *,
        binding: bytes = b"",
        owner: str = "",
        keep_s: float = IDEMPOTENCY_S,
        units: int = 1,
    ) -> Reservation:
        """Hold `units` quota units (the model's cost) for `request_id` until `ttl_s` from now, all or
        nothing, bound to the request's parameters (`binding`: every parameter but the seed, canonically
        encoded, the model included) and its seed (None: a fresh random one, or the stored one on a replay).
        See the module docstring for the replay rules."""
        if isinstance(units, bool) or not isinstance(units, int) or not 1 <= units <= INT64_MAX:
            raise ValueError(f"units={units!r} must be a whole number from 1 to 2**63-1")
        now = time.time() if now is None else now
        start, end = period_window(device.period, now)
        token = secrets.token_hex(12)
        new_seed = secrets.randbits(64) if seed is None else seed
        digest = binding_digest(binding, new_seed)
        dev_id = device.device_id
        insert = (dev_id, request_id, start, str(new_seed), now, now + ttl_s, digest, token, owner, units) + (
            dev_id, start, dev_id, start, now, dev_id, units,
        )  # fmt: skip

        def made(seed_: int, charged: bool) -> Reservation:
            return Reservation(dev_id, request_id, seed_, charged, token, keep_s, end, units)

        def tx(cur: Any) -> Reservation:
            for _ in range(2):  # the second round after dropping a dead row
                cur.execute(_RESERVE, insert)
                if cur.rowcount == 1:
                    return made(new_seed, True)
                cur.execute(_ROW, (dev_id, request_id))
                row = cur.fetchone()
                if row is None:  # no row and no insert: the quota said no
                    cur.execute(_USAGE, (dev_id, start, dev_id, start, now))
                    used, reserved = (int(x) for x in cur.fetchone())
                    cur.execute("SELECT quota_limit FROM rt2i_devices WHERE device_id = ?", (dev_id,))
                    limit_row = cur.fetchone()
                    limit = int(limit_row[0]) if limit_row else device.limit
                    raise QuotaExhausted(dev_id, limit, used, device.period, reserved, units)
                state, stored_seed, expires, period_start, stored_digest, holder, held_until = row
                if holder is not None and hmac.compare_digest(str(holder), token):
                    return made(int(stored_seed), state == "reserved")  # this transaction's retry
                alive = float(expires) > now and (state == "reserved" or int(period_start) == start)
                if not alive:  # a dead reservation, or an idempotency window that is over: the id is free
                    cur.execute(_DELETE_ROW, (dev_id, request_id))
                    continue
                if not _digest_matches(stored_digest, binding, int(stored_seed) if seed is None else seed):
                    raise RequestIdReused(request_id)
                if state == "reserved" or (held_until is not None and float(held_until) > now):
                    raise RequestInProgress(
                        f"request_id {request_id!r} is being generated right now; retry later"
                    )
                cur.execute(_LEASE, (token, owner, now + ttl_s, dev_id, request_id))
                return made(int(stored_seed), False)
            raise RequestInProgress(f"request_id {request_id!r} keeps changing state; retry later")

        return self._transact(tx, dev_id)

    def commit(self, res: Reservation, now: float | None = None) -> None:
        """Turn a live reservation into a charge (`ReservationLost` if it expired meanwhile); for a replay,
        end its lease."""
        if not res.charged:
            self._transact(lambda cur: cur.execute(_END_REPLAY, (res.device_id, res.request_id, res.token)))
            return
        now = time.time() if now is None else now
        keep_until = now + res.keep_s
        if res.period_end:
            keep_until = min(keep_until, res.period_end)

        def tx(cur: Any) -> None:
            cur.execute(self._commit_sql, (keep_until, res.device_id, res.request_id, res.token, now))
            if cur.rowcount == 1:
                return
            cur.execute(_COMMITTED_BY, (res.device_id, res.request_id, res.token))
            if cur.fetchone() is None:  # not even by this transaction's first try (a lost connection)
                raise ReservationLost(
                    f"the quota reservation of request_id {res.request_id!r} expired before the image was "
                    "ready; nothing was charged, retry"
                )

        # no per-device lock: the commit moves a unit from reserved to used in one statement, so the sum a
        # concurrent reserve checks never changes (a release only lowers it)
        self._transact(tx)

    def release(self, res: Reservation) -> None:
        """Give a reserved unit back (a failed, cancelled or shed request), or end a replay's lease.
        Idempotent; touches only this reservation (its holder token)."""
        sql = _RELEASE if res.charged else _END_REPLAY
        self._transact(lambda cur: cur.execute(sql, (res.device_id, res.request_id, res.token)))

    def release_owner(self, owner: str) -> tuple[int, int]:
        """Free what a previous incarnation of server instance `owner` still holds (it was killed): its
        reservations are deleted and its replay leases ended. Returns (reservations, leases)."""
        if not owner:
            return 0, 0

        def tx(cur: Any) -> tuple[int, int]:
            cur.execute(_RELEASE_OWNER, (owner,))
            n_res = max(cur.rowcount, 0)
            cur.execute(_END_OWNER_REPLAYS, (owner,))
            return n_res, max(cur.rowcount, 0)

        return self._transact(tx)

    def purge(self, now: float | None = None) -> int:
        """Delete dead ledger rows (expired reservations, idempotency windows that are over), one short
        transaction per device; the usage counters are separate and unaffected. Returns how many rows went."""
        now = time.time() if now is None else now
        total = 0
        for (device_id,) in self._read("SELECT device_id FROM rt2i_devices"):

            def tx(cur: Any, device_id: str = device_id) -> int:
                cur.execute(_PURGE, (device_id, now, now))
                return max(cur.rowcount, 0)

            total += self._transact(tx)
        return total


class _SqliteCursor:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._cur = conn.cursor()

    def execute(self, sql: str, params: tuple = ()) -> None:
        self._cur.execute(sql, params)

    def fetchone(self) -> tuple | None:
        return self._cur.fetchone()

    def fetchall(self) -> list[tuple]:
        return self._cur.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount


class SqliteStore(QuotaStore):
    """SQLite in WAL mode: safe for several server processes on one host (writers take turns).

    `create=False` refuses a path with no store yet instead of creating an empty one."""

    _commit_sql = _COMMIT_SQLITE

    def __init__(
        self, path: str | os.PathLike[str], busy_timeout_s: float = 30.0, create: bool = True
    ) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._init_use_tracking()
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"the folder of the SQLite store {self.path} does not exist")
        if self.path.is_dir():
            raise IsADirectoryError(f"--db {self.url}: {self.path} is a folder, not a SQLite file")
        if not create and not self.path.exists():
            raise FileNotFoundError(
                f"--db {self.url}: no quota store at {self.path} (only `routet2i-cloud device add`, or "
                "`serve --create-db`, creates one)"
            )
        try:
            self._setup(create)
        except (sqlite3.DatabaseError, StoreUnavailable) as e:  # e.g. "file is not a database"
            self.close()
            cause = e.__cause__ if isinstance(e, StoreUnavailable) and e.__cause__ else e
            raise ValueError(f"--db {self.url!r}: {self.path} is not a usable SQLite store ({cause})") from e
        except BaseException:
            self.close()
            raise

    def _is_fault(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.DatabaseError) and not isinstance(
            exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError)
        )

    def _setup(self, create: bool) -> None:
        conn = self._conn()
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master").fetchall()}
        if "rt2i_devices" not in names and not create:
            raise ValueError(
                f"--db {self.url}: {self.path} holds no quota store (only `routet2i-cloud device add`, or "
                "`serve --create-db`, creates one)"
            )
        columns = {r[1] for r in conn.execute("PRAGMA table_info(rt2i_charges)").fetchall()}
        missing_cols = [(c, t) for c, t in _COLUMNS if c not in columns]
        wanted = set(_TABLES) | set(_INDEXES) | {_SQLITE_TRIGGER_NAME}
        if not (wanted - names) and not missing_cols and not names & set(_SQLITE_OLD_TRIGGERS):
            return  # nothing to create or migrate: no write (a read-only store still lists and shows)

        def tx(cur: Any) -> None:
            for stmt in _SCHEMA:
                cur.execute(stmt)
            have = {r[1] for r in conn.execute("PRAGMA table_info(rt2i_charges)").fetchall()}
            for col, typ in _COLUMNS:
                if col not in have:
                    cur.execute(f"ALTER TABLE rt2i_charges ADD COLUMN {col} {typ}")
            for old in _SQLITE_OLD_TRIGGERS:  # counted 1 per commit: replaced by the units trigger
                cur.execute(f"DROP TRIGGER IF EXISTS {old}")
            cur.execute(_SQLITE_TRIGGER)

        self._transact(tx, retry=False)

    def _integrity_problem(self) -> str | None:
        rows = self._read_once("PRAGMA quick_check")
        text = " ".join(str(r[0]) for r in rows)
        return None if text.strip() == "ok" else " ".join(text.split())[:300]

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            with self._lock:
                self._conns.append(conn)
            self._local.conn = conn
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    @contextmanager
    def _write(self, device_id: str | None = None) -> Iterator[_SqliteCursor]:
        with self._in_use():
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteCursor(conn)
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # the transaction may already be gone (e.g. a disk I/O error)
                    pass
                raise
            conn.execute("COMMIT")

    def _read_once(self, sql: str, params: tuple = ()) -> list[tuple]:
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

    def fetchall(self) -> list[tuple]:
        return self._cur.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount


class PostgresStore(QuotaStore):
    """PostgreSQL through psycopg 3 and a psycopg_pool connection pool: one store shared by several server
    replicas. Pooled connections are health-checked when taken out, so a connection the server dropped
    (restart, failover, ``pg_terminate_backend``) is replaced instead of failing the next request; a
    transaction that still hits a lost connection is retried once (see the module docstring).

    Tables live in the connection's search_path (choose a schema with
    ``?options=-csearch_path%3Dmyschema`` in the URL)."""

    _commit_sql = _COMMIT_PG

    def __init__(
        self, url: str, connect_timeout_s: float = 10.0, create: bool = True, max_connections: int = 16
    ) -> None:
        try:
            import psycopg
            import psycopg_pool
        except ImportError as e:  # pragma: no cover - the cloud extra installs them
            raise ImportError(
                "PostgreSQL stores need psycopg 3 and psycopg_pool: pip install 'routet2i[cloud]'"
            ) from e
        self._psycopg = psycopg
        self.url = redact(url)
        self._init_use_tracking()
        self._retry_errors = (psycopg.OperationalError,)
        self._no_retry_errors = (psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed)
        self._fault_errors = (psycopg.OperationalError,)
        timeout = max(1, int(connect_timeout_s))
        try:  # one plain connection first: a wrong URL or a server that is down is one clear line, at once
            with psycopg.connect(url, autocommit=True, connect_timeout=timeout) as conn:
                self._setup(conn, create)
        except psycopg.Error as e:
            raise ValueError(f"--db {self.url}: {_first_line(e)}") from e
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"autocommit": True, "connect_timeout": timeout},
            check=psycopg_pool.ConnectionPool.check_connection,
            timeout=connect_timeout_s,
            name="routet2i-quota",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except psycopg.Error as e:
            self._pool.close()
            raise ValueError(f"--db {self.url}: {_first_line(e)}") from e

    def _setup(self, conn: Any, create: bool) -> None:
        cur = _PgCursor(conn)
        cur.execute("SELECT to_regclass('rt2i_devices') IS NOT NULL")
        if not cur.fetchone()[0] and not create:
            raise ValueError(
                f"--db {self.url}: no quota store tables in this database/schema (only `routet2i-cloud "
                "device add`, or `serve --create-db`, creates them)"
            )
        cur.execute("SELECT " + ", ".join(f"to_regclass('{n}') IS NOT NULL" for n in (*_TABLES, *_INDEXES)))
        complete = all(cur.fetchone())
        if complete:
            cur.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass('rt2i_charges') AND attnum > 0"
                " AND NOT attisdropped"
            )
            have = {r[0] for r in cur.fetchall()}
            complete = all(c in have for c, _ in _COLUMNS)
        if complete:
            return  # nothing to create or migrate: no DDL (a read-only replica still lists and shows)
        with conn.transaction():
            cur.execute("SELECT pg_advisory_xact_lock(7302114)")  # one schema creator at a time
            for stmt in _SCHEMA:
                cur.execute(stmt)
            for col, typ in _COLUMNS:
                cur.execute(f"ALTER TABLE rt2i_charges ADD COLUMN IF NOT EXISTS {col} {typ}")

    def _integrity_problem(self) -> str | None:
        return None  # the server's own business (checksums, WAL); a write probe still runs

    @contextmanager
    def _write(self, device_id: str | None = None) -> Iterator[_PgCursor]:
        with self._in_use(), self._pool.connection() as conn, conn.transaction():
            cur = _PgCursor(conn)
            if device_id is not None:
                cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (device_id,))
            yield cur

    def _read_once(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._in_use(), self._pool.connection() as conn:
            return conn.execute(sql.replace("?", "%s"), params).fetchall()

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        with self._closing():
            if pool is not None:
                pool.close()


def open_store(url: str, create: bool = True) -> QuotaStore:
    """`sqlite:///relative.db`, `sqlite:////absolute/path.db` or `postgresql://...` -> a store.

    `create=False`: refuse a store that does not exist yet (the admin CLI creates one only at
    `device add`, `serve` only with `--create-db`)."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path or path == ":memory:":
            raise ValueError(
                f"--db {url!r}: give a file path, e.g. sqlite:///quota.db (several processes share it)"
            )
        return SqliteStore(path, create=create)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, create=create)
    raise ValueError(
        f"--db {redact(url)!r} is not supported: use sqlite:///PATH.db or postgresql://USER@HOST:PORT/DB"
    )
