"""The gRPC endpoint in-process on port 0 with the no-op pipeline: RPCs, auth, bounds, quota, batching,
load shedding, deadlines, cancellation, shutdown, health, reflection, metrics, TLS."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import threading
import time
import urllib.request

import grpc
import pytest
from _cloud_helpers import auth, request, stub_for
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from PIL import Image
from routet2i.cloud.v1 import cloud_pb2
from routet2i.cloud_server import (
    BackgroundServer,
    NoOpPipeline,
    ServerConfig,
    TlsConfig,
    create_server,
    open_store,
)
from routet2i.cloud_server.servicer import SERVICE_NAME

FAST = ServerConfig(default_steps=3, batch_window_s=0.01)


@pytest.fixture
def serve(sqlite_url):
    """serve(pipeline, config, quota=...) -> (server, stub, token, store); all stopped at the end."""
    started = []

    def make(pipeline=None, config=FAST, quota=100, period="total", **kw):
        store = open_store(sqlite_url)
        token = store.add_device(f"dev-{len(started)}", quota=quota, period=period)
        srv = BackgroundServer(store, pipeline or NoOpPipeline(), config=config, **kw)
        channel, stub = stub_for(srv.address)
        started.append((srv, store, channel))
        return srv, stub, token, store

    yield make
    for srv, store, channel in started:
        channel.close()
        srv.stop(0.5)
        store.close()


def _busy(srv, timeout=10.0):
    """Wait until the pipeline is running a batch."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if srv.core.batcher.running:
            return
        time.sleep(0.005)
    raise AssertionError("the pipeline never started")


def test_generate_returns_png_seed_and_quota(serve):
    srv, stub, token, store = serve(quota=5)
    r = stub.Generate(request(request_id="a", seed=7, width=48, height=32), metadata=auth(token), timeout=10)
    img = Image.open(io.BytesIO(r.image_png))
    assert img.size == (48, 32) and (r.width, r.height) == (48, 32)
    assert r.seed == 7 and r.model == "noop" and r.generate_seconds >= 0 and r.queue_seconds >= 0
    assert (r.quota.device_id, r.quota.limit, r.quota.used, r.quota.remaining, r.quota.period) == (
        "dev-0",
        5,
        1,
        4,
        "total",
    )
    r2 = stub.Generate(request(request_id="b"), metadata=auth(token), timeout=10)
    assert Image.open(io.BytesIO(r2.image_png)).size == (64, 64)  # the model's native size by default
    assert r2.quota.used == 2
    q = stub.GetQuota(cloud_pb2.GetQuotaRequest(), metadata=auth(token), timeout=5)
    assert (q.used, q.remaining, q.period_end_unix) == (2, 3, 0)


def test_stream_sends_each_step_then_the_result(serve):
    srv, stub, token, store = serve()
    events = list(stub.GenerateStream(request(num_inference_steps=5), metadata=auth(token), timeout=10))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["progress"] * 5 + ["result"]
    assert [(e.progress.step, e.progress.total_steps) for e in events[:5]] == [(i, 5) for i in range(1, 6)]
    assert events[-1].result.quota.used == 1 and events[-1].result.image_png.startswith(b"\x89PNG")


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer "),), (("authorization", "Basic abc"),),
                                      (("authorization", "Bearer rt2i_0011223344556677_nope"),)])  # fmt: skip
def test_missing_or_unknown_token_is_unauthenticated_on_every_rpc(serve, metadata):
    srv, stub, token, store = serve()
    calls = [lambda: stub.Generate(request(), metadata=metadata, timeout=5),
             lambda: list(stub.GenerateStream(request(), metadata=metadata, timeout=5)),
             lambda: stub.GetQuota(cloud_pb2.GetQuotaRequest(), metadata=metadata, timeout=5)]  # fmt: skip
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert store.quota("dev-0").used == 0


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"negative_prompt": "x" * 2001}, "negative_prompt"),
        ({"width": 60}, "width"),
        ({"height": 4}, "height"),
        ({"width": 4096}, "width"),
        ({"num_inference_steps": 101}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": float("inf")}, "guidance_scale"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": 31.0}, "guidance_scale"),
        ({"request_id": "r" * 129}, "request_id"),
        ({"request_id": "a\nb"}, "request_id"),
    ],
)
def test_bad_fields_are_invalid_argument_naming_the_field(serve, fields, field):
    srv, stub, token, store = serve()
    req = (
        request(**{k: v for k, v in fields.items() if k != "prompt"})
        if "prompt" not in fields
        else request(**fields)
    )
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(req, metadata=auth(token), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}:")
    assert store.quota("dev-0").used == 0


