"""The gRPC face of the endpoint: a thin servicer over `CloudCore`, the status table, `create_server`.

`STATUS_CODES` is the ONE place where domain errors become gRPC status codes. Quota denials carry a
`google.rpc.QuotaFailure` detail (subject = device id, description in units) and, when it could be read, the
device's `QuotaStatus` (with the served models and their costs) in the rich status (`grpc-status-details-bin`).
Any other exception is logged here with its traceback and reaches the client as INTERNAL with a short
reference id only.

Logging: one logfmt line per RPC. An unauthenticated call logs only its method, peer, status and time;
request fields (request_id, routing info) are added only once the token is known. Every field value is
bounded (`safe_text.FIELD_LIMIT` characters) and escaped to one printable line.

Message size: requests up to `max_receive_message_bytes` are read; a larger one (up to a transport ceiling
of `max(16 MiB, 4 x the limit)`) is answered INVALID_ARGUMENT naming the limit without being parsed, so
the client does not mistake it for an overloaded server (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from routet2i.cloud.v1 import cloud_pb2, cloud_pb2_grpc
from routet2i.cloud_server.core import CloudCore, GenerateInput, GenerateResult, ServerConfig
from routet2i.cloud_server.errors import (
    DeadlineExceeded,
    GenerationFailed,
    InvalidArgument,
    NotReady,
    Overloaded,
    QuotaExhausted,
    RequestIdReused,
    RequestInProgress,
    ReservationLost,
    StoreUnavailable,
    Unauthenticated,
)
from routet2i.cloud_server.metrics import Metrics
from routet2i.cloud_server.pipelines import Pipeline, load_pipeline
from routet2i.cloud_server.safe_text import clip
from routet2i.cloud_server.store import QuotaSnapshot, QuotaStore, open_store

logger = logging.getLogger(__name__)

SERVICE_NAME = "routet2i.cloud.v1.CloudGeneration"

# The one table: domain error -> gRPC status code (tests/test_cloud_status_table.py has a test per row).
STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    RequestIdReused: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    QuotaExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Overloaded: grpc.StatusCode.UNAVAILABLE,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    RequestInProgress: grpc.StatusCode.ABORTED,
    ReservationLost: grpc.StatusCode.ABORTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    GenerationFailed: grpc.StatusCode.INTERNAL,
}


def status_for(exc: BaseException, core: CloudCore | None = None) -> grpc.Status:
    """The status a client sees for `exc` (rich status with QuotaFailure, and QuotaStatus when known, for
    quota denials; `core` names the served models in that QuotaStatus)."""
    code = next((c for cls, c in STATUS_CODES.items() if isinstance(exc, cls)), None)
    if isinstance(exc, StoreUnavailable):
        logger.error("quota store fault: %s", clip(exc.detail, 500))
    if code is None:
        ref = uuid.uuid4().hex[:12]
        logger.error("unexpected error ref=%s", ref, exc_info=exc)
        code, message = grpc.StatusCode.INTERNAL, f"internal error (reference {ref})"
    else:
        message = str(exc)
    details = []
    if isinstance(exc, QuotaExhausted):
        violation = error_details_pb2.QuotaFailure.Violation(subject=exc.device_id, description=message)
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.QuotaFailure(violations=[violation]))
        details.append(packed)
        if isinstance(exc.quota, QuotaSnapshot):
            packed = any_pb2.Any()
            packed.Pack(quota_pb(exc.quota, core))
            details.append(packed)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=details))


def _token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _input(request: cloud_pb2.GenerateRequest) -> GenerateInput:
    r = request.routing
    routing = ({"reason": r.reason, "prs": round(r.predicted_prs, 4), "alpha": round(r.alpha, 4),
                "router": r.router_version} if request.HasField("routing") else {})  # fmt: skip
    return GenerateInput(
        request_id=request.request_id,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=request.width,
        height=request.height,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale if request.HasField("guidance_scale") else None,
        seed=request.seed if request.HasField("seed") else None,
        routing=routing,
        model=request.model,
    )


def quota_pb(q: QuotaSnapshot, core: CloudCore | None = None) -> cloud_pb2.QuotaStatus:
    """The QuotaStatus message (in units) of `q`, listing `core`'s served models and their costs."""
    models = [cloud_pb2.ModelInfo(name=n, cost=c) for n, c in core.model_table()] if core is not None else []
    return cloud_pb2.QuotaStatus(
        device_id=q.device_id, limit=q.limit, used=q.used, remaining=q.remaining, period=q.period,
        period_end_unix=q.period_end_unix, models=models,
        default_model=core.default_model if core is not None else "", reserved=q.reserved,
    )  # fmt: skip


