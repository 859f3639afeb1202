"""Several served models with costs (issue 14, item 4): `GenerateRequest.model` picks one (empty: the
default, the first pipeline), each model has its own batcher, the quota is charged in units (the model's
cost) atomically, GetQuota and QuotaFailure speak in units and list the served models, an unknown model is
INVALID_ARGUMENT naming the served ones, and a request_id is bound to the model."""

from __future__ import annotations

import sqlite3
import threading
import time

import grpc
import pytest
from _cloud_helpers import auth, request, stub_for
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from routet2i.cloud.v1 import cloud_pb2
from routet2i.cloud_server import BackgroundServer, CloudCore, NoOpPipeline, ServerConfig, open_store
from routet2i.cloud_server.errors import QuotaExhausted

CFG = ServerConfig(default_steps=1, batch_window_s=0.0)


@pytest.fixture
def two_models(store_url):
    """(stub, token, store, small, big): "small" (default, 1 unit) and "big" (3 units); quota 5."""
    store = open_store(store_url)
    token = store.add_device("cam", quota=5, period="total")
    small, big = NoOpPipeline(model_name="tiny-a"), NoOpPipeline(model_name="tiny-b")
    srv = BackgroundServer(store, {"small": small, "big": big}, config=CFG, costs={"big": 3})
    channel, stub = stub_for(srv.address)
    yield stub, token, store, small, big
    channel.close()
    srv.stop(0.5)
    store.close()


def _gen(stub, token, **kw):
    return stub.Generate(request(**kw), metadata=auth(token), timeout=10)


