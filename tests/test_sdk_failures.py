"""Failures that say why: the cause of a cloud failure in ``result.cloud_error`` and one WARNING line;
a failed GetQuota does not stop a forced cloud call; ``strict`` raises instead of falling back;
`edge-generate --force cloud` with a bad token exits 1 unless --allow-fallback.

A fake CloudGeneration servicer on loopback and a fake edge callable: no models needed (fast)."""

from __future__ import annotations

import logging
import socket
from concurrent import futures

import grpc
import pytest
from PIL import Image
from routet2i import EdgeClient
from routet2i.cloud.v1 import cloud_pb2, cloud_pb2_grpc
from routet2i.cloud_client import CloudRejected, CloudUnavailable
from routet2i.config import load_config


class Cloud(cloud_pb2_grpc.CloudGenerationServicer):
    """``token``: the one token it accepts ("unknown token" otherwise); ``quota_down``: GetQuota fails."""

    def __init__(self, token="good", quota_down=False):
        self.token, self.quota_down = token, quota_down
        self.generate_calls = 0
        self.quota_calls = 0

    def _auth(self, context):
        md = dict(context.invocation_metadata())
        if md.get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")

    def Generate(self, request, context):
        self.generate_calls += 1
        self._auth(context)
        import io

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), "blue").save(buf, format="PNG")
        return cloud_pb2.GenerateResponse(image_png=buf.getvalue(), width=16, height=16, model="fake-sd3",
                                          seed=request.seed)  # fmt: skip

    def GenerateStream(self, request, context):
        yield cloud_pb2.GenerateEvent(result=self.Generate(request, context))

    def GetQuota(self, request, context):
        self.quota_calls += 1
        if self.quota_down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "starting up")
        self._auth(context)
        return cloud_pb2.QuotaStatus(device_id="d", limit=10, used=0, remaining=10, period="day")


def _serve(servicer):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    cloud_pb2_grpc.add_CloudGenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def cloud():
    servicer = Cloud()
    server, address = _serve(servicer)
    yield servicer, address
    server.stop(0)


def fake_edge(prompt, **kwargs):
    return Image.new("RGB", (8, 8), "red")


def _client(address, token, **kw):
    kw.setdefault("deadline_s", 5.0)
    kw.setdefault("backoff_initial_s", 0.01)
    kw.setdefault("backoff_max_s", 0.02)
    return EdgeClient(edge=fake_edge, cloud=address, token=token, state_file="", decision_log="", **kw)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("routet2i")]


def test_bad_token_cause_in_result_and_one_warning(cloud, caplog):
    _, address = cloud
    caplog.set_level(logging.WARNING)
    with _client(address, "wrong") as client:
        r = client.generate("a fox", force="cloud")
    assert (r.route, r.reason) == ("edge", "cloud_error")
    assert "UNAUTHENTICATED: unknown token" in r.cloud_error
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "UNAUTHENTICATED: unknown token" in warnings[0].getMessage()


def test_connection_refused_named(caplog):
    caplog.set_level(logging.WARNING)
    with _client(f"127.0.0.1:{_free_port()}", "t", retries=0, deadline_s=3.0) as client:
        r = client.generate("a fox", force="cloud")
    assert (r.route, r.reason) == ("edge", "cloud_unavailable")
    assert "connection refused" in r.cloud_error.lower()
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "connection refused" in warnings[0].getMessage().lower()


def test_failed_get_quota_at_start_does_not_stop_a_forced_cloud_call():
    servicer = Cloud(token="t", quota_down=True)
    server, address = _serve(servicer)
    try:
        with _client(address, "t", target_cloud_rate=0.3) as client:  # pacing on: asks GetQuota first
            r = client.generate("a fox", force="cloud", seed=3)
        assert servicer.quota_calls >= 1  # the start-up GetQuota did fail
        assert (r.route, r.reason, r.model, r.cloud_error) == ("cloud", "forced", "fake-sd3", None)
        assert servicer.generate_calls == 1
    finally:
        server.stop(0)


def test_strict_argument_raises_the_cause(cloud):
    servicer, address = cloud
    with _client(address, "wrong") as client:
        with pytest.raises(CloudRejected, match="UNAUTHENTICATED: unknown token"):
            client.generate("a fox", force="cloud", strict=True)
        assert client.generate("a fox", force="cloud", strict=False).route == "edge"
        with pytest.raises(ValueError, match="strict="):
            client.generate("a fox", strict="yes")


def test_strict_config_raises_and_breaker_open_is_not_a_silent_edge(tmp_path):
    with _client(f"127.0.0.1:{_free_port()}", "t", retries=0, deadline_s=2.0, strict=True) as client:
        with pytest.raises(CloudUnavailable, match="connection refused"):
            client.generate("a fox", force="cloud")
        # the breaker is now open: strict still raises (no call made) instead of a quiet edge image
        with pytest.raises(CloudUnavailable, match="circuit breaker open"):
            client.generate("a fox", force="cloud")


def test_strict_in_toml(tmp_path):
    cfg = tmp_path / "routet2i.toml"
    cfg.write_text("[policy]\nstrict = true\n")
    assert load_config(cfg).strict is True
    cfg.write_text('[policy]\nstrict = "yes"\n')
    with pytest.raises(ValueError, match="strict"):
        load_config(cfg)


def test_edge_generate_force_cloud_bad_token_exits_1_unless_fallback(cloud, tmp_path, monkeypatch, capsys):
    from routet2i.cli import main

    _, address = cloud
    monkeypatch.setenv("ROUTET2I_TOKEN", "wrong")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    cfg = tmp_path / "routet2i.toml"
    cfg.write_text(f'[cloud]\nendpoint = "{address}"\ndeadline_s = 5\n')
    out = tmp_path / "x.png"
    argv = ["a fox", "--config", str(cfg), "--force", "cloud", "-o", str(out), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "UNAUTHENTICATED: unknown token" in err and "--allow-fallback" in err
    assert len(err.splitlines()) == 1 and not out.exists()
    assert main([*argv, "--strict", "--allow-fallback"]) == 2


def test_text_output_of_a_fallback_names_the_cloud_cause():
    from types import SimpleNamespace

    from routet2i.cli import describe

    r = SimpleNamespace(route="edge", reason="cloud_error", prs=None, alpha=None, paced_rate=None,
                        target_rate=None, timings={"total": 0.5}, quota=None,
                        cloud_error="cloud refused the request: UNAUTHENTICATED: unknown token")  # fmt: skip
    assert "cloud: cloud refused the request: UNAUTHENTICATED: unknown token" in describe(r)
