"""Faults: a server killed with -9 mid-generation never leaves a unit charged; SIGTERM releases at once."""

from __future__ import annotations

import time

import grpc
import pytest
from _cloud_helpers import *  # noqa: F403 - the store fixtures
from _cloud_helpers import ServeProcess, auth, request, stub_for
from routet2i.cloud_server import open_store

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
