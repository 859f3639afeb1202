"""Cloud client against a fake CloudGeneration servicer over real gRPC on loopback (port 0)."""

from __future__ import annotations

import io
import math
import threading
import time
from concurrent import futures

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image
from routet2i.cloud.v1 import cloud_pb2, cloud_pb2_grpc
from routet2i.cloud_client import (
    CircuitBreaker,
    CloudClient,
    CloudQuota,
    CloudRejected,
    CloudRequest,
    CloudResult,
    CloudUnavailable,
    QuotaExhausted,
)
from routet2i.config import CloudConfig

TOKEN = "tok-123"


def _png(color=(200, 30, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


class FakeCloud(cloud_pb2_grpc.CloudGenerationServicer):
    """Follows a script of actions, one per Generate call; then "ok". Charges like the contract says."""

    def __init__(self, script=(), quota=10):
        self.script = list(script)
        self.calls: list[str] = []  # request_id of every attempt
        self.metadata: list[dict] = []
        self.charged: set[str] = set()
        self.requests: list[cloud_pb2.GenerateRequest] = []
        self.quota = quota
        self.send_quota = True
        self.lock = threading.Lock()

    def _quota(self):
        used = len(self.charged)
        return cloud_pb2.QuotaStatus(
            device_id="dev-1",
            limit=self.quota,
            used=used,
            remaining=max(0, self.quota - used),
            period="day",
            period_end_unix=int(time.time()) + 3600,
        )

    def _response(self, request):
        resp = cloud_pb2.GenerateResponse(
            image_png=_png(), width=8, height=8, model=request.model or "fake", seed=7, queue_seconds=0.01,
            generate_seconds=0.02, units_charged=1,
        )  # fmt: skip
        if self.send_quota:
            resp.quota.CopyFrom(self._quota())
        return resp

    def _handle(self, request, context):
        with self.lock:
            self.calls.append(request.request_id)
            self.requests.append(request)
            self.metadata.append(dict(context.invocation_metadata()))
            action = self.script.pop(0) if self.script else "ok"
        if action == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "try later")
        if action.startswith("sleep:"):
            time.sleep(float(action.split(":")[1]))
        if action == "invalid":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "width: must be a multiple of 8")
        if action == "overload":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        with self.lock:
            if request.request_id not in self.charged and len(self.charged) >= self.quota:
                action = "quota"
            else:
                self.charged.add(request.request_id)
        if action == "quota":
            qf = error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(subject="dev-1", description="no units left")
                ]
            )
            d1, d2 = any_pb2.Any(), any_pb2.Any()
            d1.Pack(qf)
            d2.Pack(self._quota())
            st = status_pb2.Status(
                code=code_pb2.RESOURCE_EXHAUSTED, message="quota exhausted", details=[d1, d2]
            )
            context.abort_with_status(rpc_status.to_status(st))
        if action == "drop":  # charged, but the response never reaches the client
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        return self._response(request)

    def Generate(self, request, context):
        return self._handle(request, context)

    def GenerateStream(self, request, context):
        for i in range(3):
            yield cloud_pb2.GenerateEvent(progress=cloud_pb2.Progress(step=i + 1, total_steps=3))
        yield cloud_pb2.GenerateEvent(result=self._handle(request, context))

    def GetQuota(self, request, context):
        return self._quota()


@pytest.fixture
def fake():
    servicer = FakeCloud()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    cloud_pb2_grpc.add_CloudGenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def _req(rid="r1"):
    return CloudRequest(request_id=rid, prompt="a fox")