def _refused(stub, token, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        _gen(stub, token, **kw)
    return e.value


def test_units_per_model_and_getquota_lists_models(two_models):
    stub, token, store, small, big = two_models
    q = stub.GetQuota(cloud_pb2.GetQuotaRequest(), metadata=auth(token), timeout=5)
    assert [(m.name, m.cost) for m in q.models] == [("small", 1), ("big", 3)]
    assert q.default_model == "small" and (q.limit, q.used, q.remaining, q.reserved) == (5, 0, 5, 0)

    r = _gen(stub, token, request_id="a")  # no model: the default
    assert (r.model, r.units_charged, r.quota.used, r.quota.remaining) == ("small", 1, 1, 4)
    assert [m.name for m in r.quota.models] == ["small", "big"]
    r = _gen(stub, token, request_id="b", model="big")
    assert (r.model, r.units_charged, r.quota.used, r.quota.remaining) == ("big", 3, 4, 1)
    assert (len(small.calls), len(big.calls)) == (1, 1)  # each model its own pipeline

    err = _refused(stub, token, request_id="c", model="big")  # 1 unit left, big costs 3
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "costs 3 units" in err.details() and "1 left" in err.details() and "'big'" in err.details()
    details = rpc_status.from_call(err).details
    failure, status = error_details_pb2.QuotaFailure(), cloud_pb2.QuotaStatus()
    assert details[0].Unpack(failure) and details[1].Unpack(status)
    assert failure.violations[0].subject == "cam" and "units" in failure.violations[0].description
    assert (status.used, status.remaining, [m.cost for m in status.models]) == (4, 1, [1, 3])
    assert len(big.calls) == 1  # never generated

    r = _gen(stub, token, request_id="d", model="small")  # the last unit still buys a small image
    assert (r.units_charged, r.quota.used, r.quota.remaining) == (1, 5, 0)
    snap = store.quota("cam")
    assert (snap.used, snap.reserved, snap.remaining) == (5, 0, 0)


def test_unknown_model_is_invalid_argument_naming_the_served_ones(two_models):
    stub, token, store, small, big = two_models
    err = _refused(stub, token, request_id="x", model="huge")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("model: 'huge' is not served") and "small, big" in err.details()
    assert (len(small.calls), len(big.calls), store.quota("cam").used) == (0, 0, 0)
    err = _refused(stub, token, request_id="y", model="tiny-a")  # the pipeline's own name is not its NAME
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_request_id_is_bound_to_the_model(two_models):
    stub, token, store, small, big = two_models
    first = _gen(stub, token, request_id="r", model="big", seed=5)
    again = _gen(stub, token, request_id="r", model="big", seed=5)  # the exact retry: free
    assert (again.units_charged, again.quota.used, again.image_png) == (0, 3, first.image_png)
    for model in ("small", ""):  # the same id with another model (also the default by omission): refused
        err = _refused(stub, token, request_id="r", model=model, seed=5)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id reused" in err.details()
    assert (len(small.calls), store.quota("cam").used) == (0, 3)


def test_units_are_reserved_atomically_under_concurrency(store_url):
    store = open_store(store_url)
    token = store.add_device("busy", quota=10, period="total")
    big = NoOpPipeline(step_delay_s=0.05, model_name="b")
    srv = BackgroundServer(store, {"small": NoOpPipeline(), "big": big}, config=CFG, costs={"big": 3})
    channel, stub = stub_for(srv.address)
    codes: list[grpc.StatusCode] = []

    def one(i: int) -> None:
        try:
            _gen(stub, token, request_id=f"c{i}", model="big", num_inference_steps=2)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(c.name for c in codes) == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 5
        snap = store.quota("busy")
        assert (snap.used, snap.reserved, snap.remaining) == (9, 0, 1)
    finally:
        channel.close()
        srv.stop(0.5)
        store.close()


def test_single_pipeline_form_is_unchanged(sqlite_url):
    store = open_store(sqlite_url)
    token = store.add_device("one", quota=2, period="total")
    with BackgroundServer(store, NoOpPipeline(), config=CFG) as srv:
        channel, stub = stub_for(srv.address)
        q = stub.GetQuota(cloud_pb2.GetQuotaRequest(), metadata=auth(token), timeout=5)
        assert [(m.name, m.cost) for m in q.models] == [("noop", 1)] and q.default_model == "noop"
        r = _gen(stub, token, request_id="a")
        assert (r.model, r.units_charged, r.quota.used) == ("noop", 1, 1)
        assert _gen(stub, token, request_id="b", model="noop").quota.used == 2
        channel.close()
    with BackgroundServer(store, NoOpPipeline(), config=CFG, costs={"noop": 2}) as srv:
        channel, stub = stub_for(srv.address)
        store.set_quota("one", quota=3)  # 1 left, noop now costs 2
        err = _refused(stub, token, request_id="c")
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "costs 2 units" in err.details()
        channel.close()
    store.close()


def test_bad_costs_and_names_are_refused(sqlite_url):
    store = open_store(sqlite_url)
    with pytest.raises(ValueError, match=r"--cost huge: no such model is served; served: a, b"):
        CloudCore(store, {"a": NoOpPipeline(), "b": NoOpPipeline()}, costs={"huge": 2})
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match=r"whole number of units"):
            CloudCore(store, {"a": NoOpPipeline()}, costs={"a": bad})
    for name in ("", "a b", "a=b", "x" * 101):
        with pytest.raises(ValueError, match="model name"):
            CloudCore(store, {name: NoOpPipeline()})
    with pytest.raises(ValueError, match="no pipeline"):
        CloudCore(store, {})
    with pytest.raises(ValueError, match=r"--cost other: no such model is served; served: noop"):
        BackgroundServer(store, NoOpPipeline(), config=CFG, costs={"other": 1})
    store.close()


def test_store_charges_units_all_or_nothing(store_url):
    store = open_store(store_url)
    store.add_device("u", quota=5, period="total")
    dev = store.get_device("u")
    r1 = store.reserve(dev, "a", units=3)
    with pytest.raises(QuotaExhausted) as e:  # 3 reserved + 3 > 5
        store.reserve(dev, "b", units=3)
    assert (e.value.reserved, e.value.units) == (3, 3) and "needs 3 units" in str(e.value)
    r2 = store.reserve(dev, "c", units=2)
    assert store.quota("u").remaining == 0
    store.commit(r1)
    store.release(r2)
    snap = store.quota("u")
    assert (snap.used, snap.reserved, snap.remaining) == (3, 0, 2)
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match="units="):
            store.reserve(dev, "d", units=bad)
    store.close()


