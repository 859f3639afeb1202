"""The transport-free core of the cloud endpoint: validate, authenticate, reserve quota, batch, commit.

The gRPC servicer (`servicer.py`) only translates protobuf <-> these dataclasses and domain errors <->
status codes. Everything here raises `routet2i.cloud_server.errors.CloudError` subclasses, whose messages
are safe to show a client.

Charging rule: one unit per successful generation. A unit is reserved before the request is queued,
committed after the image is encoded, and released on every other outcome (bad pipeline call, cancelled,
deadline, shed, shutdown). A request_id already committed is re-generated with its first seed and not
charged again (see `store.py`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from routet2i.cloud_server.batcher import Batcher, Job, encode_png
from routet2i.cloud_server.errors import InvalidArgument, NotReady, QuotaExhausted, Unauthenticated
from routet2i.cloud_server.metrics import Metrics
from routet2i.cloud_server.pipelines import GenParams, Pipeline
from routet2i.cloud_server.store import Device, QuotaSnapshot, QuotaStore, Reservation

logger = logging.getLogger(__name__)

UINT64_MAX = 2**64 - 1


@dataclass
class ServerConfig:
    default_width: int = 0  # width when a request says 0; 0: the model's native size
    default_height: int = 0  # height when a request says 0; 0: the model's native size
    default_steps: int = 28  # steps when a request says 0
    default_guidance: float = 7.0  # guidance when a request leaves it unset
    max_steps: int = 100  # largest num_inference_steps accepted
    max_guidance: float = 30.0  # largest guidance_scale accepted (>= 0 always)
    max_size: int = 2048  # largest width/height accepted (capped further by the model's own limit)
    max_prompt_chars: int = 2000  # longest prompt / negative_prompt accepted, in characters
    max_request_id_chars: int = 128  # longest request_id accepted
    max_batch: int = 4  # most requests per pipeline call
    batch_window_s: float = 0.02  # how long the batcher waits for compatible requests to join
    max_queue: int = 64  # requests waiting beyond this are refused at once (load shedding)
    reservation_ttl_s: float = 900.0  # a reservation not committed by then stops counting (crash safety)

    def __post_init__(self) -> None:
        for name in ("default_width", "default_height"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0: the model's native size)")
        for name in ("default_steps", "max_steps", "max_size", "max_prompt_chars", "max_request_id_chars",
                     "max_batch", "max_queue"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("default_guidance", "max_guidance", "batch_window_s", "reservation_ttl_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v} must be a finite number >= 0")
        if self.reservation_ttl_s == 0:
            raise ValueError("reservation_ttl_s=0 must be > 0")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps={self.default_steps} is above max_steps={self.max_steps}")
        if self.default_guidance > self.max_guidance:
            raise ValueError(
                f"default_guidance={self.default_guidance} is above max_guidance={self.max_guidance}"
            )


@dataclass(frozen=True)
class GenerateInput:
    request_id: str  # idempotency key; "" lets the server pick one (no idempotency)
    prompt: str
    negative_prompt: str = ""
    width: int = 0  # 0: server default
    height: int = 0  # 0: server default
    num_inference_steps: int = 0  # 0: server default
    guidance_scale: float | None = None  # None: server default
    seed: int | None = None  # None: the server picks one
    routing: dict[str, Any] = field(default_factory=dict)  # the device's routing info, for logs only


@dataclass(frozen=True)
class GenerateResult:
    image_png: bytes  # the image, PNG encoded
    width: int  # pixels
    height: int  # pixels
    model: str  # the pipeline's name
    seed: int  # the seed used (the server's pick when the request had none)
    quota: QuotaSnapshot  # the device's quota after this request
    queue_seconds: float  # waiting for a batch slot
    generate_seconds: float  # the pipeline call of its batch
    charged: bool  # False when the request_id had already been charged (a replay)


def validate(req: GenerateInput, cfg: ServerConfig, pipeline: Pipeline) -> GenParams:
    """Resolve defaults and check bounds; `InvalidArgument` names the first bad field."""
    if len(req.request_id) > cfg.max_request_id_chars:
        raise InvalidArgument(
            "request_id", f"is {len(req.request_id)} characters, the maximum is {cfg.max_request_id_chars}"
        )
    if any(not ch.isprintable() for ch in req.request_id):
        raise InvalidArgument("request_id", "must contain printable characters only")
    if not req.prompt.strip():
        raise InvalidArgument("prompt", "must not be empty")
    for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
        if len(text) > cfg.max_prompt_chars:
            raise InvalidArgument(name, f"is {len(text)} characters, the maximum is {cfg.max_prompt_chars}")
    mult = pipeline.size_multiple
    max_size = min(cfg.max_size, pipeline.max_size)
    sizes = {}
    for name, value, default in (
        ("width", req.width, cfg.default_width or pipeline.default_size),
        ("height", req.height, cfg.default_height or pipeline.default_size),
    ):
        v = value or default
        if v % mult or not mult <= v <= max_size:
            raise InvalidArgument(name, f"is {v}; use a multiple of {mult} from {mult} to {max_size}")
        sizes[name] = v
    steps = req.num_inference_steps or cfg.default_steps
    if not 1 <= steps <= cfg.max_steps:
        raise InvalidArgument(
            "num_inference_steps", f"is {steps}; use 1 to {cfg.max_steps} (0: server default)"
        )
    guidance = cfg.default_guidance if req.guidance_scale is None else float(req.guidance_scale)
    if not (math.isfinite(guidance) and 0.0 <= guidance <= cfg.max_guidance):
        raise InvalidArgument(
            "guidance_scale", f"is {guidance}; use a finite number from 0 to {cfg.max_guidance}"
        )
    seed = 0 if req.seed is None else int(req.seed)
    if not 0 <= seed <= UINT64_MAX:
        raise InvalidArgument("seed", f"is {seed}; use 0 to 2**64-1")
    return GenParams(req.prompt, req.negative_prompt, sizes["width"], sizes["height"], steps, guidance, seed)


class CloudCore:
    """One endpoint's state: the store, the pipeline (loaded later if given as a loader) and the batcher."""

    def __init__(
        self,
        store: QuotaStore,
        pipeline: Pipeline | Callable[[], Pipeline],
        config: ServerConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.config = config or ServerConfig()
        self.metrics = metrics or Metrics()
        self._pipeline_or_loader = pipeline
        self.pipeline: Pipeline | None = None
        self.batcher: Batcher | None = None
        self._shutting_down = False
        self._active: dict[int, Reservation] = {}

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self._shutting_down

    async def start(self) -> None:
        """Load the pipeline (in a thread: the server already answers health NOT_SERVING) and start batching."""
        p = self._pipeline_or_loader
        pipeline = p if hasattr(p, "generate") else await asyncio.to_thread(p)  # type: ignore[operator]
        self.pipeline = pipeline  # type: ignore[assignment]
        c = self.config
        self.batcher = Batcher(pipeline, c.max_batch, c.max_queue, c.batch_window_s, self.metrics)  # type: ignore[arg-type]
        self.batcher.start()
        self.metrics.ready.set(1)

    async def authenticate(self, token: str | None) -> Device:
        if not token:
            raise Unauthenticated("missing bearer token: send metadata 'authorization: Bearer <token>'")
        return await asyncio.to_thread(self.store.authenticate, token)

    async def quota(self, token: str | None) -> QuotaSnapshot:
        device = await self.authenticate(token)
        return await asyncio.to_thread(self.store.quota, device)

    async def generate(
        self,
        token: str | None,
        req: GenerateInput,
        *,
        deadline: float | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        log: dict[str, Any] | None = None,
    ) -> GenerateResult:
        """Generate one image for the token's device. `deadline` is a time.monotonic() value; `log` is
        filled with fields for the caller's request log line."""
        log = {} if log is None else log
        device = await self.authenticate(token)
        log["device_id"] = device.device_id
        if not self.ready or self.pipeline is None or self.batcher is None:
            raise NotReady("the server is not ready (model loading or shutting down); retry later")
        params = validate(req, self.config, self.pipeline)
        request_id = req.request_id or f"srv-{uuid.uuid4().hex}"
        log["request_id"] = request_id
        seed = req.seed if req.seed is not None else secrets.randbits(64)
        reserving = asyncio.ensure_future(
            asyncio.to_thread(self.store.reserve, device, request_id, seed, self.config.reservation_ttl_s)
        )
        try:
            res = await asyncio.shield(reserving)
        except QuotaExhausted:
            self.metrics.quota_denials.inc()
            raise
        except asyncio.CancelledError:  # the reservation may still land in its thread: give it back then
            reserving.add_done_callback(self._release_when_reserved)
            raise
        if not res.charged and req.seed is None:
            seed = res.seed  # a replay without a seed: the first attempt's seed gives the same image
        params = replace(params, seed=seed)
        log["charged"] = res.charged
        key = id(res)
        self._active[key] = res
        job: Job | None = None
        try:
            job = Job(params, deadline, asyncio.get_running_loop().create_future(), on_progress)
            self.batcher.submit(job)
            image, queue_s, gen_s = await job.future
            log.update(queue_s=round(queue_s, 4), gen_s=round(gen_s, 4))
            png = await asyncio.to_thread(encode_png, image)
            await asyncio.to_thread(self.store.commit, res)
        except BaseException:
            if job is not None:
                job.cancelled = True
            await _release(self.store, res)
            raise
        finally:
            self._active.pop(key, None)
        snap = await asyncio.to_thread(self.store.quota, device)
        return GenerateResult(
            png,
            params.width,
            params.height,
            self.pipeline.model_name,
            seed,
            snap,
            queue_s,
            gen_s,
            res.charged,
        )

    def _release_when_reserved(self, reserving: asyncio.Future) -> None:
        if not reserving.cancelled() and reserving.exception() is None:
            asyncio.ensure_future(_release(self.store, reserving.result()))

    def begin_shutdown(self) -> None:
        """Stop accepting generations; in-flight ones continue."""
        self._shutting_down = True
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.begin_shutdown()

    async def close(self) -> None:
        """Abort unfinished work and release every reservation it still holds."""
        self.begin_shutdown()
        if self.batcher is not None:
            await self.batcher.close()
        for res in list(self._active.values()):
            await _release(self.store, res)
        self._active.clear()


async def _release(store: QuotaStore, res: Reservation) -> None:
    """Release even if the calling task is being cancelled (a cancelled request must not stay charged)."""
    t0 = time.monotonic()
    try:
        await asyncio.shield(asyncio.to_thread(store.release, res))
    except asyncio.CancelledError:
        pass
    except Exception:
        logger.exception(
            "quota release failed device_id=%s request_id=%s (the reservation expires on its own)",
            res.device_id, res.request_id,
        )  # fmt: skip
    logger.debug("released request_id=%s in %.4fs", res.request_id, time.monotonic() - t0)
