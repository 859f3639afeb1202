"""Quota store: tokens, atomic reserve/commit/release, idempotency, expiry, periods — SQLite and PostgreSQL."""

from __future__ import annotations

import calendar
import sqlite3
import threading
import time

import pytest
from routet2i.cloud_server.errors import (
    DeviceExists,
    QuotaExhausted,
    RequestIdReused,
    RequestInProgress,
    ReservationLost,
    Unauthenticated,
    UnknownDevice,
)
from routet2i.cloud_server.store import open_store, period_window


def test_token_authenticates_its_device_and_only_a_hash_is_stored(store_url, tmp_path):
    with open_store(store_url) as store:
        token = store.add_device("dev-a", quota=3, period="day")
        other = store.add_device("dev-b", quota=1, period="total")
        assert store.authenticate(token).device_id == "dev-a"
        assert store.authenticate(other).device_id == "dev-b"
        prefix, key_id, secret = token.split("_", 2)
        for bad in ("", "garbage", token + "x", f"{prefix}_{key_id}_{secret[:-1]}",
                    f"{prefix}_{other.split('_', 2)[1]}_{secret}", f"{prefix}_ffffffffffffffff_{secret}"):  # fmt: skip
            with pytest.raises(Unauthenticated):
                store.authenticate(bad)
        rows = store._read("SELECT * FROM rt2i_devices")
    dump = repr(rows)
    assert secret not in dump and token not in dump  # the secret is never stored, only its hash


def test_reserve_commit_release_and_quota_snapshot(store_url):
    with open_store(store_url) as store:
        store.add_device("d", quota=2, period="total")
        dev = store.get_device("d")
        r1 = store.reserve(dev, "r1", seed=11, ttl_s=60)
        r2 = store.reserve(dev, "r2", seed=12, ttl_s=60)
        snap = store.quota(dev)
        assert (snap.used, snap.reserved, snap.remaining) == (0, 2, 0)
        with pytest.raises(QuotaExhausted) as e:
            store.reserve(dev, "r3", seed=13, ttl_s=60)
        assert e.value.device_id == "d" and e.value.limit == 2
        store.commit(r1)
        store.release(r2)
        store.release(r2)  # idempotent
        snap = store.quota("d")
        assert (snap.used, snap.reserved, snap.remaining, snap.period) == (1, 0, 1, "total")
        store.commit(store.reserve(dev, "r3", seed=13, ttl_s=60))
        assert store.quota("d").used == 2
        with pytest.raises(QuotaExhausted):
            store.reserve(dev, "r4", seed=14, ttl_s=60)


def test_request_id_committed_once_is_replayed_without_charge(store_url):
    with open_store(store_url) as store:
        store.add_device("d", quota=5, period="month")
        dev = store.get_device("d")
        first = store.reserve(dev, "same", seed=42, ttl_s=60)
        with pytest.raises(RequestInProgress):  # a concurrent retry while the first attempt runs
            store.reserve(dev, "same", seed=42, ttl_s=60)
        with pytest.raises(RequestIdReused):  # the same id for another image, even while in progress
            store.reserve(dev, "same", seed=99, ttl_s=60)
        store.commit(first)
        again = store.reserve(dev, "same", seed=None, ttl_s=60)  # no seed: the first attempt's
        assert again.charged is False and again.seed == 42
        store.commit(again)  # ends the replay, charges nothing
        explicit = store.reserve(dev, "same", seed=42, ttl_s=60)  # the same seed, given
        assert explicit.charged is False and explicit.seed == 42
        store.release(explicit)  # ends the replay: must not remove the committed charge
        with pytest.raises(RequestIdReused):  # another seed is another image
            store.reserve(dev, "same", seed=99, ttl_s=60)
        assert store.quota(dev).used == 1


