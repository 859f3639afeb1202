"""Faults: a server killed with -9 mid-generation never leaves a unit charged, and its restart frees what it
held at once; reservations live no longer than their request's deadline plus a margin; SIGTERM releases at
once; PostgreSQL connections dropped under the server cost at most one request and leak nothing."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import grpc
import pytest
from _cloud_helpers import ServeProcess, _pg_admin_connect, auth, request, stub_for
from routet2i.cloud_server import BackgroundServer, NoOpPipeline, ServerConfig, open_store

SLOW = ("--pipeline", "noop", "--noop-step-delay", "0.2", "--max-batch", "1")


def _first_progress(stub, token, request_id):
    stream = stub.GenerateStream(request(request_id=request_id, num_inference_steps=50), metadata=auth(token),
                                 timeout=60)  # fmt: skip
    event = next(stream)
    assert event.WhichOneof("event") == "progress"  # the server is generating now
    return stream


def test_kill9_mid_generation_charges_nothing_and_loses_nothing(store_url):
    with open_store(store_url) as store:
        token = store.add_device("victim", quota=3, period="total")
        server = ServeProcess(store_url, *SLOW, "--reservation-ttl", "3")
        channel, stub = stub_for(server.address)
        done = stub.Generate(
            request(request_id="done", num_inference_steps=1), metadata=auth(token), timeout=30
        )
        assert done.quota.used == 1
        stream = _first_progress(stub, token, "unfinished")
        reserved_at = time.time()
        server.kill9()
        with pytest.raises(grpc.RpcError):
            list(stream)
        channel.close()
        snap = store.quota("victim")
        assert (snap.used, snap.reserved) == (1, 1)  # the dead server's reservation still holds a unit...
        time.sleep(max(0.0, reserved_at + 3.5 - time.time()))
        snap = store.quota("victim")
        assert (snap.used, snap.reserved, snap.remaining) == (1, 0, 2)  # ...until it expires: nothing charged
        restarted = ServeProcess(store_url, *SLOW)
        channel, stub = stub_for(restarted.address)
        retry = stub.Generate(
            request(request_id="unfinished", num_inference_steps=1), metadata=auth(token), timeout=30
        )
        replay = stub.Generate(
            request(request_id="done", num_inference_steps=1), metadata=auth(token), timeout=30
        )
        assert retry.quota.used == 2 and replay.quota.used == 2  # the finished one is still charged, once
        channel.close()
        assert restarted.terminate() == 0


def test_sigterm_mid_generation_releases_the_reservation(sqlite_url):
    with open_store(sqlite_url) as store:
        token = store.add_device("d", quota=3, period="total")
        server = ServeProcess(sqlite_url, *SLOW, "--grace", "0.3")
        channel, stub = stub_for(server.address)
        stream = _first_progress(stub, token, "interrupted")
        assert store.quota("d").reserved == 1
        assert server.terminate() == 0
        with pytest.raises(grpc.RpcError):
            list(stream)
        channel.close()
        snap = store.quota("d")
        assert (snap.used, snap.reserved) == (0, 0)  # released by the shutdown, not by expiry (900 s)


def _held_units(store, device: str) -> tuple[int, int]:
    snap = store.quota(device)
    return snap.used, snap.reserved


def test_kill9_then_restart_frees_the_units_at_once_and_charges_nothing_twice(store_url):
    """Issue 11 item 5: a killed server's reservations used to stay held for --reservation-ttl (900 s), and
    retries of those ids got ABORTED 'being generated right now'. A restart with the same instance id
    releases them, so the units are usable again well within the request's deadline."""
    deadline_s = 60.0
    with open_store(store_url) as store:
        token = store.add_device("victim", quota=3, period="total")
        server = ServeProcess(store_url, *SLOW, "--instance-id", "replica-1")
        channel, stub = stub_for(server.address)
        done = stub.Generate(
            request(request_id="done", num_inference_steps=1), metadata=auth(token), timeout=30
        )
        assert done.quota.used == 1
        stream = _first_progress(stub, token, "unfinished")  # 50 steps x 0.2 s, deadline 60 s
        started = time.monotonic()
        server.kill9()
        with pytest.raises(grpc.RpcError):
            list(stream)
        channel.close()
        assert _held_units(store, "victim") == (1, 1)  # the dead server's reservation holds a unit
        restarted = ServeProcess(store_url, "--pipeline", "noop", "--instance-id", "replica-1")
        assert _held_units(store, "victim") == (1, 0)  # freed by the restart, not by expiry
        channel, stub = stub_for(restarted.address)
        retry = stub.Generate(  # the exact retry of the killed request
            request(request_id="unfinished", num_inference_steps=50), metadata=auth(token), timeout=30
        )
        assert time.monotonic() - started < deadline_s  # usable again within the request's deadline
        replay = stub.Generate(
            request(request_id="done", num_inference_steps=1), metadata=auth(token), timeout=30
        )
        assert retry.quota.used == 2 and replay.quota.used == 2  # each id charged once
        assert replay.image_png == done.image_png
        channel.close()
        assert restarted.terminate() == 0
        assert _held_units(store, "victim") == (2, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_instance_id_is_host_and_listen_address_so_a_plain_restart_frees_too(sqlite_url):
    with open_store(sqlite_url) as store:
        token = store.add_device("d", quota=2, period="total")
        port = _free_port()
        listen = ("--listen", f"127.0.0.1:{port}")
        server = ServeProcess(sqlite_url, *SLOW, *listen)
        channel, stub = stub_for(server.address)
        stream = _first_progress(stub, token, "cut")
        server.kill9()
        with pytest.raises(grpc.RpcError):
            list(stream)
        channel.close()
        assert _held_units(store, "d") == (0, 1)
        restarted = ServeProcess(sqlite_url, *SLOW, *listen)
        assert _held_units(store, "d") == (0, 0)
        assert restarted.terminate() == 0


def test_a_reservation_lives_until_the_request_deadline_plus_the_margin(sqlite_url):
    store = open_store(sqlite_url)
    token = store.add_device("d", quota=5, period="total")
    pipe = NoOpPipeline(step_delay_s=0.05)
    cfg = ServerConfig(
        default_steps=40, batch_window_s=0.0, reservation_margin_s=2.0, reservation_ttl_s=900.0
    )
    with BackgroundServer(store, pipe, config=cfg) as srv:
        channel, stub = stub_for(srv.address)
        for rid, timeout, longest in (("with-deadline", 5.0, 5.0 + 2.0), ("no-deadline", None, 900.0)):
            fut = stub.Generate.future(request(request_id=rid), metadata=auth(token), timeout=timeout)
            while not srv.core.batcher.running:
                time.sleep(0.005)
            ((created, expires),) = store._read(
                "SELECT created_unix, expires_unix FROM rt2i_charges WHERE request_id = ?", (rid,)
            )
            assert longest - 0.5 <= expires - created <= longest + 0.01, (rid, expires - created)
            fut.result()
            while srv.core.batcher.running:
                time.sleep(0.005)
        channel.close()
    store.close()


# --- PostgreSQL connections dropped under the server (pg_terminate_backend)


@pytest.fixture
def pg_app(pg_url):
    """(url, terminate): the store URL with a unique application_name, and a function that drops every
    connection of it with pg_terminate_backend, returning how many it dropped."""
    app = f"rt2i-fault-{uuid.uuid4().hex[:10]}"
    admin = _pg_admin_connect()

    def terminate() -> int:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchall()
        return len(rows)

    yield f"{pg_url}&application_name={app}", terminate
    admin.close()


@pytest.mark.postgres
def test_dropped_postgres_connections_cost_at_most_one_request(pg_app):
    """Issue 11 item 4: after pg_terminate_backend the next 5 requests failed with INTERNAL and one
    reservation stayed held for 900 s."""
    url, terminate = pg_app
    store = open_store(url)
    token = store.add_device("d", quota=50, period="total")
    with BackgroundServer(
        store, NoOpPipeline(), config=ServerConfig(default_steps=1, batch_window_s=0.0)
    ) as srv:
        channel, stub = stub_for(srv.address)
        assert stub.Generate(request(request_id="before"), metadata=auth(token), timeout=10).quota.used == 1
        failures = []
        for round_ in range(3):
            assert terminate() >= 1
            for i in range(5):
                try:
                    stub.Generate(request(request_id=f"after-{round_}-{i}"), metadata=auth(token), timeout=10)
                except grpc.RpcError as e:
                    failures.append(e.code())
        assert len(failures) <= 3 and set(failures) <= {grpc.StatusCode.UNAVAILABLE}, failures
        used, reserved = _held_units(store, "d")
        assert (used, reserved) == (1 + 15 - len(failures), 0)
        channel.close()
    store.close()


@pytest.mark.postgres
def test_connections_dropped_mid_request_still_commit_or_release(pg_app):
    url, terminate = pg_app
    store = open_store(url)
    token = store.add_device("d", quota=5, period="total")
    pipe = NoOpPipeline(step_delay_s=0.05)
    with BackgroundServer(store, pipe, config=ServerConfig(default_steps=10, batch_window_s=0.0)) as srv:
        channel, stub = stub_for(srv.address)
        fut = stub.Generate.future(request(request_id="finishes"), metadata=auth(token), timeout=30)
        while not srv.core.batcher.running:
            time.sleep(0.005)
        assert terminate() >= 1  # between reserve and commit
        assert fut.result().quota.used == 1  # the commit got through on a fresh connection
        while srv.core.batcher.running:
            time.sleep(0.005)
        doomed = stub.Generate.future(request(request_id="cancelled"), metadata=auth(token), timeout=30)
        while not srv.core.batcher.running:
            time.sleep(0.005)
        assert terminate() >= 1  # between reserve and release
        doomed.cancel()
        deadline = time.monotonic() + 10
        while _held_units(store, "d") != (1, 0):  # released now, not after --reservation-ttl
            assert time.monotonic() < deadline, _held_units(store, "d")
            time.sleep(0.05)
        channel.close()
    store.close()


@pytest.mark.postgres
def test_a_transaction_whose_commit_answer_was_lost_is_retried_without_a_double_effect(pg_url, monkeypatch):
    """The one retry is safe because every ledger transaction recognises its own first try: a reserve or a
    commit that did land before the connection dropped is not refused ('in progress', 'expired') and not
    applied twice."""
    import psycopg

    store = open_store(pg_url)
    store.add_device("d", quota=2, period="total")
    dev = store.get_device("d")
    real_write = store._write
    fail_next = threading.Event()

    from contextlib import contextmanager

    @contextmanager
    def lossy_write(device_id=None):
        with real_write(device_id) as cur:
            yield cur
        if fail_next.is_set():  # the transaction committed; the answer is "lost"
            fail_next.clear()
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(store, "_write", lossy_write)
    fail_next.set()
    res = store.reserve(dev, "r", 1, 60)
    assert res.charged and store.quota(dev).reserved == 1
    fail_next.set()
    store.commit(res)
    assert (store.quota(dev).used, store.quota(dev).reserved) == (1, 0)  # counted once
    fail_next.set()
    replay = store.reserve(dev, "r", None, 60)
    assert replay.charged is False and replay.seed == 1
    fail_next.set()
    store.release(replay)
    assert store.reserve(dev, "r", None, 60).charged is False  # the replay lease was ended
    store.close()


def test_default_instance_id():
    from routet2i.cloud_server.servicer import default_instance_id

    host = socket.gethostname()
    assert default_instance_id("127.0.0.1:50051") == f"{host}/127.0.0.1:50051"
    assert default_instance_id("10.0.0.5:50051") != default_instance_id("127.0.0.1:50051")  # both can bind
    assert default_instance_id("127.0.0.1:0") == "" and default_instance_id("unix:/tmp/s.sock") == ""
