"""gRPC client of the cloud endpoint (proto/routet2i/cloud/v1/cloud.proto), built to fail fast and never pay twice.

- Plain or TLS channels (optionally mTLS); the device token travels as ``authorization: Bearer <token>``.
- One deadline per generation covers every attempt. UNAVAILABLE and DEADLINE_EXCEEDED are retried with
  exponential backoff and full jitter, always with the SAME request_id, which the server uses as an
  idempotency key: a retry after a lost response is not charged again.
- A circuit breaker: after ``failures`` consecutive calls that could not reach the cloud it opens, and
  calls fail at once (no network) for ``reset_s``; then one trial call is let through (half-open).
- RESOURCE_EXHAUSTED with a ``google.rpc.QuotaFailure`` detail is `QuotaExhausted`; any other error maps to
  `CloudUnavailable` (reason ``cloud_unavailable``) or `CloudRejected` (reason ``cloud_error``).
- It speaks the SDK's own types: a `CloudRequest` in, a `CloudResult` (a decoded image, the quota as a
  `CloudQuota`) out. The protobuf messages are built and read here and nowhere else on the device.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from routet2i._errors import CloudError, CloudRejected, CloudUnavailable, QuotaExhausted  # noqa: F401 - re-exported
from routet2i.cloud.v1 import cloud_pb2, cloud_pb2_grpc
from routet2i.policy import QuotaInfo

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image
    from routet2i.config import CloudConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CircuitBreaker",
    "CloudClient",
    "CloudError",
    "CloudQuota",
    "CloudRejected",
    "CloudRequest",
    "CloudResult",
    "CloudUnavailable",
    "QuotaExhausted",
    "parse_quota_failure",
    "quota_from_proto",
]

# ABORTED: the server is still generating this request_id (a concurrent retry); it says "retry later".
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)
_MAX_MESSAGE = 64 * 1024 * 1024
_LOOPBACK = ("localhost", "127.", "[::1]", "::1", "unix:", "ipv4:127.", "ipv6:[::1]")


def describe_rpc_error(code: grpc.StatusCode | None, details: str | None) -> str:
    """``"UNAVAILABLE: connection refused"``, ``"UNAUTHENTICATED: unknown token"``: the status and why, short.

    gRPC's connection details are long ("failed to connect to all addresses; last error: UNKNOWN:
    ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused (111)"): the common causes are
    named in a few words, anything else is kept (first line, at most 200 characters)."""
    text = (details or "").strip().splitlines()[0] if (details or "").strip() else ""
    low = text.lower()
    for needle, short in (
        ("connection refused", "connection refused"),
        ("dns resolution failed", "host name not resolved"),
        ("name or service not known", "host name not resolved"),
        ("connection reset", "connection reset"),
        ("network is unreachable", "network unreachable"),
        ("no route to host", "no route to host"),
        ("ssl", "TLS handshake failed: " + text[:160]),
        ("handshake", "TLS handshake failed: " + text[:160]),
        ("deadline exceeded", "deadline exceeded"),
    ):
        if needle in low:
            text = short
            break
    if not text and code == grpc.StatusCode.DEADLINE_EXCEEDED:
        text = "deadline exceeded"
    text = text[:200]
    name = code.name if code is not None else "no status"
    return f"{name}: {text}" if text else name


class CircuitBreaker:
    """closed -> (``failures`` consecutive failures) -> open -> (``reset_s``) -> half-open: one trial call."""

    def __init__(self, failures: int = 1, reset_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half-open" if self._clock() - self._opened_at >= self.reset_s else "open"

    def would_allow(self) -> bool:
        """Whether a call would be let through now (does not take the half-open trial slot)."""
        with self._lock:
            if self._opened_at is None:
                return True
            return self._clock() - self._opened_at >= self.reset_s and not self._trial_in_flight

    def allow(self) -> bool:
        """Take permission for one call: always when closed, once per reset period when open."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._clock() - self._opened_at >= self.reset_s and not self._trial_in_flight:
                self._trial_in_flight = True
                return True
            return False

    def release(self) -> None:
        """Give back a half-open trial slot without a verdict (the call ended for another reason)."""
        with self._lock:
            self._trial_in_flight = False

    def success(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._opened_at = None
            self._trial_in_flight = False

    def failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            self._trial_in_flight = False
            if self._opened_at is not None or self._consecutive >= self.failures:
                if self._opened_at is None:
                    # INFO: the failed call's fallback already logged one WARNING with the cause
                    logger.info("cloud unreachable: circuit breaker open for %.0f s", self.reset_s)
                self._opened_at = self._clock()


@dataclass
class CloudRequest:
    """One image to generate in the cloud (`CloudClient.generate`). None: the server's default."""

    request_id: str  # idempotency key: a retry reuses it, and the server charges it once
    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None  # None: the server picks one (and returns it in `CloudResult.seed`)
    model: str | None = None  # a served model's name (`CloudQuota.models`); None or "": the default
    # why the device sends it (the operator's analytics); None: no router
    prs: float | None = None  # the router's PRS^
    alpha: float | None = None  # the threshold in force (an infinite alpha is sent as 0)
    router_version: str = ""
    reason: str = ""  # the routing reason: router, forced, ...


@dataclass
class CloudResult:
    """A successful cloud generation and what it cost."""

    request_id: str  # the request's idempotency key
    image: Image.Image  # the decoded image
    seed: int  # the seed it was generated with
    model: str  # the served model that generated it
    queue_seconds: float  # waiting in the server's queue
    generate_seconds: float  # generating on the server
    network_seconds: float  # the rest of the call: network, retries and backoff
    attempts: int  # RPC attempts made (1 = no retry)
    units_charged: int  # quota units this call charged (the model's cost; 0 on a free replay)
    quota: CloudQuota | None  # the device's quota after the call, when the server sent it


@dataclass
class CloudQuota(QuotaInfo):
    """A `QuotaInfo` (in quota units) as the cloud reported it, with the models it serves."""

    # served model name -> quota units per image, the default first
    models: dict[str, int] = field(default_factory=dict)
    default_model: str = ""  # what a request without a model gets

    def cost(self, model: str | None = None) -> int:
        """Units one image of `model` (None or "": the default) costs; KeyError if the cloud doesn't serve it."""
        name = model or self.default_model
        if name not in self.models:
            raise KeyError(
                f"model {name!r} is not served by the cloud; served: {', '.join(self.models) or 'none'}"
            )
        return self.models[name]


def quota_from_proto(q: cloud_pb2.QuotaStatus) -> CloudQuota:
    return CloudQuota(
        limit=int(q.limit),
        used=int(q.used),
        remaining=int(q.remaining),
        period=q.period,
        period_end_unix=int(q.period_end_unix),
        device_id=q.device_id,
        models={m.name: int(m.cost) for m in q.models},
        default_model=q.default_model,
    )


def _rich_status(err: grpc.RpcError) -> Any:
    try:
        from grpc_status import rpc_status

        return rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        return None


def parse_quota_failure(err: grpc.RpcError) -> tuple[bool, QuotaInfo | None, str]:
    """(is a quota failure, quota status if sent as a detail, subject) from a RESOURCE_EXHAUSTED error."""
    from google.rpc import error_details_pb2

    status = _rich_status(err)
    if status is None:
        return False, None, ""
    found, quota, subject = False, None, ""
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            qf = error_details_pb2.QuotaFailure()
            detail.Unpack(qf)
            found = True
            if qf.violations:
                subject = qf.violations[0].subject
        elif detail.Is(cloud_pb2.QuotaStatus.DESCRIPTOR):
            qs = cloud_pb2.QuotaStatus()
            detail.Unpack(qs)
            quota = quota_from_proto(qs)
    return found, quota, subject


def _request_to_proto(req: CloudRequest) -> cloud_pb2.GenerateRequest:
    alpha = req.alpha if req.alpha is not None and math.isfinite(req.alpha) else 0.0
    pb = cloud_pb2.GenerateRequest(
        request_id=req.request_id,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt or "",
        width=req.width or 0,
        height=req.height or 0,
        num_inference_steps=req.num_inference_steps or 0,
        model=req.model or "",
        routing=cloud_pb2.RoutingInfo(
            predicted_prs=req.prs if req.prs is not None else 0.0,
            alpha=alpha,
            router_version=req.router_version,
            reason=req.reason,
        ),
    )
    if req.seed is not None:
        pb.seed = int(req.seed)
    if req.guidance_scale is not None:
        pb.guidance_scale = float(req.guidance_scale)
    return pb


def _result_from_proto(
    resp: cloud_pb2.GenerateResponse, request_id: str, attempts: int, wall_seconds: float
) -> CloudResult:
    from PIL import Image

    image = Image.open(io.BytesIO(resp.image_png))
    image.load()
    return CloudResult(
        request_id=request_id,
        image=image,
        seed=int(resp.seed),
        model=resp.model,
        queue_seconds=resp.queue_seconds,
        generate_seconds=resp.generate_seconds,
        network_seconds=max(0.0, wall_seconds - resp.queue_seconds - resp.generate_seconds),
        attempts=attempts,
        units_charged=int(resp.units_charged),
        quota=quota_from_proto(resp.quota) if resp.HasField("quota") else None,
    )


class CloudClient:
    """Synchronous client of `routet2i.cloud.v1.CloudGeneration` with retries and a circuit breaker."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        tls: bool = False,
        ca_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        deadline_s: float = 120.0,
        attempt_timeout_s: float | None = None,
        retries: int = 3,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
        breaker: CircuitBreaker | None = None,
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor | grpc.UnaryStreamClientInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if not target or not isinstance(target, str):
            raise ValueError(f"cloud target={target!r}: expected 'host:port'")
        self.target = target
        self.deadline_s = deadline_s
        self.attempt_timeout_s = attempt_timeout_s
        self.retries = retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.breaker = breaker or CircuitBreaker()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        opts = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            *options,
        ]
        if tls:
            read = lambda p: Path(p).expanduser().read_bytes() if p else None  # noqa: E731
            creds = grpc.ssl_channel_credentials(
                root_certificates=read(ca_cert),
                private_key=read(client_key),
                certificate_chain=read(client_cert),
            )
            channel = grpc.secure_channel(target, creds, options=opts)
        else:
            if token and not target.startswith(_LOOPBACK):
                logger.warning(
                    "sending the device token to %s over a plaintext channel; set tls = true", target
                )
            channel = grpc.insecure_channel(target, options=opts)
        self._channel = grpc.intercept_channel(channel, *interceptors) if interceptors else channel
        self._raw_channel = channel
        self._stub = cloud_pb2_grpc.CloudGenerationStub(self._channel)

    @classmethod
    def from_config(
        cls,
        config: CloudConfig,
        *,
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor | grpc.UnaryStreamClientInterceptor] = (),
        rng: random.Random | None = None,
    ) -> CloudClient:
        """The client a ``[cloud]`` section (`routet2i.config.CloudConfig`) describes; its endpoint must be set."""
        if not config.token:
            logger.warning(
                "cloud endpoint %s configured without a device token: the cloud will refuse requests "
                "(export %s=...)",
                config.endpoint,
                config.token_env,
            )
        return cls(
            str(config.endpoint or ""),
            config.token,
            tls=config.tls,
            ca_cert=config.ca_cert,
            client_cert=config.client_cert,
            client_key=config.client_key,
            deadline_s=config.deadline_s,
            attempt_timeout_s=config.attempt_timeout_s,
            retries=config.retries,
            backoff_initial_s=config.backoff_initial_s,
            backoff_max_s=config.backoff_max_s,
            breaker=CircuitBreaker(config.breaker_failures, config.breaker_reset_s),
            interceptors=interceptors,
            rng=rng,
        )

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def available(self) -> bool:
        """False while the circuit breaker is open (the cloud is known to be down)."""
        return self.breaker.would_allow()

    def _backoff(self, attempt: int) -> float:
        return self._rng.uniform(0.0, min(self.backoff_max_s, self.backoff_initial_s * (2**attempt)))

    def _once(
        self,
        request: cloud_pb2.GenerateRequest,
        timeout: float,
        on_progress: Callable[[int, int], None] | None,
    ) -> cloud_pb2.GenerateResponse:
        if on_progress is None:
            return self._stub.Generate(request, timeout=timeout, metadata=self._metadata)
        stream = self._stub.GenerateStream(request, timeout=timeout, metadata=self._metadata)
        try:
            for event in stream:
                kind = event.WhichOneof("event")
                if kind == "progress":
                    on_progress(int(event.progress.step), int(event.progress.total_steps))
                elif kind == "result":
                    return event.result
        except BaseException:
            stream.cancel()
            raise
        raise CloudRejected("the cloud stream ended without a result", request_id=request.request_id)

    def generate(
        self,
        request: CloudRequest,
        *,
        on_progress: Callable[[int, int], None] | None = None,
        deadline_s: float | None = None,
        model: str | None = None,
    ) -> CloudResult:
        """Generate in the cloud; raises a `CloudError` subclass when no image comes back.

        ``on_progress(step, total_steps)`` switches to GenerateStream. ``deadline_s`` overrides the client's
        total budget for this call. ``model`` names a served model (`get_quota().models`; it costs that many
        quota units); None keeps ``request.model`` (None or empty: the server's default model).
        """
        if not isinstance(request, CloudRequest):
            raise TypeError(
                f"request: expected a routet2i.cloud_client.CloudRequest, got {type(request).__name__}"
            )
        if model is not None:
            request = dataclasses.replace(request, model=model)
        if not request.request_id:
            raise ValueError("request.request_id is empty: every cloud request needs an idempotency key")
        response, attempts, wall_seconds = self._call(_request_to_proto(request), on_progress, deadline_s)
        return _result_from_proto(response, request.request_id, attempts, wall_seconds)

    def _call(
        self,
        request: cloud_pb2.GenerateRequest,
        on_progress: Callable[[int, int], None] | None,
        deadline_s: float | None,
    ) -> tuple[cloud_pb2.GenerateResponse, int, float]:
        """(response, attempts, wall seconds): the attempts of one request within the deadline, retried."""
        rid = request.request_id
        if not self.breaker.allow():
            raise CloudUnavailable(
                f"cloud {self.target} is unreachable (circuit breaker open); not trying", request_id=rid
            )
        budget = self.deadline_s if deadline_s is None else deadline_s
        start = time.monotonic()
        end = start + budget
        attempt = 0
        last_code: grpc.StatusCode | None = None
        last_details: str | None = None
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            timeout = remaining if self.attempt_timeout_s is None else min(remaining, self.attempt_timeout_s)
            try:
                response = self._once(request, timeout, on_progress)
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
                last_code = code
                last_details = err.details() if hasattr(err, "details") else str(err)
                if code in RETRYABLE:
                    if attempt < self.retries:
                        pause = self._backoff(attempt)
                        if time.monotonic() + pause < end:
                            logger.info(
                                "cloud %s (attempt %d, %s); retrying in %.2f s",
                                code.name,
                                attempt + 1,
                                rid,
                                pause,
                            )
                            self._sleep(pause)
                            attempt += 1
                            continue
                    break
                self._raise_for(err, code, rid, attempt + 1)
            except CloudError:
                self.breaker.success()  # it answered
                raise
            except BaseException:  # e.g. the progress callback raised: no verdict on the cloud
                self.breaker.release()
                raise
            self.breaker.success()
            return response, attempt + 1, time.monotonic() - start
        self.breaker.failure()
        cause = describe_rpc_error(last_code, last_details) if last_code else "deadline spent before a call"
        raise CloudUnavailable(
            f"cloud {self.target} unavailable after {attempt + 1} attempt(s) in "
            f"{time.monotonic() - start:.2f} s: {cause}",
            code=last_code,
            request_id=rid,
            attempts=attempt + 1,
        )

    def _raise_for(self, err: grpc.RpcError, code: grpc.StatusCode, rid: str, attempts: int) -> None:
        details = err.details() if hasattr(err, "details") else str(err)
        kw = {"code": code, "request_id": rid, "attempts": attempts}
        self.breaker.success()  # the cloud is up: it answered with a status
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            is_quota, quota, subject = parse_quota_failure(err)
            if is_quota:
                raise QuotaExhausted(
                    f"cloud quota exhausted for {subject or 'this device'}: {details}", quota=quota, **kw
                )
            raise CloudUnavailable(f"cloud overloaded: {describe_rpc_error(code, details)}", **kw)
        raise CloudRejected(f"cloud refused the request: {describe_rpc_error(code, details)}", **kw)

    def get_quota(self, timeout: float = 5.0) -> CloudQuota:
        """The device's quota now (not charged), in units, with the served models and their costs
        (`CloudQuota.models`). Raises a `CloudError` subclass on failure.

        Only generations count for the circuit breaker: a failed GetQuota (say at start-up, before the
        network is up) neither opens it nor takes its half-open trial, so the next generation still tries."""
        if not self.breaker.would_allow():
            raise CloudUnavailable(f"cloud {self.target} is unreachable (circuit breaker open)")
        try:
            q = self._stub.GetQuota(cloud_pb2.GetQuotaRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
            if code in RETRYABLE:
                raise CloudUnavailable(
                    f"cloud {self.target} unavailable: {describe_rpc_error(code, err.details())}", code=code
                ) from None
            self._raise_for(err, code, "", 1)
            raise  # unreachable
        self.breaker.success()
        return quota_from_proto(q)
