"""The ONE error table: every row maps its domain error to its status code through a real gRPC call, and
every domain error an RPC can raise has a row."""

from __future__ import annotations

import grpc
import pytest
from _cloud_helpers import auth, request, stub_for
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from routet2i.cloud.v1 import cloud_pb2
from routet2i.cloud_server import BackgroundServer, NoOpPipeline, open_store
from routet2i.cloud_server import errors as errors_mod
from routet2i.cloud_server.servicer import STATUS_CODES

ADMIN_ONLY = {
    errors_mod.DeviceExists,
    errors_mod.UnknownDevice,
}  # CLI/store API errors, never raised by an RPC


def _example(cls: type[Exception]) -> Exception:
    if cls is errors_mod.InvalidArgument:
        return cls("width", "is 7; use a multiple of 8")
    if cls is errors_mod.QuotaExhausted:
        return cls("dev-x", 3, 3, "day")
    return cls(f"example {cls.__name__}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('table') / 'q.db'}")
    token = store.add_device("dev-x", quota=3, period="day")
    srv = BackgroundServer(store, NoOpPipeline())
    channel, stub = stub_for(srv.address)
    yield srv, stub, token
    channel.close()
    srv.stop(0.2)
    store.close()


def test_every_rpc_domain_error_has_a_row():
    domain = {
        c for c in vars(errors_mod).values() if isinstance(c, type) and issubclass(c, errors_mod.CloudError)
    }
    domain -= {errors_mod.CloudError} | ADMIN_ONLY
    assert domain == set(STATUS_CODES)


@pytest.mark.parametrize("cls", list(STATUS_CODES), ids=lambda c: c.__name__)
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream", "GetQuota"])
def test_row(server, monkeypatch, cls, rpc):
    srv, stub, token = server
    exc = _example(cls)

    async def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(srv.core, "generate", boom)
    monkeypatch.setattr(srv.core, "quota", boom)
    with pytest.raises(grpc.RpcError) as e:
        if rpc == "Generate":
            stub.Generate(request(), metadata=auth(token), timeout=5)
        elif rpc == "GenerateStream":
            list(stub.GenerateStream(request(), metadata=auth(token), timeout=5))
        else:
            stub.GetQuota(cloud_pb2.GetQuotaRequest(), metadata=auth(token), timeout=5)
    assert e.value.code() == STATUS_CODES[cls]
    assert e.value.details() == str(exc)
    status = rpc_status.from_call(e.value)
    if cls is errors_mod.QuotaExhausted:
        failure = error_details_pb2.QuotaFailure()
        assert status.details[0].Unpack(failure) and failure.violations[0].subject == "dev-x"
    else:
        assert status is None or not status.details


def test_anything_else_is_internal_with_a_reference_only(server, monkeypatch):
    srv, stub, token = server

    async def boom(*args, **kwargs):
        raise KeyError("/srv/models/secret.safetensors")

    monkeypatch.setattr(srv.core, "generate", boom)
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(request(), metadata=auth(token), timeout=5)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert e.value.details().startswith("internal error (reference ") and "secret" not in e.value.details()