def _client(target, **kw):
    kw.setdefault("backoff_initial_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    return CloudClient(target, TOKEN, **kw)


def test_ok_sends_bearer_token_and_reports_quota(fake):
    servicer, target = fake
    with _client(target) as c:
        call = c.generate(_req())
        assert isinstance(call, CloudResult) and call.attempts == 1
        assert isinstance(call.quota, CloudQuota) and call.quota.remaining == 9
        assert servicer.metadata[0]["authorization"] == f"Bearer {TOKEN}"
        assert call.network_seconds >= 0
        assert c.get_quota().used == 1


def test_request_translated_to_the_wire_and_the_answer_back(fake):
    """The SDK's CloudRequest -> GenerateRequest (routing info, unset fields as the server's defaults), and
    GenerateResponse -> CloudResult (a decoded image, the quota, the server's timings)."""
    servicer, target = fake
    req = CloudRequest(
        request_id="t1", prompt="a fox", negative_prompt="blur", num_inference_steps=12, guidance_scale=6.5,
        width=64, height=48, seed=2**64 - 1, model="big", prs=0.25, alpha=float("inf"),
        router_version="v3", reason="forced",
    )  # fmt: skip
    with _client(target) as c:
        got = c.generate(req)
    pb = servicer.requests[0]
    assert (pb.request_id, pb.prompt, pb.negative_prompt, pb.num_inference_steps) == (
        "t1",
        "a fox",
        "blur",
        12,
    )
    assert (pb.width, pb.height, pb.seed, pb.model) == (64, 48, 2**64 - 1, "big")
    assert math.isclose(pb.guidance_scale, 6.5)
    assert math.isclose(pb.routing.predicted_prs, 0.25) and pb.routing.alpha == 0.0  # inf: not sent
    assert (pb.routing.router_version, pb.routing.reason) == ("v3", "forced")
    assert isinstance(got.image, Image.Image) and got.image.size == (8, 8)
    assert got.image.getpixel((0, 0)) == (200, 30, 10)
    assert (got.request_id, got.seed, got.model, got.units_charged) == ("t1", 7, "big", 1)
    assert (got.queue_seconds, got.generate_seconds) == (0.01, 0.02)
    with _client(target) as c:
        c.generate(CloudRequest(request_id="t2", prompt="x"))
    pb = servicer.requests[1]
    assert not pb.HasField("seed") and not pb.HasField("guidance_scale")  # the server picks
    assert (pb.width, pb.height, pb.num_inference_steps, pb.model, pb.negative_prompt) == (0, 0, 0, "", "")


def test_result_without_quota_and_model_override(fake):
    servicer, target = fake
    servicer.send_quota = False
    req = _req()
    with _client(target) as c:
        got = c.generate(req, model="small")
    assert got.quota is None and got.model == "small"
    assert servicer.requests[0].model == "small" and req.model is None  # the caller's request unchanged


def test_protobuf_request_refused_with_the_type_to_use(fake):
    _, target = fake
    with pytest.raises(TypeError, match="CloudRequest, got GenerateRequest"):
        _client(target).generate(cloud_pb2.GenerateRequest(request_id="r", prompt="x"))


def test_from_config_builds_the_client_of_a_cloud_section(fake, caplog):
    servicer, target = fake
    servicer.script = ["unavailable"] * 10
    cfg = CloudConfig(endpoint=target, token=TOKEN, retries=1, deadline_s=5, breaker_failures=1,
                      breaker_reset_s=60, backoff_initial_s=0.01)  # fmt: skip
    with CloudClient.from_config(cfg) as c:
        assert (c.target, c.retries, c.deadline_s, c.breaker.reset_s) == (target, 1, 5, 60)
        with pytest.raises(CloudUnavailable) as info:
            c.generate(_req())
        assert info.value.attempts == 2 and not c.available
    assert servicer.metadata[0]["authorization"] == f"Bearer {TOKEN}"
    with caplog.at_level("WARNING", logger="routet2i.cloud_client"):
        CloudClient.from_config(CloudConfig(endpoint=target)).close()
    assert "without a device token" in caplog.text and "ROUTET2I_TOKEN" in caplog.text


def test_retries_reuse_request_id_and_dropped_response_not_charged_twice(fake):
    servicer, target = fake
    servicer.script = ["unavailable", "drop"]
    with _client(target, retries=3) as c:
        call = c.generate(_req("same-id"))
    assert call.attempts == 3
    assert servicer.calls == ["same-id"] * 3
    assert servicer.charged == {"same-id"}
    assert call.quota.used == 1


def test_gives_up_after_retries_and_breaker_fails_fast(fake):
    servicer, target = fake
    servicer.script = ["unavailable"] * 10
    c = _client(target, retries=2, breaker=CircuitBreaker(failures=1, reset_s=60))
    with pytest.raises(CloudUnavailable) as info:
        c.generate(_req())
    assert info.value.attempts == 3 and info.value.reason == "cloud_unavailable"
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.calls) == 3
    assert not c.available
    t0 = time.monotonic()
    with pytest.raises(CloudUnavailable, match="circuit breaker open"):
        c.generate(_req("r2"))
    assert time.monotonic() - t0 < 0.05
    assert len(servicer.calls) == 3  # no RPC made


