"""The endpoint's request log (issue 11 items 2, 3 and 8): nothing of an unauthenticated request but its
method, peer and status; every field bounded and escaped (no flood, no forged lines); `charged=True` only
when a unit was charged; never a database password."""

from __future__ import annotations

import logging
import re
import time

import grpc
import pytest
from _cloud_helpers import auth, request, stub_for
from routet2i.cloud.v1 import cloud_pb2
from routet2i.cloud_server import BackgroundServer, NoOpPipeline, ServerConfig, open_store
from routet2i.cloud_server.safe_text import FIELD_LIMIT, clip, redact

_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
FORGED = "r1\nFORGED|code:OK|device_id:admin\r\x1b[2J\u2028also-forged"


def _fields(line: str) -> dict[str, str]:
    return {k: v for k, v in _FIELD.findall(line)}


def _rpc_lines(caplog, predicate=lambda f: True) -> list[dict[str, str]]:
    out = []
    for r in caplog.records:
        if r.name == "routet2i.cloud_server.servicer" and r.getMessage().startswith("rpc="):
            f = _fields(r.getMessage())
            if predicate(f):
                out.append(f)
    return out


@pytest.fixture
def served(sqlite_url):
    """served(pipeline=None, config=None) -> (srv, stub, token, store)"""
    made = []

    def make(pipeline=None, config=None, quota=100):
        store = open_store(sqlite_url)
        token = store.add_device(f"dev-{len(made)}", quota=quota, period="total")
        srv = BackgroundServer(
            store, pipeline or NoOpPipeline(), config=config or ServerConfig(default_steps=2)
        )
        channel, stub = stub_for(srv.address)
        made.append((srv, store, channel))
        return srv, stub, token, store

    yield make
    for srv, store, channel in made:
        channel.close()
        srv.stop(0.5)
        store.close()