def test_old_sqlite_store_is_migrated_to_units(tmp_path):
    """A store created before units (no column, a trigger that adds 1) counts units after opening."""
    path = tmp_path / "old.db"
    open_store(f"sqlite:///{path}").close()
    conn = sqlite3.connect(path)
    conn.executescript(
        """DROP TRIGGER rt2i_count_commit_units;
        ALTER TABLE rt2i_charges DROP COLUMN units;
        CREATE TRIGGER rt2i_count_commit AFTER UPDATE OF state ON rt2i_charges
            WHEN NEW.state = 'committed' AND OLD.state = 'reserved'
            BEGIN
                INSERT INTO rt2i_usage (device_id, period_start, used) VALUES (NEW.device_id, NEW.period_start, 1)
                ON CONFLICT (device_id, period_start) DO UPDATE SET used = used + 1;
            END;"""
    )
    conn.close()
    store = open_store(f"sqlite:///{path}")
    store.add_device("m", quota=10, period="total")
    store.commit(store.reserve(store.get_device("m"), "a", units=4))
    assert store.quota("m").used == 4
    triggers = {r[0] for r in store._read("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    assert triggers == {"rt2i_count_commit_units"}
    store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    quota=st.integers(0, 8),
    ops=st.lists(
        st.tuples(st.sampled_from(["reserve", "commit", "release"]), st.integers(1, 4)), max_size=25
    ),
)
def test_unit_ledger_matches_a_model(tmp_path_factory, quota, ops):
    """Random reserve/commit/release with random costs against a model: a reservation lands iff its units
    fit in what is left; used and reserved always match; never more than the quota."""
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('units') / 'q.db'}")
    store.add_device("f", quota=quota, period="total")
    dev = store.get_device("f")
    held: list = []
    used = reserved = 0
    for i, (op, units) in enumerate(ops):
        if op == "reserve":
            fits = used + reserved + units <= quota
            try:
                held.append(store.reserve(dev, f"r{i}", units=units))
                assert fits
                reserved += units
            except QuotaExhausted:
                assert not fits
        elif held:
            res = held.pop(0)
            (store.commit if op == "commit" else store.release)(res)
            reserved -= res.units
            used += res.units if op == "commit" else 0
        snap = store.quota("f")
        assert (snap.used, snap.reserved, snap.remaining) == (used, reserved, quota - used - reserved)
    store.close()


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from routet2i.cloud_server.cli import main

    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--pipeline", "a=noop", "--cost", "b=2"], "--cost b: no such model is served; served: a"),
        (["--pipeline", "a=noop", "--pipeline", "b=noop", "--cost", "c=2"], "served: a, b"),
        (["--pipeline", "noop", "--cost", "sd3=2"], "--cost sd3: no such model is served; served: noop"),
        (["--pipeline", "a=noop", "--cost", "a=0"], "UNITS must be a whole number from 1"),
        (["--pipeline", "a=noop", "--cost", "a=1.5"], "is not a whole number"),
        (["--pipeline", "a=noop", "--cost", "a"], "expected NAME=UNITS"),
        (["--pipeline", "a=noop", "--cost", "a=2", "--cost", "a=3"], "--cost a: given twice"),
        (["--pipeline", "a=noop", "--pipeline", "a=noop"], "two pipelines are served as 'a'"),
        (["--pipeline", "noop", "--pipeline", "noop"], "two pipelines are served as 'noop'"),
        (["--pipeline", "a b=noop"], "model name 'a b' is not allowed"),
        (["--pipeline", "a="], "give NAME=P"),
        (["--pipeline", "a=noop", "--pipeline", "b=/no/such/sd3"], "no such folder"),
    ],
)
def test_serve_model_arguments_are_one_line_exit_2(capsys, sqlite_url, extra, needle):
    open_store(sqlite_url).close()
    code, _, err = _cli(capsys, "serve", "--listen", "127.0.0.1:0", "--db", sqlite_url, *extra)
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_serve_two_models_from_the_command_line(sqlite_url):
    """`routet2i-cloud serve --pipeline small=noop --pipeline big=noop --cost big=3` end to end."""
    from _cloud_helpers import ServeProcess

    with open_store(sqlite_url) as store:
        token = store.add_device("cli", quota=4, period="total")
    server = ServeProcess(sqlite_url, "--pipeline", "small=noop", "--pipeline", "big=noop", "--cost", "big=3")
    channel, stub = stub_for(server.address)
    try:
        q = stub.GetQuota(cloud_pb2.GetQuotaRequest(), metadata=auth(token), timeout=10)
        assert [(m.name, m.cost) for m in q.models] == [("small", 1), ("big", 3)]
        assert q.default_model == "small"
        r = _gen(stub, token, request_id="a", model="big", num_inference_steps=1)
        assert (r.model, r.units_charged, r.quota.used) == ("big", 3, 3)
        err = _refused(stub, token, request_id="b", model="big", num_inference_steps=1)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        r = _gen(stub, token, request_id="c", num_inference_steps=1)
        assert (r.model, r.units_charged, r.quota.used) == ("small", 1, 4)
    finally:
        channel.close()
        assert server.terminate() == 0


