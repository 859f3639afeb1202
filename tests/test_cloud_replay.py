"""A request_id is bound to its parameters (issue 11, item 1): a charged id never buys another image.

The charge is bound to a digest of every parameter that shapes the image (prompt, negative prompt, size,
steps, guidance, seed, model; server defaults applied). The same id with other parameters is
INVALID_ARGUMENT "request_id reused with different parameters" and never generates; an exact retry returns
the same image without a second charge; replays go through the in-progress check; a charged id's
idempotency ends with its window and its quota period."""

from __future__ import annotations

import sqlite3
import threading
import time

import grpc
import pytest
from _cloud_helpers import auth, request, stub_for
from routet2i.cloud.v1 import cloud_pb2
from routet2i.cloud_server import BackgroundServer, NoOpPipeline, ServerConfig, open_store
from routet2i.cloud_server.core import request_binding
from routet2i.cloud_server.errors import QuotaExhausted, RequestIdReused, RequestInProgress
from routet2i.cloud_server.pipelines import GenParams

REUSED = "request_id reused with different parameters"
CFG = ServerConfig(default_steps=2, batch_window_s=0.0)


@pytest.fixture
def served(store_url):
    """(srv, stub, token, store, pipeline) on both stores; a device with quota 3."""
    store = open_store(store_url)
    token = store.add_device("cam", quota=3, period="total")
    pipe = NoOpPipeline()
    srv = BackgroundServer(store, pipe, config=CFG)
    channel, stub = stub_for(srv.address)
    yield srv, stub, token, store, pipe
    channel.close()
    srv.stop(0.5)
    store.close()


def _refused(stub, token, req) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(req, metadata=auth(token), timeout=10)
    return e.value


def test_issue_repro_a_charged_request_id_buys_no_other_image(served):
    srv, stub, token, store, pipe = served
    r1 = request("a cat", request_id="r1", width=64, height=64, num_inference_steps=1, seed=7)
    first = stub.Generate(r1, metadata=auth(token), timeout=10)
    for i in (2, 3):  # spend the rest
        stub.Generate(request("x", request_id=f"r{i}"), metadata=auth(token), timeout=10)
    calls = len(pipe.calls)
    other = request(
        "a different prompt", request_id="r1", width=128, height=128, num_inference_steps=1, seed=7
    )
    err = _refused(stub, token, other)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and REUSED in err.details()
    assert len(pipe.calls) == calls  # never generated
    again = stub.Generate(r1, metadata=auth(token), timeout=10)  # the exact retry: same image, no charge
    assert again.image_png == first.image_png and again.seed == 7 and again.quota.used == 3
    store.set_quota("cam", quota=0)
    err = _refused(stub, token, other)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and REUSED in err.details()
    snap = store.quota("cam")
    assert (snap.used, snap.reserved) == (3, 0)


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a dog"},
        {"negative_prompt": "blurry"},
        {"width": 128},
        {"height": 32},
        {"num_inference_steps": 3},
        {"guidance_scale": 5.5},
        {"seed": 8},
    ],
    ids=lambda c: next(iter(c)),
)
def test_every_parameter_that_shapes_the_image_is_bound(served, change):
    srv, stub, token, store, pipe = served
    base = {"prompt": "a cat", "request_id": "bound", "seed": 7}
    stub.Generate(cloud_pb2.GenerateRequest(**base), metadata=auth(token), timeout=10)
    calls = len(pipe.calls)
    err = _refused(stub, token, cloud_pb2.GenerateRequest(**{**base, **change}))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and REUSED in err.details()
    assert len(pipe.calls) == calls
    assert store.quota("cam").used == 1


def test_server_defaults_are_bound_as_their_effective_values(served):
    srv, stub, token, store, pipe = served
    # width/height 0 = the model's 64 px, steps 0 = the server's 2, guidance unset = 7.0: the same request
    first = stub.Generate(request("fox", request_id="d", seed=1), metadata=auth(token), timeout=10)
    explicit = request(
        "fox", request_id="d", seed=1, width=64, height=64, num_inference_steps=2, guidance_scale=7.0
    )
    again = stub.Generate(explicit, metadata=auth(token), timeout=10)
    assert again.image_png == first.image_png and again.quota.used == 1