def _response(r: GenerateResult, core: CloudCore | None = None) -> cloud_pb2.GenerateResponse:
    return cloud_pb2.GenerateResponse(
        image_png=r.image_png, width=r.width, height=r.height, model=r.model, seed=r.seed,
        quota=quota_pb(r.quota, core), queue_seconds=r.queue_seconds, generate_seconds=r.generate_seconds,
        units_charged=r.units_charged,
    )  # fmt: skip


def _logfmt(fields: dict[str, Any]) -> str:
    """``key=value ...``; each value bounded and escaped (`clip`), quoted when it has a space, '"' or '='."""
    parts = []
    for k, v in fields.items():
        s = clip(v)
        if not s or any(c in s for c in ' "='):
            s = '"' + s.replace('"', '\\"') + '"'
        parts.append(f"{k}={s}")
    return " ".join(parts)


class _Undecodable:
    """What the deserializer hands the servicer for bytes that are not the expected message."""

    def __init__(self, message_name: str, size: int = 0, limit: int = 0) -> None:
        self.message_name = message_name
        self.size = size  # > limit: too large, not parsed
        self.limit = limit


def _lenient(message_cls: Any, limit: int | None = None) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if limit is not None and len(data) > limit:
            return _Undecodable(message_cls.DESCRIPTOR.name, len(data), limit)
        try:
            return message_cls.FromString(data)
        except Exception:  # DecodeError, invalid UTF-8 in a string field, ...
            return _Undecodable(message_cls.DESCRIPTOR.name)

    return deserialize


def _check_decoded(request: Any, max_prompt_chars: int = 0) -> None:
    if isinstance(request, _Undecodable):
        if request.size:
            hint = f" (a prompt may have at most {max_prompt_chars} characters)" if max_prompt_chars else ""
            raise InvalidArgument(
                "request", f"is {request.size} bytes, the maximum is {request.limit} bytes{hint}"
            )
        raise InvalidArgument("request", f"is not a valid {request.message_name} protobuf message")


def transport_limit(max_receive_message_bytes: int) -> int:
    """The size above which gRPC itself drops a request unread (RESOURCE_EXHAUSTED): a ceiling well above
    the application's limit, so that ordinary oversized requests get INVALID_ARGUMENT naming the limit."""
    return max(16 << 20, 4 * max_receive_message_bytes)