def test_quota_exhausted_carries_quota_failure_for_the_device(serve):
    srv, stub, token, store = serve(quota=2, period="day")
    for i in range(2):
        stub.Generate(request(request_id=f"r{i}"), metadata=auth(token), timeout=5)
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(request(request_id="r2"), metadata=auth(token), timeout=5)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(e.value)
    failure = error_details_pb2.QuotaFailure()
    assert status.details[0].Unpack(failure)
    assert failure.violations[0].subject == "dev-0"
    assert store.quota("dev-0").used == 2


def test_retried_request_id_is_charged_once_and_gives_the_same_image(serve):
    srv, stub, token, store = serve(quota=3)
    first = stub.Generate(
        request(request_id="retry-me"), metadata=auth(token), timeout=5
    )  # server picks the seed
    again = stub.Generate(request(request_id="retry-me"), metadata=auth(token), timeout=5)
    assert again.seed == first.seed and again.image_png == first.image_png
    assert first.quota.used == 1 and again.quota.used == 1


def test_concurrent_retry_of_a_running_request_is_aborted(serve):
    srv, stub, token, store = serve(NoOpPipeline(step_delay_s=0.1), quota=3)
    fut = stub.Generate.future(
        request(request_id="dup", num_inference_steps=5), metadata=auth(token), timeout=10
    )
    _busy(srv)
    with pytest.raises(grpc.RpcError) as e:  # the exact same request: in progress, retry later
        stub.Generate(request(request_id="dup", num_inference_steps=5), metadata=auth(token), timeout=5)
    assert e.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.RpcError) as e:  # the same id for other parameters: refused for good
        stub.Generate(request(request_id="dup"), metadata=auth(token), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id reused with different parameters" in e.value.details()
    assert fut.result().quota.used == 1
    assert srv.core.pipeline.calls == [1]


def test_full_queue_sheds_at_once_and_charges_nothing(serve):
    pipe = NoOpPipeline(step_delay_s=0.1)
    cfg = ServerConfig(default_steps=5, max_batch=1, max_queue=2, batch_window_s=0.0)
    srv, stub, token, store = serve(pipe, cfg, quota=50)
    running = stub.Generate.future(request(request_id="run"), metadata=auth(token), timeout=30)
    _busy(srv)
    queued = [
        stub.Generate.future(request(request_id=f"q{i}"), metadata=auth(token), timeout=30) for i in range(2)
    ]
    while srv.core.batcher.depth < 2:
        time.sleep(0.005)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(request(request_id="shed"), metadata=auth(token), timeout=30)
    assert time.monotonic() - t0 < 0.4  # refused at once, not after the queue drained (~1.5 s)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "queue is full" in e.value.details()
    assert running.result().quota and all(f.result() for f in queued)
    assert store.quota("dev-0").used == 3


def test_deadline_passed_before_start_is_neither_generated_nor_charged(serve):
    pipe = NoOpPipeline(step_delay_s=0.1)
    srv, stub, token, store = serve(pipe, ServerConfig(default_steps=5, max_batch=1, batch_window_s=0.0))
    running = stub.Generate.future(request(request_id="run"), metadata=auth(token), timeout=30)
    _busy(srv)
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(request(request_id="late"), metadata=auth(token), timeout=0.2)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    running.result()
    time.sleep(0.3)
    assert pipe.calls == [1]  # only the first request was ever generated
    snap = store.quota("dev-0")
    assert (snap.used, snap.reserved) == (1, 0)


def test_cancelled_request_is_neither_generated_nor_charged(serve):
    pipe = NoOpPipeline(step_delay_s=0.1)
    srv, stub, token, store = serve(pipe, ServerConfig(default_steps=5, max_batch=1, batch_window_s=0.0))
    running = stub.Generate.future(request(request_id="run"), metadata=auth(token), timeout=30)
    _busy(srv)
    doomed = stub.Generate.future(request(request_id="doomed"), metadata=auth(token), timeout=30)
    while srv.core.batcher.depth < 1:
        time.sleep(0.005)
    doomed.cancel()
    running.result()
    time.sleep(0.3)
    assert pipe.calls == [1]
    snap = store.quota("dev-0")
    assert (snap.used, snap.reserved) == (1, 0)


def test_compatible_requests_share_one_call_and_keep_their_seeds(serve):
    pipe = NoOpPipeline(step_delay_s=0.1)
    cfg = ServerConfig(default_steps=3, max_batch=4, batch_window_s=0.05)
    srv, stub, token, store = serve(pipe, cfg)
    blocker = stub.Generate.future(request(request_id="block", width=32), metadata=auth(token), timeout=30)
    _busy(srv)
    small = [stub.Generate.future(request(f"p{i}", request_id=f"s{i}", seed=100 + i), metadata=auth(token), timeout=30)
             for i in range(5)]  # fmt: skip
    big = [stub.Generate.future(request(f"b{i}", request_id=f"b{i}", width=128, seed=i), metadata=auth(token), timeout=30)
           for i in range(2)]  # fmt: skip
    while srv.core.batcher.depth < 7:
        time.sleep(0.005)
    results = [f.result() for f in small + big]
    blocker.result()
    assert pipe.calls[0] == 1 and sorted(pipe.calls[1:]) == [1, 2, 4]  # 5 small -> 4 + 1; 2 big -> 2
    for i, r in enumerate(results[:5]):
        expected = NoOpPipeline().generate([_params(f"p{i}", 100 + i)], lambda s, n: False)[0]  # alone
        assert r.seed == 100 + i
        assert Image.open(io.BytesIO(r.image_png)).getpixel((0, 0)) == expected.getpixel((0, 0))


def _params(prompt, seed):
    from routet2i.cloud_server.pipelines import GenParams

    return GenParams(prompt, "", 64, 64, 3, 7.0, seed)


def test_pipeline_failure_is_internal_without_details_and_not_charged(serve):
    class Broken(NoOpPipeline):
        def generate(self, items, on_step):
            raise RuntimeError("CUDA out of memory at /secret/path/model.py line 12")

    srv, stub, token, store = serve(Broken())
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(request(), metadata=auth(token), timeout=5)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in e.value.details() and "Traceback" not in e.value.details()
    assert store.quota("dev-0").used == 0
    q = stub.GetQuota(cloud_pb2.GetQuotaRequest(), metadata=auth(token), timeout=5)  # still serving
    assert q.remaining == 100


def test_shutdown_finishes_in_flight_within_grace_then_releases_the_rest(serve, sqlite_url):
    pipe = NoOpPipeline(step_delay_s=0.1)
    srv, stub, token, store = serve(pipe, ServerConfig(default_steps=4, max_batch=1, batch_window_s=0.0))
    quick = stub.Generate.future(request(request_id="quick"), metadata=auth(token), timeout=30)
    _busy(srv)
    srv.stop(grace=3.0)  # quick needs ~0.4 s: it finishes and is charged
    assert quick.result().quota.used == 1
    srv2, stub2, token2, store2 = serve(NoOpPipeline(step_delay_s=0.2),
                                        ServerConfig(default_steps=50, max_batch=1, batch_window_s=0.0))  # fmt: skip
    slow = stub2.Generate.future(request(request_id="slow"), metadata=auth(token2), timeout=30)
    _busy(srv2)
    assert store2.quota("dev-1").reserved == 1
    t0 = time.monotonic()
    srv2.stop(grace=0.2)  # slow needs 10 s: cancelled after the grace period
    assert time.monotonic() - t0 < 5
    with pytest.raises(grpc.RpcError) as e:
        slow.result()
    assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    snap = store2.quota("dev-1")
    assert (snap.used, snap.reserved) == (0, 0)


def test_health_and_reflection(serve):
    srv, stub, token, store = serve()
    channel = grpc.insecure_channel(srv.address)
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    out = list(
        refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    )
    names = {s.name for s in out[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    channel.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_not_serving_until_the_pipeline_is_loaded(sqlite_url):
    store = open_store(sqlite_url)
    token = store.add_device("d", quota=5, period="total")
    release = threading.Event()

    def slow_loader():
        release.wait(20)
        return NoOpPipeline()

    port = _free_port()
    loop = asyncio.new_event_loop()
    box = {}

    def run():
        box["server"], _ = loop.run_until_complete(
            create_server(store, slow_loader, f"127.0.0.1:{port}", config=FAST)
        )
        box["ready"] = True
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    channel, stub = stub_for(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 20
    while True:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1).status
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(request(), metadata=auth(token), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    release.set()
    while "ready" not in box:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING  # fmt: skip
    assert stub.Generate(request(), metadata=auth(token), timeout=5).quota.used == 1
    channel.close()
    asyncio.run_coroutine_threadsafe(box["server"].stop(0.1), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)
    store.close()


def test_prometheus_metrics(serve):
    port = _free_port()
    srv, stub, token, store = serve(quota=1, metrics_port=port)
    stub.Generate(request(), metadata=auth(token), timeout=5)
    with pytest.raises(grpc.RpcError):
        stub.Generate(request(), metadata=auth(token), timeout=5)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'routet2i_cloud_requests_total{code="OK",method="Generate"} 1.0' in text
    assert 'routet2i_cloud_requests_total{code="RESOURCE_EXHAUSTED",method="Generate"} 1.0' in text
    assert "routet2i_cloud_quota_denials_total 1.0" in text
    assert "routet2i_cloud_batch_size_count 1.0" in text
    assert "routet2i_cloud_generation_seconds_count 1.0" in text
    assert "routet2i_cloud_queue_depth 0.0" in text and "routet2i_cloud_ready 1.0" in text


def test_oversized_message_is_invalid_argument_naming_the_limit(serve):
    """A prompt over 1 MB used to get gRPC's own RESOURCE_EXHAUSTED, which the SDK reads as an overloaded
    cloud (and falls back, retries later): it is a bad request, INVALID_ARGUMENT naming the limit."""
    srv, stub, token, store = serve()
    for rpc in ("Generate", "GenerateStream"):
        with pytest.raises(grpc.RpcError) as e:
            req = request("x" * (2 << 20), request_id="big")
            if rpc == "Generate":
                stub.Generate(req, metadata=auth(token), timeout=10)
            else:
                list(stub.GenerateStream(req, metadata=auth(token), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            e.value.details().startswith("request: is ")
            and f"the maximum is {1 << 20} bytes" in e.value.details()
        )
    assert store.quota("dev-0").used == 0
    assert stub.Generate(request(), metadata=auth(token), timeout=5).quota.used == 1


def test_oversized_prompt_reads_as_rejected_not_overloaded_in_the_sdk(serve):
    from routet2i.cloud_client import CloudClient, CloudRejected, CloudRequest

    srv, stub, token, store = serve()
    client = CloudClient(srv.address, token=token, deadline_s=10)
    with pytest.raises(CloudRejected) as e:
        client.generate(CloudRequest(request_id="big-sdk", prompt="x" * (2 << 20)))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == "cloud_error"
    assert e.value.attempts == 1  # not retried as if the cloud were overloaded


def test_tls_and_mutual_tls(serve, certs):
    from routet2i.cloud.v1 import cloud_pb2_grpc

    ca = (certs / "ca.pem").read_bytes()
    srv, _, token, store = serve(tls=TlsConfig(certs / "server.pem", certs / "server.key"))
    secure = grpc.secure_channel(srv.address, grpc.ssl_channel_credentials(root_certificates=ca))
    assert cloud_pb2_grpc.CloudGenerationStub(secure).GetQuota(cloud_pb2.GetQuotaRequest(), metadata=auth(token),
                                                              timeout=5).limit == 100  # fmt: skip
    plain, stub = stub_for(srv.address)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetQuota(cloud_pb2.GetQuotaRequest(), metadata=auth(token), timeout=3)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    srv2, _, token2, _ = serve(tls=TlsConfig(certs / "server.pem", certs / "server.key", certs / "ca.pem"))
    no_cert = grpc.secure_channel(srv2.address, grpc.ssl_channel_credentials(root_certificates=ca))
    with pytest.raises(grpc.RpcError):
        cloud_pb2_grpc.CloudGenerationStub(no_cert).GetQuota(
            cloud_pb2.GetQuotaRequest(), metadata=auth(token2), timeout=3
        )
    creds = grpc.ssl_channel_credentials(
        ca, (certs / "client.key").read_bytes(), (certs / "client.pem").read_bytes()
    )
    mutual = grpc.secure_channel(srv2.address, creds)
    q = cloud_pb2_grpc.CloudGenerationStub(mutual).GetQuota(
        cloud_pb2.GetQuotaRequest(), metadata=auth(token2), timeout=5
    )
    assert q.device_id == "dev-1"
    for ch in (secure, plain, no_cert, mutual):
        ch.close()


def test_logs_have_request_fields_never_the_token_and_prompts_only_at_debug(serve, caplog):
    srv, stub, token, store = serve()
    with caplog.at_level(logging.INFO, logger="routet2i"):
        stub.Generate(request("a secret prompt", request_id="log-1",
                              routing=cloud_pb2.RoutingInfo(predicted_prs=0.25, reason="router")),
                      metadata=auth(token), timeout=5)  # fmt: skip
    text = "\n".join(r.getMessage() for r in caplog.records)
    line = next(r.getMessage() for r in caplog.records if "request_id=log-1" in r.getMessage())
    for field in ("rpc=Generate", "code=OK", "device_id=dev-0", "charged=True", "queue_s=", "gen_s=",
                  "total_s=", "route_reason=router", "route_prs=0.25"):  # fmt: skip
        assert field in line
    assert token not in text and token.split("_", 2)[2] not in text and "secret prompt" not in text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="routet2i"):
        stub.Generate(request("a secret prompt", request_id="log-2"), metadata=auth(token), timeout=5)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "secret prompt" in text and token not in text