def test_another_model_or_other_server_defaults_make_another_request(store_url):
    with open_store(store_url) as store:
        token = store.add_device("cam", quota=5, period="total")
        with BackgroundServer(store, NoOpPipeline(), config=CFG) as a:
            channel, stub = stub_for(a.address)
            stub.Generate(request("fox", request_id="m", seed=1), metadata=auth(token), timeout=10)
            channel.close()
        other_model = NoOpPipeline(model_name="noop-xl")
        with BackgroundServer(store, other_model, config=CFG) as b:  # a replica serving another model
            channel, stub = stub_for(b.address)
            err = _refused(stub, token, request("fox", request_id="m", seed=1))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and REUSED in err.details()
            channel.close()
        assert other_model.calls == []
        more_steps = ServerConfig(default_steps=4, batch_window_s=0.0)
        with BackgroundServer(store, NoOpPipeline(), config=more_steps) as c:  # steps 0 now means 4
            channel, stub = stub_for(c.address)
            err = _refused(stub, token, request("fox", request_id="m", seed=1))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            channel.close()
        assert store.quota("cam").used == 1


def test_a_server_picked_seed_is_part_of_the_binding(served):
    srv, stub, token, store, pipe = served
    first = stub.Generate(request("owl", request_id="s"), metadata=auth(token), timeout=10)  # no seed
    unset = stub.Generate(request("owl", request_id="s"), metadata=auth(token), timeout=10)
    given = stub.Generate(request("owl", request_id="s", seed=first.seed), metadata=auth(token), timeout=10)
    assert unset.seed == given.seed == first.seed and unset.image_png == given.image_png == first.image_png
    other_seed = (first.seed + 1) % 2**64
    err = _refused(stub, token, request("owl", request_id="s", seed=other_seed))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and REUSED in err.details()
    assert store.quota("cam").used == 1


def test_replays_pass_the_in_progress_check(store_url):
    """A replay generates again (no image cache): two replays of one id at once would be free parallel
    work; the second one is ABORTED like a concurrent retry of an uncommitted request."""
    with open_store(store_url) as store:
        token = store.add_device("cam", quota=2, period="total")
        pipe = NoOpPipeline()
        with BackgroundServer(store, pipe, config=ServerConfig(default_steps=5, batch_window_s=0.0)) as srv:
            channel, stub = stub_for(srv.address)
            stub.Generate(request("bee", request_id="p", seed=3), metadata=auth(token), timeout=10)
            pipe.step_delay_s = 0.1
            replay = stub.Generate.future(
                request("bee", request_id="p", seed=3), metadata=auth(token), timeout=30
            )
            while not srv.core.batcher.running:
                time.sleep(0.005)
            err = _refused(stub, token, request("bee", request_id="p", seed=3))
            assert err.code() == grpc.StatusCode.ABORTED and "being generated right now" in err.details()
            assert replay.result().quota.used == 1
            pipe.step_delay_s = 0.0
            # the lease ended with the replay: the next exact retry goes through again
            assert (
                stub.Generate(
                    request("bee", request_id="p", seed=3), metadata=auth(token), timeout=10
                ).quota.used
                == 1
            )
            channel.close()
        assert store.quota("cam").reserved == 0


# --- the store's rules, with a controlled clock


def _binding(prompt: str = "a cat", model: str = "noop") -> bytes:
    return request_binding(model, GenParams(prompt, "", 64, 64, 2, 7.0, 0))


def test_in_progress_rows_are_bound_too(store_url):
    with open_store(store_url) as store:
        store.add_device("d", quota=3, period="total")
        dev = store.get_device("d")
        store.reserve(dev, "busy", 5, 60, binding=_binding("a"))
        with pytest.raises(RequestInProgress):
            store.reserve(dev, "busy", 5, 60, binding=_binding("a"))
        with pytest.raises(RequestIdReused):
            store.reserve(dev, "busy", 5, 60, binding=_binding("b"))
        assert store.quota(dev).reserved == 1


def test_idempotency_ends_with_its_window_and_never_pays_for_a_later_generation(store_url):
    with open_store(store_url) as store:
        store.add_device("d", quota=1, period="total")
        dev = store.get_device("d")
        t0 = 1_700_000_000.0
        store.commit(store.reserve(dev, "old", 5, 60, now=t0, binding=_binding(), keep_s=100), now=t0 + 1)
        replay = store.reserve(dev, "old", None, 60, now=t0 + 50, binding=_binding(), keep_s=100)
        assert replay.charged is False and replay.seed == 5
        store.commit(replay, now=t0 + 51)
        # after the window the id is a new request: quota decides, nothing is generated for free
        with pytest.raises(QuotaExhausted):
            store.reserve(dev, "old", None, 60, now=t0 + 200, binding=_binding(), keep_s=100)
        store.set_quota("d", quota=2)
        fresh = store.reserve(dev, "old", 5, 60, now=t0 + 201, binding=_binding("new prompt"), keep_s=100)
        assert fresh.charged is True  # a new charge, any parameters
        store.commit(fresh, now=t0 + 202)
        assert store.quota(dev, now=t0 + 203).used == 2


