"""Bad input, property-based: random field values and random raw bytes always get a status, promptly, and
the server stays healthy."""

from __future__ import annotations

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