def test_expired_reservation_stops_counting_and_cannot_be_committed(store_url):
    with open_store(store_url) as store:
        store.add_device("d", quota=1, period="total")
        dev = store.get_device("d")
        now = time.time()
        stale = store.reserve(dev, "killed", seed=1, ttl_s=5, now=now - 10)  # a server died 10 s ago
        assert store.quota(dev, now=now).reserved == 0  # expired: no longer holds the unit
        fresh = store.reserve(dev, "next", seed=2, ttl_s=60, now=now)
        with pytest.raises(ReservationLost):
            store.commit(stale, now=now)
        store.commit(fresh, now=now)
        # the killed request's id can be retried: the expired reservation is dropped, quota decides
        with pytest.raises(QuotaExhausted):
            store.reserve(dev, "killed", seed=1, ttl_s=60, now=now)
        assert store.quota(dev, now=now).used == 1


def test_periods_reset_and_set_quota(store_url):
    with open_store(store_url) as store:
        store.add_device("d", quota=1, period="day")
        dev = store.get_device("d")
        yesterday = time.time() - 86400
        store.commit(store.reserve(dev, "old", seed=1, ttl_s=60, now=yesterday), now=yesterday)
        assert store.quota(dev, now=yesterday).remaining == 0
        assert store.quota(dev).remaining == 1  # a new day
        assert store.set_quota("d", quota=4).limit == 4
        assert store.set_quota("d", period="total").period == "total"
        assert store.quota("d").used == 0  # a new period kind starts a fresh count
        with pytest.raises(UnknownDevice):
            store.set_quota("nope", quota=1)
        with pytest.raises(DeviceExists):
            store.add_device("d", quota=1, period="day")
        for bad in ({"device_id": "has space", "quota": 1}, {"device_id": "x", "quota": -1},
                    {"device_id": "x", "quota": 1, "period": "week"}):  # fmt: skip
            with pytest.raises(ValueError):
                store.add_device(**bad)
        assert [d.device_id for d in store.list_devices()] == ["d"]


def test_period_windows_are_utc_calendar_periods():
    t = calendar.timegm((2024, 12, 31, 23, 59, 0))
    assert period_window("day", t) == (
        calendar.timegm((2024, 12, 31, 0, 0, 0)),
        calendar.timegm((2025, 1, 1, 0, 0, 0)),
    )
    assert period_window("month", t) == (
        calendar.timegm((2024, 12, 1, 0, 0, 0)),
        calendar.timegm((2025, 1, 1, 0, 0, 0)),
    )
    assert period_window("total", t) == (0, 0)
    with pytest.raises(ValueError, match="week"):
        period_window("week", t)


def test_concurrent_reserves_never_overspend(store_url):
    """16 threads, each with its own connection, race for 10 units: exactly 10 reservations succeed."""
    with open_store(store_url) as store:
        store.add_device("d", quota=10, period="total")
        dev = store.get_device("d")
        ok, denied = [], []
        barrier = threading.Barrier(16)

        def worker(i: int) -> None:
            barrier.wait()
            for j in range(4):
                try:
                    ok.append(store.reserve(dev, f"t{i}-{j}", seed=i, ttl_s=60))
                except QuotaExhausted:
                    denied.append(1)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(ok) == 10 and len(denied) == 54
        for r in ok:
            store.commit(r)
        assert store.quota(dev).used == 10


def test_open_store_rejects_bad_urls(tmp_path):
    with pytest.raises(ValueError, match="mysql"):
        open_store("mysql://x")
    with pytest.raises(ValueError, match="memory"):
        open_store("sqlite:///:memory:")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_store(f"sqlite:///{tmp_path}/missing/dir/q.db")


def test_sqlite_store_uses_wal(sqlite_url):
    with open_store(sqlite_url):
        pass
    path = sqlite_url[len("sqlite:///") :]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_close_waits_for_a_statement_running_on_another_thread(store_url):
    """Shutdown closes the store while a worker thread may still release a reservation: close() must wait
    for it instead of closing the connection under it (with SQLite that crashed the server now and then)."""
    store = open_store(store_url)
    token_ready, errors, finished = threading.Event(), [], []

    def worker() -> None:
        try:
            with store._write() as cur:
                token_ready.set()
                time.sleep(0.3)  # close() is called meanwhile
                cur.execute("SELECT 1")
                finished.append(time.monotonic())
        except Exception as exc:  # what the old close() caused: a closed connection mid-transaction
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    assert token_ready.wait(5)
    store.close()
    closed_at = time.monotonic()
    thread.join(5)
    assert errors == [] and finished and finished[0] <= closed_at
