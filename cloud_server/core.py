"""The transport-free core of the cloud endpoint: validate, authenticate, reserve quota, batch, commit.

The gRPC servicer (`servicer.py`) only translates protobuf <-> these dataclasses and domain errors <->
status codes. Everything here raises `routet2i.cloud_server.errors.CloudError` subclasses, whose messages
are safe to show a client.

Models: the core serves one or more named pipelines, each behind its own batcher; the first is the default
(what a request with an empty `model` gets). Each model costs a whole number of quota units per image
(`costs`, default 1).

Charging rule: the model's cost in units per successful generation. The units are reserved before the
request is queued (all or nothing: not enough left is `QuotaExhausted`), committed after the image is
encoded, and released on every other outcome (bad pipeline call, cancelled,
deadline, shed, shutdown). The reservation is bound to `request_binding` (every parameter that shapes the
image, with server defaults applied and the model the server will use) and the seed: an exact retry of a
committed request_id is re-generated with its first seed and not charged again; the same id with other
parameters is `RequestIdReused` and never generates (see `store.py`). A reservation lives until the
request's deadline plus `reservation_margin_s` (at most `reservation_ttl_s`) and is owned by this server's
instance id, so a restarted server frees what its killed predecessor held.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from routet2i.cloud_server.batcher import Batcher, Job, encode_png
from routet2i.cloud_server.errors import InvalidArgument, NotReady, QuotaExhausted, Unauthenticated
from routet2i.cloud_server.metrics import Metrics
from routet2i.cloud_server.pipelines import GenParams, Pipeline
from routet2i.cloud_server.safe_text import clip
from routet2i.cloud_server.store import IDEMPOTENCY_S, Device, QuotaSnapshot, QuotaStore, Reservation
from routet2i.seed import SEED_MAX

logger = logging.getLogger(__name__)


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
    reservation_ttl_s: float = 900.0  # longest life of a reservation (requests without a deadline)
    reservation_margin_s: float = 30.0  # a reservation lives until the request's deadline plus this
    idempotency_s: float = IDEMPOTENCY_S  # a charged request_id replays free this long (within its period)
    purge_interval_s: float = 600.0  # how often dead ledger rows are deleted
    instance_id: str = ""  # this server's identity in the ledger ("": create_server derives one)

    def __post_init__(self) -> None:
        for name in ("default_width", "default_height"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0: the model's native size)")
        for name in ("default_steps", "max_steps", "max_size", "max_prompt_chars", "max_request_id_chars",
                     "max_batch", "max_queue"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("default_guidance", "max_guidance", "batch_window_s", "reservation_ttl_s",
                     "reservation_margin_s", "idempotency_s", "purge_interval_s"):  # fmt: skip
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v} must be a finite number >= 0")
        for name in ("reservation_ttl_s", "purge_interval_s"):
            if getattr(self, name) == 0:
                raise ValueError(f"{name}=0 must be > 0")
        if len(self.instance_id) > 200 or any(not ch.isprintable() for ch in self.instance_id):
            raise ValueError("instance_id must be at most 200 printable characters")
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
    model: str = ""  # a served model's name; "": the server's default model


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
    units_charged: int = 0  # quota units this call charged (the model's cost; 0 on a replay)


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
    if not 0 <= seed <= SEED_MAX:  # uint64: the one bound of client, edge pipeline and server
        raise InvalidArgument("seed", f"is {seed}; use 0 to 2**64-1")
    return GenParams(req.prompt, req.negative_prompt, sizes["width"], sizes["height"], steps, guidance, seed)


def request_binding(model: str, params: GenParams) -> bytes:
    """The canonical encoding of every parameter that shapes the image but the seed: the model the server
    will use and the request's values after server defaults. The ledger binds a request_id to a digest of
    this plus the seed (`store.binding_digest`)."""
    fields = {
        "v": 1,
        "model": model,
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "width": params.width,
        "height": params.height,
        "steps": params.steps,
        "guidance": float(params.guidance),
    }
    return json.dumps(fields, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode("ascii")


MAX_MODEL_NAME_CHARS = 100
PipelineSpec = Pipeline | Callable[[], Pipeline]


def check_model_name(name: str) -> str:
    """A served model's name: 1-100 printable characters without spaces, '=' or ','."""
    if (
        not isinstance(name, str) or not 1 <= len(name) <= MAX_MODEL_NAME_CHARS
        or any(not ch.isprintable() or ch.isspace() or ch in "=," for ch in name)
    ):  # fmt: skip
        raise ValueError(
            f"model name {clip(name, 120)!r} is not allowed: use 1-{MAX_MODEL_NAME_CHARS} printable "
            "characters without spaces, '=' or ','"
        )
    return name