def test_idempotency_never_reaches_into_the_next_period(store_url):
    with open_store(store_url) as store:
        store.add_device("d", quota=1, period="day")
        dev = store.get_device("d")
        yesterday = time.time() - 86400
        store.commit(store.reserve(dev, "r", 9, 60, now=yesterday, binding=_binding()), now=yesterday + 1)
        assert store.quota(dev).remaining == 1  # a new day
        store.set_quota("d", quota=0)  # ... with no units left
        with pytest.raises(QuotaExhausted):  # yesterday's charge does not pay for today's generation
            store.reserve(dev, "r", None, 60, binding=_binding())
        # a period change (set-quota --period) ends it as well
        store.set_quota("d", quota=1, period="total")
        dev = store.get_device("d")
        res = store.reserve(dev, "r", None, 60, binding=_binding())
        assert res.charged is True


def test_purge_deletes_dead_rows_only(store_url):
    with open_store(store_url) as store:
        store.add_device("d", quota=10, period="total")
        dev = store.get_device("d")
        now = time.time()
        store.commit(store.reserve(dev, "kept", 1, 60, now=now, binding=_binding(), keep_s=3600), now=now)
        store.commit(
            store.reserve(dev, "done", 1, 60, now=now - 500, binding=_binding(), keep_s=10), now=now - 499
        )
        store.reserve(dev, "dead", 1, 5, now=now - 100, binding=_binding())
        store.reserve(dev, "live", 1, 60, now=now, binding=_binding())
        assert store.purge(now=now) == 2
        ids = {r[0] for r in store._read("SELECT request_id FROM rt2i_charges")}
        assert ids == {"kept", "live"}
        assert store.quota(dev, now=now).used == 2  # counters are separate from the ledger rows


def test_a_store_from_before_the_binding_is_migrated(tmp_path):
    """An existing SQLite store (no digest columns) gains them; its committed ids are never replayed."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """CREATE TABLE rt2i_devices (device_id TEXT PRIMARY KEY, key_id TEXT NOT NULL UNIQUE,
               token_hash TEXT NOT NULL, quota_limit BIGINT NOT NULL, period TEXT NOT NULL,
               created_unix BIGINT NOT NULL);
           CREATE TABLE rt2i_charges (device_id TEXT NOT NULL, request_id TEXT NOT NULL,
               period_start BIGINT NOT NULL, state TEXT NOT NULL, seed TEXT, created_unix DOUBLE PRECISION NOT NULL,
               expires_unix DOUBLE PRECISION NOT NULL, PRIMARY KEY (device_id, request_id));
           CREATE TABLE rt2i_usage (device_id TEXT NOT NULL, period_start BIGINT NOT NULL, used BIGINT NOT NULL,
               PRIMARY KEY (device_id, period_start));
           INSERT INTO rt2i_devices VALUES ('d', 'k', 'h', 1, 'total', 0);
           INSERT INTO rt2i_charges VALUES ('d', 'legacy', 0, 'committed', '5', 0, 4102444800);
           INSERT INTO rt2i_usage VALUES ('d', 0, 1);"""
    )
    conn.close()
    with open_store(f"sqlite:///{path}") as store:
        dev = store.get_device("d")
        with pytest.raises(RequestIdReused):  # no digest: cannot prove it is the same request
            store.reserve(dev, "legacy", 5, 60, binding=_binding())
        assert store.quota(dev).used == 1


def test_parallel_replays_of_one_id_generate_at_most_once_at_a_time(store_url):
    with open_store(store_url) as store:
        store.add_device("d", quota=1, period="total")
        dev = store.get_device("d")
        store.commit(store.reserve(dev, "x", 4, 60, binding=_binding()))
        got, busy = [], []
        barrier = threading.Barrier(8)

        def worker() -> None:
            barrier.wait()
            try:
                got.append(store.reserve(dev, "x", None, 60, binding=_binding()))
            except RequestInProgress:
                busy.append(1)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(got) == 1 and len(busy) == 7 and got[0].charged is False