def add_servicer(
    servicer: CloudGenerationServicer, server: grpc.aio.Server, max_receive_message_bytes: int | None = None
) -> None:
    """Like the generated add_CloudGenerationServicer_to_server, but undecodable requests reach the servicer
    (and become INVALID_ARGUMENT) instead of grpc's UNKNOWN plus a logged traceback, and so do requests above
    `max_receive_message_bytes` (instead of gRPC's RESOURCE_EXHAUSTED)."""
    pb = cloud_pb2
    lim = max_receive_message_bytes
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, _lenient(pb.GenerateRequest, lim), pb.GenerateResponse.SerializeToString
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, _lenient(pb.GenerateRequest, lim), pb.GenerateEvent.SerializeToString
        ),
        "GetQuota": grpc.unary_unary_rpc_method_handler(
            servicer.GetQuota, _lenient(pb.GetQuotaRequest, lim), pb.QuotaStatus.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class CloudGenerationServicer(cloud_pb2_grpc.CloudGenerationServicer):
    """Translates protobuf <-> `CloudCore` and errors -> statuses; logs one line per RPC."""

    def __init__(self, core: CloudCore) -> None:
        self.core = core

    async def _finish(
        self, method: str, t0: float, log: dict, exc: BaseException | None, context: Any
    ) -> None:
        cancelled = isinstance(exc, asyncio.CancelledError)  # client went away, deadline, or shutdown
        status = None if exc is None or cancelled else status_for(exc, self.core)
        code = (
            grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.OK if status is None else status.code
        )
        self.core.metrics.requests.labels(method, code.name).inc()
        if method != "GetQuota":
            self.core.metrics.request_seconds.observe(time.monotonic() - t0)
        try:
            peer = context.peer()
        except Exception:  # noqa: BLE001 - a context without a peer (tests)
            peer = ""
        # `log` has request fields only once the core authenticated the caller (device_id first)
        fields = {"rpc": method, "code": code.name, "peer": peer, **log,
                  "total_s": round(time.monotonic() - t0, 4)}  # fmt: skip
        if status is not None:
            fields["error"] = status.details
        logger.log(logging.INFO if code == grpc.StatusCode.OK else logging.WARNING, _logfmt(fields))
        if status is not None:
            await context.abort(status.code, status.details, status.trailing_metadata)

    async def Generate(self, request: cloud_pb2.GenerateRequest, context: Any) -> cloud_pb2.GenerateResponse:
        t0, log = time.monotonic(), {}
        try:
            _check_decoded(request, self.core.config.max_prompt_chars)
            inp = _input(request)
            result = await self.core.generate(_token(context), inp, deadline=_deadline(context), log=log)
        except BaseException as exc:  # noqa: BLE001 - mapped to a status in one place
            await self._finish("Generate", t0, log, exc, context)
            raise
        await self._finish("Generate", t0, log, None, context)
        return _response(result, self.core)

    async def GenerateStream(
        self, request: cloud_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[cloud_pb2.GenerateEvent]:
        t0, log = time.monotonic(), {}
        events: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        task: asyncio.Task | None = None
        try:
            _check_decoded(request, self.core.config.max_prompt_chars)
            inp = _input(request)
            task = asyncio.ensure_future(
                self.core.generate(
                    _token(context), inp, deadline=_deadline(context),
                    on_progress=lambda s, n: events.put_nowait((s, n)), log=log,
                )
            )  # fmt: skip
            while not task.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    step, total = getter.result()
                    yield cloud_pb2.GenerateEvent(progress=cloud_pb2.Progress(step=step, total_steps=total))
                else:
                    getter.cancel()
            while not events.empty():
                step, total = events.get_nowait()
                yield cloud_pb2.GenerateEvent(progress=cloud_pb2.Progress(step=step, total_steps=total))
            result = task.result()
        except BaseException as exc:  # noqa: BLE001 - mapped to a status in one place
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await self._finish("GenerateStream", t0, log, exc, context)
            raise
        await self._finish("GenerateStream", t0, log, None, context)
        yield cloud_pb2.GenerateEvent(result=_response(result, self.core))

    async def GetQuota(self, request: cloud_pb2.GetQuotaRequest, context: Any) -> cloud_pb2.QuotaStatus:
        t0, log = time.monotonic(), {}
        try:
            _check_decoded(request, self.core.config.max_prompt_chars)
            snap = await self.core.quota(_token(context))
            log["device_id"] = snap.device_id
        except BaseException as exc:  # noqa: BLE001
            await self._finish("GetQuota", t0, log, exc, context)
            raise
        await self._finish("GetQuota", t0, log, None, context)
        return quota_pb(snap, self.core)


def _listen_port(listen: str) -> int | None:
    """The port of a ``HOST:PORT`` listen address (None for ``unix:`` sockets); ValueError when malformed."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return None
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT with PORT in 0..65535 (0: any free port)")
    return int(port)


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path  # the server's PEM certificate chain
    key_file: Path  # its PEM private key
    client_ca_file: Path | None = None  # set: mutual TLS, clients must present a cert signed by this CA

    def credentials(self) -> grpc.ServerCredentials:
        for name, f in (
            ("--tls-cert", self.cert_file),
            ("--tls-key", self.key_file),
            ("--tls-client-ca", self.client_ca_file),
        ):  # noqa: E501
            if f is not None and not Path(f).is_file():
                raise FileNotFoundError(f"{name} {f}: no such file")
            if f is not None and b"-----BEGIN " not in Path(f).read_bytes():
                raise ValueError(f"{name} {f}: not a PEM file (no '-----BEGIN ...' line)")
        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())],
            root_certificates=ca, require_client_auth=ca is not None,
        )  # fmt: skip


class CloudServer:
    """A started endpoint: `port`, `core`, `grpc_server`; `await stop(grace)` shuts it down gracefully."""

    def __init__(self, grpc_server: grpc.aio.Server, core: CloudCore, health_servicer: Any, port: int,
                 owns_store: bool) -> None:  # fmt: skip
        self.grpc_server = grpc_server
        self.core = core
        self.health = health_servicer
        self.port = port
        self._owns_store = owns_store
        self._stopped = False

    async def mark_ready(self) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish for `grace` seconds, then cancel the rest and
        release their reservations."""
        if self._stopped:
            return
        self._stopped = True
        logger.info("shutting down grace_s=%s", grace)
        await self.health.enter_graceful_shutdown()
        self.core.begin_shutdown()
        await self.grpc_server.stop(grace)
        await self.core.close()
        if self._owns_store:
            self.core.store.close()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


PipelineArg = Pipeline | str | Callable[[], Pipeline]


async def create_server(
    store: QuotaStore | str,
    pipeline: PipelineArg | Mapping[str, PipelineArg],
    listen: str = "127.0.0.1:0",
    config: ServerConfig | None = None,
    tls: TlsConfig | None = None,
    metrics_port: int | None = None,
    max_receive_message_bytes: int = 1 << 20,
    max_send_message_bytes: int = 64 << 20,
    max_concurrent_rpcs: int | None = None,
    create_store: bool = True,
    costs: Mapping[str, int] | None = None,
) -> tuple[CloudServer, int]:
    """Check the store, bind `listen` (port 0: any free port), start serving health NOT_SERVING, free what a
    killed predecessor with the same instance id held, load the pipeline, then report SERVING and return
    ``(server, port)``. `store` is a store or a URL (then the server owns and closes it; `create_store=False`
    refuses a URL with no store yet); `pipeline` is a pipeline object, a loader, `"noop"`, or an SD3
    folder / Hugging Face id, or a mapping served name -> one of those (several models, one batcher each,
    the first the default); `costs` maps served names to quota units per image (default 1). A store that is damaged or cannot be written is refused (ValueError naming
    --db) before anything is served."""
    requested_port = _listen_port(listen)
    if max_receive_message_bytes < 1:
        raise ValueError(f"max_receive_message_bytes={max_receive_message_bytes} must be >= 1")
    owns_store = isinstance(store, str)
    store_obj = open_store(store, create=create_store) if isinstance(store, str) else store
    try:
        return await _create_server(
            store_obj, owns_store, pipeline, listen, requested_port, config, tls, metrics_port,
            max_receive_message_bytes, max_send_message_bytes, max_concurrent_rpcs, costs,
        )  # fmt: skip
    except BaseException:
        if owns_store:
            store_obj.close()
        raise


def default_instance_id(listen: str) -> str:
    """This server's identity in the quota ledger when none is configured: ``<hostname>/<listen address>``
    for a fixed TCP port (a restart with the same --listen on the same host frees what its killed
    predecessor held; two live servers cannot bind the same address), "" (a random identity) for port 0 and
    unix sockets."""
    port = _listen_port(listen)
    return f"{socket.gethostname()}/{listen}" if port else ""


async def _create_server(
    store_obj: QuotaStore,
    owns_store: bool,
    pipeline: PipelineArg | Mapping[str, PipelineArg],
    listen: str,
    requested_port: int | None,
    config: ServerConfig | None,
    tls: TlsConfig | None,
    metrics_port: int | None,
    max_receive_message_bytes: int,
    max_send_message_bytes: int,
    max_concurrent_rpcs: int | None,
    costs: Mapping[str, int] | None = None,
) -> tuple[CloudServer, int]:
    def loadable(p: PipelineArg) -> Pipeline | Callable[[], Pipeline]:
        return (lambda: load_pipeline(p)) if isinstance(p, str) else p

    specs = (
        {k: loadable(v) for k, v in pipeline.items()} if isinstance(pipeline, Mapping) else loadable(pipeline)
    )
    metrics = Metrics()
    config = config or ServerConfig()
    # before the store check: a cost for a model not served is refused before anything is touched
    core = CloudCore(
        store_obj, specs, config, metrics, config.instance_id or default_instance_id(listen), costs
    )
    await asyncio.to_thread(store_obj.check_ready)
    server = grpc.aio.server(
        options=[
            # above the application's limit: INVALID_ARGUMENT from the servicer; above this: gRPC's own
            ("grpc.max_receive_message_length", transport_limit(max_receive_message_bytes)),
            ("grpc.max_send_message_length", max_send_message_bytes),
            # gRPC sets SO_REUSEPORT by default: a second server on a taken port would bind and silently
            # share the traffic with the first. Off: a taken port is an error.
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    add_servicer(CloudGenerationServicer(core), server, max_receive_message_bytes)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        port = server.add_secure_port(listen, tls.credentials()) if tls else server.add_insecure_port(listen)
    except RuntimeError as e:
        raise OSError(f"--listen {listen!r}: could not bind (port in use or address not local?) ({e})") from e
    if requested_port is not None and requested_port != 0 and port != requested_port:
        raise OSError(f"--listen {listen!r}: gRPC bound port {port} instead of {requested_port}")
    await server.start()
    cs = CloudServer(server, core, health_servicer, port, owns_store)
    if metrics_port is not None:  # on the same interface as the gRPC port
        host = listen.rsplit(":", 1)[0].strip("[]")
        try:
            metrics.serve_http(metrics_port, addr=host or "0.0.0.0")
        except OSError as e:
            await cs.stop(grace=0)
            raise OSError(f"--metrics-port {metrics_port}: could not bind ({e.strerror or e})") from e
    try:
        await core.start()
    except BaseException:
        await cs.stop(grace=0)
        raise
    await cs.mark_ready()
    logger.info(
        "serving %s on port %d models=%s default=%s store=%s instance_id=%s", SERVICE_NAME, port,
        ",".join(f"{n}:{c}" for n, c in core.model_table()), core.default_model, store_obj.url,
        clip(core.instance_id),
    )  # fmt: skip
    return cs, port


class BackgroundServer:
    """`create_server` on its own event loop in a daemon thread, for synchronous code (tests, the demo).

    with BackgroundServer(store, "noop") as srv:
        channel = grpc.insecure_channel(srv.address)
    """

    def __init__(self, store: QuotaStore | str, pipeline: PipelineArg | Mapping[str, PipelineArg],
                 listen: str = "127.0.0.1:0", **kwargs: Any) -> None:  # fmt: skip
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: CloudServer | None = None
        self.port = 0
        self.host = listen.rsplit(":", 1)[0]

        async def main() -> None:
            try:
                self.server, self.port = await create_server(store, pipeline, listen, **kwargs)
            except BaseException as e:  # reported to the constructor's thread
                self._error = e
                raise
            finally:
                self._ready.set()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(main())
            except BaseException:
                return
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="rt2i-cloud-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join(5)
            raise self._error

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def core(self) -> CloudCore:
        assert self.server is not None
        return self.server.core

    def stop(self, grace: float = 1.0) -> None:
        if self.server is None or not self.loop.is_running():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(grace + 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