def check_costs(costs: Mapping[str, int], served: list[str]) -> dict[str, int]:
    """Every served model's cost in quota units (default 1); ValueError for a cost of a model not served or
    a cost that is not a whole number >= 1."""
    for name, units in costs.items():
        if name not in served:
            raise ValueError(
                f"--cost {clip(name, 120)}: no such model is served; served: {', '.join(served)}"
            )
        if isinstance(units, bool) or not isinstance(units, int) or not 1 <= units <= 2**31 - 1:
            raise ValueError(f"--cost {name}={units!r}: use a whole number of units from 1 to 2**31-1")
    return {name: int(costs.get(name, 1)) for name in served}


class CloudCore:
    """One endpoint's state: the store, the served pipelines (loaded later if given as loaders), one batcher
    per pipeline, and each model's cost in quota units.

    `pipeline` is one pipeline (or loader; served under its `model_name`) or a mapping name -> pipeline (or
    loader), the first the default model. `costs` maps served names to units per image (default 1)."""

    def __init__(
        self,
        store: QuotaStore,
        pipeline: PipelineSpec | Mapping[str, PipelineSpec],
        config: ServerConfig | None = None,
        metrics: Metrics | None = None,
        instance_id: str | None = None,
        costs: Mapping[str, int] | None = None,
    ) -> None:
        if isinstance(pipeline, Mapping):
            if not pipeline:
                raise ValueError("no pipeline to serve: give at least one")
            self._specs: list[tuple[str | None, PipelineSpec]] = [
                (check_model_name(k), v) for k, v in pipeline.items()
            ]
        else:
            self._specs = [(None, pipeline)]
        self._costs_wanted = dict(costs or {})
        named = [n for n, _ in self._specs]
        if None not in named:  # every name known now: a bad cost is refused before anything loads
            check_costs(self._costs_wanted, named)  # type: ignore[arg-type]
        self.store = store
        self.config = config or ServerConfig()
        self.metrics = metrics or Metrics()
        # who holds this server's reservations in the ledger; a random one is never reused by a restart
        self.instance_id = instance_id or self.config.instance_id or f"anon-{uuid.uuid4().hex[:16]}"
        self._purger: asyncio.Task | None = None
        self.models: dict[str, Pipeline] = {}  # served name -> pipeline, the default first (after start)
        self.batchers: dict[str, Batcher] = {}  # served name -> its batcher
        self.costs: dict[str, int] = {}  # served name -> quota units per image
        self.default_model = ""  # what a request with an empty model gets (the first pipeline)
        self.pipeline: Pipeline | None = None  # the default model's pipeline
        self.batcher: Batcher | None = None  # the default model's batcher
        self._shutting_down = False
        self._active: dict[int, Reservation] = {}

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self._shutting_down

    def model_table(self) -> list[tuple[str, int]]:
        """(name, cost in units) of every served model, the default first."""
        return [(name, self.costs[name]) for name in self.models]

    def resolve_model(self, model: str) -> str:
        """The served name a request's `model` selects ("" : the default); `InvalidArgument` naming the served
        models otherwise."""
        if not model:
            return self.default_model
        if model in self.models:
            return model
        raise InvalidArgument(
            "model",
            f"{clip(model, MAX_MODEL_NAME_CHARS)!r} is not served here; served models: "
            f"{', '.join(self.models)} (empty: {self.default_model})",
        )

    async def start(self) -> None:
        """Free what a killed predecessor with this instance id still holds, load the pipelines in order (in
        a thread: the server already answers health NOT_SERVING) and start one batcher per model."""
        n_res, n_leases = await asyncio.to_thread(self.store.release_owner, self.instance_id)
        if n_res or n_leases:
            logger.warning(
                "released %d reservation(s) and %d replay lease(s) left by a previous run of instance %s",
                n_res, n_leases, clip(self.instance_id),
            )  # fmt: skip
        self._purger = asyncio.ensure_future(self._purge_loop())
        models: dict[str, Pipeline] = {}
        for name, p in self._specs:
            pipeline = p if hasattr(p, "generate") else await asyncio.to_thread(p)  # type: ignore[operator]
            name = check_model_name(name or pipeline.model_name)  # type: ignore[union-attr]
            if name in models:
                raise ValueError(f"--pipeline {name}: served twice; give each pipeline its own NAME=")
            models[name] = pipeline  # type: ignore[assignment]
        costs = check_costs(self._costs_wanted, list(models))
        c = self.config
        batchers = {
            name: Batcher(pipe, c.max_batch, c.max_queue, c.batch_window_s, self.metrics)
            for name, pipe in models.items()
        }
        self.models, self.costs, self.default_model = models, costs, next(iter(models))
        self.pipeline = models[self.default_model]
        for batcher in batchers.values():
            batcher.start()
        self.batchers = batchers
        self.batcher = batchers[self.default_model]
        # one gauge for every model's queue (each batcher alone would overwrite the others' depth)
        self.metrics.queue_depth.set_function(lambda: sum(b.depth for b in batchers.values()))
        self.metrics.ready.set(1)

    async def _purge_loop(self) -> None:
        while True:
            try:
                n = await asyncio.to_thread(self.store.purge)
                if n:
                    logger.info("purged %d dead ledger row(s)", n)
            except Exception as e:  # noqa: BLE001 - the next round tries again
                logger.warning("ledger purge failed: %s", clip(getattr(e, "detail", None) or e))
            await asyncio.sleep(self.config.purge_interval_s)

    def reservation_ttl(self, deadline: float | None) -> float:
        """How long a reservation made now may live: the request's deadline plus the margin, at most
        `reservation_ttl_s` (also the whole life of a request without a deadline)."""
        c = self.config
        if deadline is None:
            return c.reservation_ttl_s
        return min(c.reservation_ttl_s, max(deadline - time.monotonic(), 0.0) + c.reservation_margin_s)

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
        # nothing of the request is logged before this point (an unauthenticated caller writes no fields)
        request_id = req.request_id or f"srv-{uuid.uuid4().hex}"
        log["device_id"] = device.device_id
        log["request_id"] = request_id
        log.update({f"route_{k}": v for k, v in req.routing.items()})
        logger.debug("prompt request_id=%s prompt=%s", clip(request_id), clip(req.prompt, 500))
        if not self.ready or self.pipeline is None or self.batcher is None:
            raise NotReady("the server is not ready (model loading or shutting down); retry later")
        model = self.resolve_model(req.model)
        pipeline, batcher, units = self.models[model], self.batchers[model], self.costs[model]
        log["model"] = model
        params = validate(req, self.config, pipeline)
        binding = request_binding(model, params)
        reserving = asyncio.ensure_future(
            asyncio.to_thread(
                self.store.reserve, device, request_id, req.seed, self.reservation_ttl(deadline),
                binding=binding, owner=self.instance_id, keep_s=self.config.idempotency_s, units=units,
            )
        )  # fmt: skip
        try:
            res = await asyncio.shield(reserving)
        except QuotaExhausted as e:
            self.metrics.quota_denials.inc()
            denied = QuotaExhausted(e.device_id, e.limit, e.used, e.period, e.reserved, units, model)
            try:
                denied.quota = await asyncio.to_thread(self.store.quota, device)
            except Exception:  # noqa: BLE001 - the denial stands without the snapshot detail
                pass
            raise denied from None
        except asyncio.CancelledError:  # the reservation may still land in its thread: give it back then
            reserving.add_done_callback(self._release_when_reserved)
            raise
        params = replace(params, seed=res.seed)  # a replay: the first attempt's seed gives the same image
        log["charged"] = False  # True only once the charge is committed
        if not res.charged:
            log["replay"] = True
        key = id(res)
        self._active[key] = res
        job: Job | None = None
        try:
            job = Job(params, deadline, asyncio.get_running_loop().create_future(), on_progress)
            batcher.submit(job)
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
        log["charged"] = res.charged
        if res.charged:
            log["units"] = units
        snap = await asyncio.to_thread(self.store.quota, device)
        return GenerateResult(
            png,
            params.width,
            params.height,
            model,
            res.seed,
            snap,
            queue_s,
            gen_s,
            res.charged,
            units if res.charged else 0,
        )

    def _release_when_reserved(self, reserving: asyncio.Future) -> None:
        if not reserving.cancelled() and reserving.exception() is None:
            asyncio.ensure_future(_release(self.store, reserving.result()))

    def begin_shutdown(self) -> None:
        """Stop accepting generations; in-flight ones continue."""
        self._shutting_down = True
        self.metrics.ready.set(0)
        for batcher in self.batchers.values():
            batcher.begin_shutdown()

    async def close(self) -> None:
        """Abort unfinished work and release every reservation it still holds."""
        self.begin_shutdown()
        if self._purger is not None:
            self._purger.cancel()
            await asyncio.gather(self._purger, return_exceptions=True)
        for batcher in self.batchers.values():
            await batcher.close()
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
    except Exception as e:  # noqa: BLE001
        logger.warning(
            "quota release failed device_id=%s request_id=%s (the reservation expires on its own): %s",
            res.device_id, clip(res.request_id), clip(getattr(e, "detail", None) or e),
        )  # fmt: skip
    logger.debug("released request_id=%s in %.4fs", clip(res.request_id), time.monotonic() - t0)