def test_sdk_cloud_client_picks_a_model_and_sees_costs(sqlite_url):
    """`routet2i.cloud_client.CloudClient`: get_quota() lists the served models and costs; generate(model=)
    charges that model's units; a QuotaExhausted says units; an unknown model is refused."""
    from routet2i.cloud_client import CloudClient, CloudQuota, CloudRejected, CloudRequest
    from routet2i.cloud_client import QuotaExhausted as SdkQuotaExhausted
    from routet2i.policy import QuotaInfo

    store = open_store(sqlite_url)
    token = store.add_device("sdk", quota=4, period="total")
    pipes = {"small": NoOpPipeline(), "big": NoOpPipeline()}
    with BackgroundServer(store, pipes, config=CFG, costs={"big": 3}) as srv:
        with CloudClient(srv.address, token, retries=0, deadline_s=10) as client:
            q = client.get_quota()
            assert isinstance(q, CloudQuota) and isinstance(q, QuotaInfo)
            assert (q.models, q.default_model, q.remaining) == ({"small": 1, "big": 3}, "small", 4)
            assert (q.cost(), q.cost("big")) == (1, 3)
            with pytest.raises(KeyError, match="served: small, big"):
                q.cost("huge")
            req = CloudRequest(request_id="s1", prompt="a red fox in the snow")
            call = client.generate(req, model="big")
            assert (call.model, call.units_charged, call.quota.used) == ("big", 3, 3)
            assert req.model is None  # the caller's request is not changed
            call = client.generate(
                CloudRequest(request_id="s2", prompt="p", model="small")
            )  # the field works too
            assert (call.model, call.quota.used) == ("small", 4)
            with pytest.raises(SdkQuotaExhausted, match="costs 3 units") as e:
                client.generate(CloudRequest(request_id="s3", prompt="p"), model="big")
            assert e.value.quota is not None and e.value.quota.remaining == 0
            with pytest.raises(CloudRejected, match="served models: small, big"):
                client.generate(CloudRequest(request_id="s4", prompt="p"), model="huge")
    store.close()


def test_queue_depth_gauge_counts_every_models_queue(sqlite_url):
    from prometheus_client import generate_latest

    store = open_store(sqlite_url)
    token = store.add_device("g", quota=100, period="total")
    slow = {"a": NoOpPipeline(step_delay_s=0.2), "b": NoOpPipeline(step_delay_s=0.2)}
    cfg = ServerConfig(default_steps=2, batch_window_s=0.0, max_batch=1)
    with BackgroundServer(store, slow, config=cfg) as srv:
        channel, stub = stub_for(srv.address)
        futures = [
            stub.Generate.future(request(f"p{i}", model=m), metadata=auth(token), timeout=30)
            for i, m in enumerate("aabb")
        ]
        deadline = time.monotonic() + 10
        while sum(b.depth for b in srv.core.batchers.values()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        text = generate_latest(srv.core.metrics.registry).decode()
        assert "routet2i_cloud_queue_depth 2.0" in text, text
        assert [f.result().model for f in futures] == ["a", "a", "b", "b"]
        channel.close()
    store.close()


def test_stream_goes_to_the_named_model(two_models):
    stub, token, store, small, big = two_models
    events = list(stub.GenerateStream(request(request_id="s", model="big"), metadata=auth(token), timeout=10))
    result = events[-1].result
    assert (result.model, result.units_charged, result.quota.used) == ("big", 3, 3)
    assert (len(small.calls), len(big.calls)) == (0, 1)