def test_breaker_half_open_trial_closes_on_success():
    now = [0.0]
    b = CircuitBreaker(failures=2, reset_s=10, clock=lambda: now[0])
    b.failure()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open" and not b.allow()
    now[0] = 10.5
    assert b.state == "half-open"
    assert b.allow() and not b.allow()  # one trial only
    b.failure()
    assert b.state == "open"
    now[0] = 21.0
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()


def test_deadline_exceeded_within_budget(fake):
    servicer, target = fake
    servicer.script = ["sleep:2"] * 5
    c = _client(target, deadline_s=0.6, attempt_timeout_s=0.25, retries=5)
    t0 = time.monotonic()
    with pytest.raises(CloudUnavailable) as info:
        c.generate(_req())
    assert time.monotonic() - t0 < 0.6 + 0.3
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.attempts >= 2
    assert set(servicer.calls) == {"r1"}


def test_quota_failure_detail_parsed(fake):
    servicer, target = fake
    servicer.quota = 0
    c = _client(target)
    with pytest.raises(QuotaExhausted) as info:
        c.generate(_req())
    err = info.value
    assert err.reason == "quota_exhausted" and "dev-1" in str(err)
    assert err.quota is not None and err.quota.remaining == 0 and err.quota.period == "day"
    assert c.available  # the cloud answered: not a breaker failure
    assert len(servicer.calls) == 1  # never retried


def test_non_retryable_errors(fake):
    servicer, target = fake
    servicer.script = ["invalid", "overload"]
    c = _client(target)
    with pytest.raises(CloudRejected, match="INVALID_ARGUMENT") as info:
        c.generate(_req())
    assert info.value.reason == "cloud_error"
    with pytest.raises(CloudUnavailable, match="overloaded"):
        c.generate(_req("r2"))
    assert servicer.calls == ["r1", "r2"] and c.available


def test_stream_progress(fake):
    servicer, target = fake
    seen = []
    c = _client(target)
    call = c.generate(_req(), on_progress=lambda s, t: seen.append((s, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert call.model == "fake"


def test_dead_server_fails_within_deadline():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")  # bound, then closed: nothing listens there
    server.start()
    server.stop(0).wait()
    c = _client(f"127.0.0.1:{port}", deadline_s=1.0, retries=3)
    t0 = time.monotonic()
    with pytest.raises(CloudUnavailable):
        c.generate(_req())
    assert time.monotonic() - t0 < 1.0 + 0.5


def test_empty_request_id_rejected(fake):
    _, target = fake
    with pytest.raises(ValueError, match="request_id"):
        _client(target).generate(CloudRequest(request_id="", prompt="x"))


def test_tls_and_mutual_tls(certs):
    servicer = FakeCloud()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    cloud_pb2_grpc.add_CloudGenerationServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        ca = str(certs / "ca.pem")
        mutual = _client(target, tls=True, ca_cert=ca, client_cert=str(certs / "client.pem"),
                         client_key=str(certs / "client.key"))  # fmt: skip
        assert mutual.generate(_req()).model == "fake"
        assert servicer.metadata[0]["authorization"] == f"Bearer {TOKEN}"
        for bad in (
            _client(target, tls=True, ca_cert=ca, retries=0, deadline_s=2),
            _client(target, retries=0),
        ):
            with pytest.raises(CloudUnavailable):  # no client certificate / plaintext: handshake fails
                bad.generate(_req("r2"))
        assert servicer.calls == ["r1"]
    finally:
        server.stop(0)
