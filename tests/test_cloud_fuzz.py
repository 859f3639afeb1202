"""Bad input, property-based: random field values and random raw bytes always get a status, promptly, and
the server stays healthy. Replays, property-based: random sequences of requests that reuse a few
request_ids with the same or other parameters (also two at once, also after set-quota) are checked against
a model of the ledger: one charge per id, other parameters refused without generating, exact retries
answered with the same image for free, never more than the quota."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from _cloud_helpers import auth, stub_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from routet2i.cloud.v1 import cloud_pb2
from routet2i.cloud_server import BackgroundServer, NoOpPipeline, ServerConfig, open_store
from routet2i.cloud_server.servicer import SERVICE_NAME

FIELD_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED}
BYTES_CODES = FIELD_CODES  # undecodable bytes: INVALID_ARGUMENT naming "request"
METHODS = ("Generate", "GenerateStream", "GetQuota")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'q.db'}")
    token = store.add_device("fuzz", quota=10**9, period="total")
    srv = BackgroundServer(
        store, NoOpPipeline(), config=ServerConfig(default_steps=2, max_size=256, batch_window_s=0.0)
    )
    channel, stub = stub_for(srv.address)
    yield srv, channel, stub, token
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING  # fmt: skip
    assert stub.GetQuota(cloud_pb2.GetQuotaRequest(), metadata=auth(token), timeout=5).device_id == "fuzz"
    channel.close()
    srv.stop(0.2)
    store.close()


u32 = st.integers(0, 2**32 - 1)
small = st.one_of(st.integers(0, 300), u32)
requests = st.builds(
    cloud_pb2.GenerateRequest,
    request_id=st.text(max_size=140),
    prompt=st.one_of(st.text(max_size=50), st.text(max_size=2100)),
    negative_prompt=st.text(max_size=60),
    width=small,
    height=small,
    num_inference_steps=st.one_of(st.integers(0, 120), u32),
    guidance_scale=st.one_of(st.none(), st.floats(width=32)),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    model=st.one_of(st.just(""), st.just("noop"), st.text(max_size=120)),  # unknown: INVALID_ARGUMENT
    routing=st.builds(cloud_pb2.RoutingInfo, predicted_prs=st.floats(width=32), alpha=st.floats(width=32),
                      router_version=st.text(max_size=20), reason=st.text(max_size=20)),
)  # fmt: skip


def _code(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert "Traceback" not in (e.details() or "")
        return e.code()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=requests, with_token=st.booleans(), method=st.sampled_from(METHODS[:2]))
def test_random_field_values_get_a_status(server, req, with_token, method):
    srv, channel, stub, token = server
    md = auth(token) if with_token else None
    if method == "Generate":
        code = _code(lambda: stub.Generate(req, metadata=md, timeout=10))
    else:
        code = _code(lambda: list(stub.GenerateStream(req, metadata=md, timeout=10)))
    assert code in FIELD_CODES
    if not with_token:
        assert code == grpc.StatusCode.UNAUTHENTICATED


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=600), method=st.sampled_from(METHODS))
def test_random_bytes_get_a_status(server, payload, method):
    srv, channel, stub, token = server
    path = f"/{SERVICE_NAME}/{method}"
    if method == "GenerateStream":
        call = channel.unary_stream(path)
        code = _code(lambda: list(call(payload, metadata=auth(token), timeout=10)))
    else:
        call = channel.unary_unary(path)
        code = _code(lambda: call(payload, metadata=auth(token), timeout=10))
    assert code in BYTES_CODES
    if method == "GetQuota":
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)


def test_undecodable_request_is_invalid_argument(server):
    srv, channel, stub, token = server
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary(f"/{SERVICE_NAME}/Generate")(b"\x00", metadata=auth(token), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "request: is not a valid GenerateRequest protobuf message"


# --- replays -------------------------------------------------------------------------------------------------

REPLAY_STEPS = 2  # the server default for num_inference_steps=0


@pytest.fixture(scope="module")
def replay_server(tmp_path_factory):
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('replay') / 'q.db'}")
    pipe = NoOpPipeline()
    srv = BackgroundServer(store, pipe, config=ServerConfig(default_steps=REPLAY_STEPS, batch_window_s=0.0))
    channel, stub = stub_for(srv.address)
    yield srv, stub, store, pipe
    channel.close()
    srv.stop(0.2)
    store.close()


_devices = itertools.count()
gen_op = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["a", "b", "c"]),
        "prompt": st.sampled_from(["a cat", "a dog"]),
        "negative_prompt": st.sampled_from(["", "blurry"]),
        "width": st.sampled_from([0, 64, 128]),
        "steps": st.sampled_from([0, REPLAY_STEPS, 3]),
        "guidance": st.sampled_from([None, 7.0, 2.5]),  # 7.0 is the server default
        "seed": st.sampled_from([None, 1, 2]),
        "stream": st.booleans(),
        "twice": st.booleans(),  # the same request twice at once
    }
)
replay_ops = st.lists(
    st.one_of(gen_op, st.integers(0, 3).map(lambda q: {"quota": q})), min_size=1, max_size=12
)


def _effective(op: dict) -> tuple:
    return (op["prompt"], op["negative_prompt"], op["width"] or 64, op["steps"] or REPLAY_STEPS,
            7.0 if op["guidance"] is None else op["guidance"])  # fmt: skip


def _call(stub, token, op: dict):
    req = cloud_pb2.GenerateRequest(
        request_id=op["id"], prompt=op["prompt"], negative_prompt=op["negative_prompt"], width=op["width"],
        height=64, num_inference_steps=op["steps"], guidance_scale=op["guidance"], seed=op["seed"],
    )  # fmt: skip
    try:
        if op["stream"]:
            return grpc.StatusCode.OK, list(stub.GenerateStream(req, metadata=auth(token), timeout=20))[
                -1
            ].result
        return grpc.StatusCode.OK, stub.Generate(req, metadata=auth(token), timeout=20)
    except grpc.RpcError as e:
        assert "Traceback" not in (e.details() or "")
        return e.code(), e.details()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(quota=st.integers(0, 3), ops=replay_ops)
def test_replays_match_a_model_of_the_ledger(replay_server, quota, ops):
    srv, stub, store, pipe = replay_server
    device = f"replay-{next(_devices)}"
    token = store.add_device(device, quota=quota, period="total")
    charged: dict[str, tuple] = {}  # id -> (effective params, seed, png)
    used = 0
    with ThreadPoolExecutor(2) as pool:
        for op in ops:
            if "quota" in op:
                quota = op["quota"]
                store.set_quota(device, quota=quota)
                continue
            calls = len(pipe.calls)
            n = 2 if op["twice"] else 1
            outcomes = list(pool.map(_call, [stub] * n, [token] * n, [op] * n))
            codes = [c for c, _ in outcomes]
            ok = [r for c, r in outcomes if c == grpc.StatusCode.OK]
            key = _effective(op)
            if op["id"] in charged:
                params, seed, png = charged[op["id"]]
                same = params == key and (op["seed"] is None or op["seed"] == seed)
                if same:  # an exact retry: the same image, free (a twin may be told "in progress")
                    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.ABORTED} and ok, outcomes
                    assert all(r.image_png == png and r.seed == seed and r.quota.used == used for r in ok)
                else:  # other parameters: refused, never generated
                    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * n, outcomes
                    assert all("request_id reused with different parameters" in d for _, d in outcomes)
                    assert len(pipe.calls) == calls
            elif used < quota:  # a new id: charged once, however many copies arrive together
                assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.ABORTED} and ok, outcomes
                used += 1
                first = ok[0]
                assert len({(r.image_png, r.seed) for r in ok}) == 1
                if op["seed"] is not None:
                    assert first.seed == op["seed"]
                charged[op["id"]] = (key, first.seed, first.image_png)
            else:
                assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * n, outcomes
                assert len(pipe.calls) == calls
            snap = store.quota(device)
            assert (snap.used, snap.reserved) == (used, 0)
            assert used <= max(quota, len(charged))