def test_unauthenticated_requests_log_only_method_peer_and_status(served, caplog):
    """20 no-token requests with a 900 KB routing.router_version grew the log by 18 MB, and a request_id
    with a newline wrote forged log lines."""
    srv, stub, token, store = served()
    huge = "v" * 900_000
    req = request(
        "a secret prompt",
        request_id=FORGED,
        routing=cloud_pb2.RoutingInfo(router_version=huge, reason="router"),
    )
    bad_token = (("authorization", "Bearer rt2i_0011223344556677_nope"),)
    with caplog.at_level(logging.DEBUG, logger="routet2i"):
        for i in range(20):
            md = None if i % 2 else bad_token
            with pytest.raises(grpc.RpcError) as e:
                if i % 4 < 2:
                    stub.Generate(req, metadata=md, timeout=10)
                else:
                    list(stub.GenerateStream(req, metadata=md, timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    messages = [r.getMessage() for r in caplog.records]
    assert sum(len(m) for m in messages) < 20 * 400  # not 18 MB
    assert all("\n" not in m and "\r" not in m and "\u2028" not in m for m in messages)
    text = "\n".join(messages)
    assert "FORGED" not in text and "vvvv" not in text and "secret prompt" not in text
    lines = _rpc_lines(caplog)
    assert len(lines) == 20
    for f in lines:
        assert set(f) == {"rpc", "code", "peer", "total_s", "error"}, f
        assert f["code"] == "UNAUTHENTICATED" and f["peer"].startswith(("ipv4:", "ipv6:"))
    assert store.quota("dev-0").used == 0


def test_authenticated_fields_are_bounded_and_escaped(served, caplog):
    srv, stub, token, store = served()
    huge = "v" * 900_000
    req = request(
        "a prompt", request_id=FORGED, routing=cloud_pb2.RoutingInfo(router_version=huge, reason="x\ny")
    )
    with caplog.at_level(logging.DEBUG, logger="routet2i"):
        with pytest.raises(grpc.RpcError) as e:  # the id itself is refused (not printable), but logged safely
            stub.Generate(req, metadata=auth(token), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = stub.Generate(request("a prompt", request_id="fine", routing=cloud_pb2.RoutingInfo(router_version=huge)),
                           metadata=auth(token), timeout=10)  # fmt: skip
        assert ok.quota.used == 1
    messages = [r.getMessage() for r in caplog.records]
    assert all("\n" not in m and "\r" not in m and "\x1b" not in m and "\u2028" not in m for m in messages)
    assert all(len(m) < 12 * (FIELD_LIMIT + 40) for m in messages)
    refused = _rpc_lines(caplog, lambda f: f.get("code") == "INVALID_ARGUMENT")[0]
    assert refused["device_id"] == "dev-0"
    assert refused["request_id"] == clip(FORGED) and "\\n" in refused["request_id"]
    assert (
        refused["route_router"].startswith('"' + "v" * 100)
        and f"(+{900_000 - FIELD_LIMIT} chars)" in refused["route_router"]
    )
    assert refused["route_reason"] == "x\\ny"
    fine = _rpc_lines(caplog, lambda f: f.get("request_id") == "fine")[0]
    assert fine["code"] == "OK" and fine["charged"] == "True" and "peer" in fine


def test_clip_escapes_every_line_break_and_control_character():
    for ch in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00\x1b\x7f":
        out = clip(f"a{ch}b")
        assert len(out.splitlines()) == 1 and ch not in out and out.startswith("a\\")
    assert clip("back\\slash") == "back\\\\slash"  # an escaped-looking sequence cannot be forged either
    assert clip("x" * 500, 10) == "xxxxxxxxxx...(+490 chars)"


def _line_for(caplog, request_id: str, timeout: float = 10.0) -> dict[str, str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        lines = _rpc_lines(caplog, lambda f: f.get("request_id") == request_id)
        if lines:
            return lines[-1]
        time.sleep(0.01)
    raise AssertionError(f"no log line for {request_id}")


def test_charged_is_true_only_for_a_committed_charge(served, caplog):
    """A cancelled, released request was logged charged=True."""
    pipe = NoOpPipeline(step_delay_s=0.1)
    srv, stub, token, store = served(pipe, ServerConfig(default_steps=4, max_batch=1, batch_window_s=0.0))
    with caplog.at_level(logging.INFO, logger="routet2i"):
        running = stub.Generate.future(request(request_id="run"), metadata=auth(token), timeout=30)
        while not srv.core.batcher.running:
            time.sleep(0.005)
        doomed = stub.Generate.future(request(request_id="doomed"), metadata=auth(token), timeout=30)
        while srv.core.batcher.depth < 1:
            time.sleep(0.005)
        doomed.cancel()
        running.result()
        cancelled = _line_for(caplog, "doomed")
        charged = _line_for(caplog, "run")
        pipe.step_delay_s = 0.0
        stub.Generate(request(request_id="run"), metadata=auth(token), timeout=30)  # an exact retry
        while len(_rpc_lines(caplog, lambda f: f.get("request_id") == "run")) < 2:
            time.sleep(0.01)
        replay = _rpc_lines(caplog, lambda f: f.get("request_id") == "run")[-1]
    assert cancelled["code"] == "CANCELLED" and cancelled["charged"] == "False"
    assert charged["code"] == "OK" and charged["charged"] == "True" and "replay" not in charged
    assert replay["code"] == "OK" and replay["charged"] == "False" and replay["replay"] == "True"
    snap = store.quota("dev-0")
    assert (snap.used, snap.reserved) == (1, 0)


def test_a_failed_generation_is_logged_uncharged(served, caplog):
    class Broken(NoOpPipeline):
        def generate(self, items, on_step):
            raise RuntimeError("boom")

    srv, stub, token, store = served(Broken())
    with caplog.at_level(logging.INFO, logger="routet2i"):
        with pytest.raises(grpc.RpcError):
            stub.Generate(request(request_id="fails"), metadata=auth(token), timeout=10)
        line = _line_for(caplog, "fails")
    assert line["code"] == "INTERNAL" and line["charged"] == "False"


@pytest.mark.parametrize(
    "text, secret",
    [
        ("--db postgresql://user:PASSWORD@db.internal:5432/test: no device 'nope'", "PASSWORD"),
        ("postgres://u:p%40ss@host/db and postgresql://u:p@ss@host/db", "ss@host/db and"),
        ("postgresql://u:p@ss@host/db", "p@ss"),
        ("host=db user=u password=hunter2 dbname=test", "hunter2"),
        ("host=db password='hun ter2' dbname=test", "hun ter2"),
        ("postgresql://db/test?user=u&password=hunter2&sslmode=require", "hunter2"),
    ],
)
def test_redact_hides_database_passwords(text, secret):
    out = redact(text)
    assert secret not in out and "***" in out
    assert "user" in out or "u:" in out or "host=db" in out
