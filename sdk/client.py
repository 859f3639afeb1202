"""`EdgeClient`: route each prompt to the on-device SD2.1 (ONNX) or the cloud SD3 (gRPC), and fall back.

    from routet2i import EdgeClient
    client = EdgeClient(router="bundle/router", edge="bundle/edge", cloud="host:port", token="...",
                        target_cloud_rate=0.3)          # or EdgeClient.from_config("routet2i.toml")
    result = client.generate("a red fox in the snow", seed=0, num_inference_steps=20)

One call: the ONNX router predicts PRS^ (the edge is predicted better when PRS^ is high; README, section
SDK), the policy (`routet2i.policy`) decides with alpha for the (quota-paced) target cloud rate (online
calibration: alpha follows the device's own PRS^ distribution), the image is generated where decided, and a
cloud failure falls back to the edge with the reason in the result. `EdgeClient.route` is the same decision
without generating. Every decision is appended to the decision log. `AsyncEdgeClient` is the asyncio twin.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routet2i._errors import CloudError, CloudUnavailable, GenerationCancelled, QuotaExhausted, UsageError
from routet2i.config import FLAT_FIELDS, SECTIONS, ClientConfig, CloudConfig, load_config
from routet2i.decision_log import DecisionLog
from routet2i.policy import Decision, DeviceState, QuotaInfo, RoutingPolicy, exhaustion_end
from routet2i.progress import ProgressEvent
from routet2i.seed import SEED_MAX, check_seed

if TYPE_CHECKING:  # pragma: no cover
    import grpc
    from PIL import Image
    from routet2i.cloud_client import CloudClient, CloudRequest

logger = logging.getLogger(__name__)

__all__ = ["AsyncEdgeClient", "EdgeClient", "GenerateResult", "ProgressEvent", "RouteDecision"]

_QUOTA_REFRESH_S = 300.0  # at most one GetQuota per this many seconds when pacing needs a fresh quota
_MAX_SEED = SEED_MAX  # uint64, as on the wire and in EdgePipeline / the cloud server (routet2i.seed)


@dataclass
class RouteDecision:
    """What `EdgeClient.route` returns: the decision `generate` would make, without generating."""

    route: str  # where it would be generated: "edge" | "cloud"
    reason: str  # why: router | forced | quota_exhausted | cloud_unavailable | local_only (as GenerateResult)
    model: str  # the model that would generate: the edge model's name (from the bundle) or the cloud model's
    prs: float | None  # PRS^ predicted by the router (None without a router)
    alpha: float | None  # threshold in force: the router wants the cloud iff PRS^ < alpha
    target_rate: float | None  # configured cloud rate rho_r
    paced_rate: float | None  # rate actually targeted after quota-aware pacing
    wanted_cloud: bool | None = None  # the router's own wish (None: forced or local-only, router not asked)
    calibration: str = "static"  # how alpha was found: "online" (the device's own PRS^) | "static" (table)
    observed: int = 0  # PRS^ values in the online calibration window when deciding
    expected_requests: float | None = None  # M, requests expected before the quota period ends (pacing)
    cause: str | None = None  # why a wanted cloud route stays on the device (e.g. "circuit breaker open")
    metric_scores: list[float] = field(default_factory=list)  # router's per-metric scores
    route_seconds: float = 0.0  # time spent deciding (router inference included)
    # N-model routers (several cloud models; README, "Several cloud models"); None for a 2-model router:
    cost: float | None = None  # quota units the chosen model costs per image (the edge: 0)
    scores: dict[str, float] | None = None  # the router's predicted combined quality per model
    lambda_: float | None = None  # cost price in force: the router picks argmax(score - lambda_ * cost)
    budget: float | None = None  # configured budget (average cloud cost units per prompt)
    paced_budget: float | None = None  # budget actually targeted after quota-aware pacing
    wanted_model: str | None = None  # the router's (or force's) choice, also when it stays on the edge

    def to_dict(self) -> dict[str, Any]:
        """Every field (JSON-safe)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("prs", "alpha", "lambda_"):
            if isinstance(d.get(k), float) and not math.isfinite(d[k]):
                d[k] = None
        return d


@dataclass
class GenerateResult:
    """What `EdgeClient.generate` returns (the fields below; README, section SDK)."""

    image: Image.Image  # the generated image
    route: str  # where it was generated: "edge" | "cloud"
    reason: str  # why: router | forced | quota_exhausted | cloud_unavailable | cloud_error | local_only
    prs: float | None  # PRS^ predicted by the router (None without a router)
    alpha: float | None  # threshold in force: cloud iff PRS^ < alpha
    timings: dict[str, float]  # seconds per stage: route, queue, generate, network, total
    quota: dict[str, Any] | None  # cloud quota after the call, when known (limit, used, remaining, ...)
    seed: int  # seed the image was generated with
    request_id: str  # idempotency key (also in the decision log and the server's logs)
    width: int  # image width in pixels
    height: int  # image height in pixels
    model: str  # what generated it: the edge model's name (EdgePipeline.model_name) or the server's model
    target_rate: float | None = None  # configured cloud rate rho_r
    paced_rate: float | None = None  # rate actually targeted after quota-aware pacing
    cloud_attempts: int = 0  # gRPC attempts made for this request
    cloud_error: str | None = None  # why the cloud did not deliver (error, or "circuit breaker open"...)
    metric_scores: list[float] = field(default_factory=list)  # router's per-metric scores
    images: list[Image.Image] = field(
        default_factory=list
    )  # all images (num_images_per_prompt); [0] is image
    seeds: list[int] = field(default_factory=list)  # seed of each image: seed + i (mod 2**64)
    prompt: str | None = field(default=None, repr=False)  # for save()'s metadata; None when privacy says no
    # (save_prompt = false, or a local-only prompt); not in to_dict()
    cost: float | None = None  # N-model routers: quota units the chosen model costs per image (edge: 0)

    def __post_init__(self) -> None:
        if not self.images:
            self.images = [self.image]
        if not self.seeds:
            self.seeds = [int(self.seed)]

    def to_dict(self) -> dict[str, Any]:
        """Every field except the images and the prompt (JSON-safe)."""
        skip = ("image", "images", "prompt")
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        for k in ("prs", "alpha"):
            if isinstance(d.get(k), float) and not math.isfinite(d[k]):
                d[k] = None
        return d

    def metadata(self, index: int = 0) -> dict[str, str]:
        """The text `save` writes into image ``index``: seed, route, model, PRS^ (``prs``), alpha, reason,
        request_id, size, and the prompt when `prompt` is set (the privacy rule above)."""
        meta = {
            "software": f"routet2i {_version()}",
            "seed": str(self.seeds[index]),
            "route": self.route,
            "reason": self.reason,
            "model": self.model,
            "prs": "" if self.prs is None else repr(float(self.prs)),
            "alpha": "" if self.alpha is None else repr(float(self.alpha)),
            "request_id": self.request_id,
            "size": f"{self.width}x{self.height}",
        }
        if self.prompt is not None:
            meta["prompt"] = self.prompt
        return meta

    def save(self, path: str | Path, *, index: int = 0, quality: int = 95) -> Path:
        """Write image ``index`` (default the first, `image`) to ``path``; the format follows the extension:
        ``.png`` (text chunks with `metadata`), ``.jpg``/``.jpeg`` and ``.webp`` (``quality``; the same
        metadata as JSON in the EXIF ImageDescription). Written atomically (a temporary file beside it,
        then renamed: never half a file). An unknown extension is a `UsageError` naming the allowed ones.
        Returns the path."""
        fmt = image_format(path)
        if (
            isinstance(index, bool)
            or not isinstance(index, int)
            or not -len(self.images) <= index < len(self.images)
        ):
            raise UsageError(f"index={index!r}: this result has {len(self.images)} image(s)")
        meta = self.metadata(index % len(self.images))
        from routet2i.paths import atomic_path, check_output_path

        dest = check_output_path(path, "path")
        image = self.images[index]
        with atomic_path(dest) as tmp:
            if fmt == "PNG":
                from PIL.PngImagePlugin import PngInfo

                info = PngInfo()
                for key, value in meta.items():
                    info.add_itxt(key, value)  # iTXt: UTF-8 (a prompt may be any language)
                image.save(tmp, format="PNG", pnginfo=info)
            else:
                import json

                from PIL import Image as _Image

                exif = _Image.Exif()
                exif[0x010E] = json.dumps(meta, ensure_ascii=True)  # ImageDescription
                exif[0x0131] = meta["software"]  # Software
                image.convert("RGB").save(tmp, format=fmt, quality=quality, exif=exif.tobytes())
        return dest


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_format(path: str | Path) -> str:
    """PIL format name for ``path``'s extension; `UsageError` naming the allowed extensions otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise UsageError(
            f"{str(path)!r}: unknown image extension {suffix or '(none)'!r}; allowed: {', '.join(IMAGE_FORMATS)}"
        )
    return IMAGE_FORMATS[suffix]


def _version() -> str:
    from routet2i import __version__

    return __version__


def _as_path(x: Any) -> str | None:
    """Bundle argument -> path string for the config; objects (a ready router / pipeline) -> None."""
    return str(x) if isinstance(x, (str, Path)) else None


def _cloud_key(endpoint: str | None, token: str | None) -> str | None:
    """Which cloud account a remembered quota belongs to: a short digest of endpoint and token (None: no cloud)."""
    if not endpoint:
        return None
    return hashlib.sha256(f"{endpoint}\n{token or ''}".encode()).hexdigest()[:16]


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("generation cancelled")


def _round(x: float) -> float:
    return round(float(x), 6)


@dataclass
class _Call:
    """One `EdgeClient.generate` call's arguments, checked and completed from the config (`_check_inputs`)."""

    prompt: str
    negative: str  # negative prompt
    steps: int | None  # num_inference_steps; None: the pipeline's / server's default
    guidance: float | None  # guidance_scale; None: the default
    width: int | None
    height: int | None
    seed: int  # the first image's seed (drawn when not given)
    n_images: int  # num_images_per_prompt
    force: str | None
    local_only: bool
    models: list[str] | None
    progress: Callable[[ProgressEvent], None] | None
    cancel: threading.Event | None
    deadline_s: float | None  # the cloud time budget of this call; None: the config's
    strict: bool
    request_id: str  # idempotency key (image i > 0 in the cloud: "<request_id>-<i>")

    def seeds(self) -> list[int]:
        """Image i's seed: seed + i (mod 2**64)."""
        return [(int(self.seed) + i) % (_MAX_SEED + 1) for i in range(self.n_images)]


@dataclass
class _Outcome:
    """Where a `generate` call's images come from and what they cost, filled in step by step."""

    route: str  # "edge" | "cloud": the decision's, then "edge" after a cloud failure
    reason: str  # as GenerateResult.reason
    seeds: list[int]  # each image's seed (the cloud's answer when it generated them)
    timings: dict[str, float]  # seconds: route, queue, generate, network (and total at the end)
    quota: QuotaInfo | None  # the last quota known
    cloud_error: str | None = None  # why the cloud did not deliver
    attempts: int = 0  # cloud RPC attempts
    model: str = ""  # what generated the images
    images: list[Any] = field(default_factory=list)


class EdgeClient:
    """Routes prompts between the device and the cloud. Thread-safe; edge generations run one at a time."""

    def __init__(
        self,
        router: str | Path | None = None,
        edge: str | Path | None = None,
        cloud: str | CloudConfig | None = None,
        token: str | None = None,
        target_cloud_rate: float | None = None,
        *,
        config: ClientConfig | None = None,
        cloud_interceptors: tuple[grpc.UnaryUnaryClientInterceptor, ...] = (),
        rng: random.Random | None = None,
        **options: Any,
    ) -> None:
        """Either the bundles and endpoint as arguments (plus, in ``options``, any flat `ClientConfig` option
        such as ``deadline_s=30`` or a section such as ``policy=PolicyConfig(...)``; ``cloud`` is the endpoint
        or a `CloudConfig`), or a ready ``config``. Bundles are loaded (and their manifests verified) here,
        once. ``router`` may also be a ready object with ``predict_one(prompt) -> (prs, scores)`` and
        ``routing``, and ``edge`` any callable with `routet2i.edge_pipeline.EdgePipeline`'s signature."""
        if config is None:
            given = {"router": _as_path(router), "edge": _as_path(edge), "cloud": cloud, "token": token}
            given["target_cloud_rate"] = target_cloud_rate
            known = set(FLAT_FIELDS) | set(SECTIONS)
            bad = sorted(set(options) - known)
            if bad:
                raise UsageError(f"unknown EdgeClient option(s) {bad}; allowed: {', '.join(sorted(known))}")
            given = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items() if v is not None}
            config = ClientConfig(**given, **options)
        elif any(v is not None for v in (cloud, token, target_cloud_rate)) or options:
            raise UsageError("pass either config=... or the individual options, not both")
        self.config = config
        self._rng = rng or random.Random()
        self._edge_lock = threading.Lock()
        self._quota_checked = 0.0

        self.router: Any = None
        routing = None
        if router is not None and hasattr(router, "predict_one"):  # a ready router object (duck-typed)
            self.router = router
        elif config.router:
            from routet2i.router_runtime import RouterSession

            self.router = RouterSession(
                config.router,
                providers=config.providers,
                check_hashes=config.check_hashes,
                trusted_keys=config.trusted_keys,
            )
        if self.router is not None:
            routing = self.router.routing
        self.edge: Any = None
        if (
            edge is not None and callable(edge) and not isinstance(edge, (str, Path))
        ):  # a ready pipeline object
            self.edge = edge
        elif config.edge:
            from routet2i.edge_pipeline import EdgePipeline

            self.edge = EdgePipeline(
                config.edge,
                providers=config.providers,
                scheduler=config.generation.scheduler,
                check_hashes=config.check_hashes,
                trusted_keys=config.trusted_keys,
            )
        self.state = DeviceState(
            config.log.resolved_state_file(),
            cloud_key=_cloud_key(config.cloud.endpoint, config.cloud.token),
            keep_s=config.policy.pacing_window_s,
        )
        self.policy = RoutingPolicy.from_config(routing, config.policy, state=self.state, rng=self._rng)
        self.decisions = DecisionLog(config.log.resolved_decision_log(), config.log.log_prompts)
        self.cloud: CloudClient | None = None
        if config.cloud.endpoint:
            from routet2i.cloud_client import CloudClient

            self.cloud = CloudClient.from_config(config.cloud, interceptors=cloud_interceptors, rng=self._rng)
        self._router_version = str((routing or {}).get("router_version", ""))
        # the edge model's name: from the bundle (EdgePipeline.model_name: the exported model), else the
        # bundle folder's name, else the ready pipeline object's class name, else the router's edge model
        self._edge_name = (
            str(getattr(self.edge, "model_name", "") or "")
            or (Path(str(config.edge)).name if config.edge else "")
            or (type(self.edge).__name__ if self.edge is not None else "")
        ) or str((routing or {}).get("edge_model", "edge"))
        self._cloud_name = str((routing or {}).get("cloud_model") or "cloud")
        # names a caller may pass as models=[...] or force=: the router bundle's models (routing.json
        # ``models``; an older bundle: its edge/cloud pair)
        self._model_names = {str((routing or {}).get("edge_model") or self._edge_name), self._cloud_name}
        if routing is not None and "models" in routing:
            self._model_names = {m.name for m in self.policy.models}
            self._cloud_name = self.policy.models[1].name
        self._nmodel = self.policy.nmodel
        if self._nmodel and not hasattr(self.router, "predict_models_one"):
            raise UsageError(
                "router: an N-model routing.json needs a router with predict_models_one (a RouterSession)"
            )
        logger.info(
            "EdgeClient ready: router=%s edge=%s cloud=%s target_cloud_rate=%s",
            config.router,
            config.edge,
            config.cloud.endpoint,
            self.policy.target_rate,
        )

    @classmethod
    def from_config(cls, path: str | Path | None = None, **overrides: Any) -> EdgeClient:
        """Read ``routet2i.toml`` (environment variables override it; ``overrides`` override both)."""
        interceptors = overrides.pop("cloud_interceptors", ())
        return cls(config=load_config(path, **overrides), cloud_interceptors=interceptors)

    def close(self) -> None:
        if self.cloud is not None:
            self.cloud.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- quota

    def quota(self) -> QuotaInfo | None:
        """The last quota the cloud reported (may be stale), or None."""
        return self.state.quota

    def refresh_quota(self, timeout: float = 5.0) -> QuotaInfo | None:
        """Ask the cloud for the device's quota now (not charged); None when it cannot be reached."""
        if self.cloud is None:
            return None
        self._quota_checked = time.time()
        try:
            q = self.cloud.get_quota(timeout=timeout)
        except CloudError as exc:
            logger.info("GetQuota failed: %s", exc)
            return None
        self.state.set_quota(q)
        return q

    def _maybe_refresh_quota(self, now: float) -> None:
        """Pacing needs R: fetch it when unknown or from a finished period, at most every few minutes."""
        if not (self.config.policy.pacing and self.cloud is not None and self.policy.target_rate):
            return
        q = self.state.quota
        if q is not None and q.current(now):
            return
        if now - self._quota_checked < _QUOTA_REFRESH_S or not self.cloud.available:
            return
        self.refresh_quota(timeout=min(5.0, self.config.cloud.deadline_s))

    # --- generation

    def _check_args(
        self, prompt: Any, seed: Any, steps: Any, guidance: Any, width: Any, height: Any, force: Any
    ) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"prompt={prompt!r}: must be a non-empty string")
        check_seed(seed)
        if steps is not None and (not isinstance(steps, int) or not 1 <= steps <= 1000):
            raise UsageError(f"num_inference_steps={steps!r}: must be an integer in [1, 1000]")
        if guidance is not None and (not isinstance(guidance, (int, float)) or not math.isfinite(guidance)):
            raise UsageError(f"guidance_scale={guidance!r}: must be a finite number")
        for name, v in (("width", width), ("height", height)):
            if v is not None and (not isinstance(v, int) or v <= 0 or v % 8):
                raise UsageError(f"{name}={v!r}: must be a positive multiple of 8")
        if force not in (None, "edge", "cloud") and force not in self._model_names:
            raise UsageError(
                f"force={force!r}: must be 'edge', 'cloud', a model name "
                f"({', '.join(m.name for m in self.policy.models)}) or None"
            )

    def _norm_force(self, force: str | None) -> str | None:
        """A 2-model router: a model name given as force is its route (the N-model policy takes names)."""
        if self._nmodel or force in (None, "edge", "cloud"):
            return force
        return "cloud" if force == self._cloud_name else "edge"

    def _allowed(self, models: Any) -> tuple[bool, list[str] | None]:
        """(cloud allowed, the cloud model names allowed or None for all) for ``models``."""
        cloud_allowed = self._check_models(models)
        if not self._nmodel or models is None:
            return cloud_allowed, None
        return cloud_allowed, [m for m in models if m in self._model_names]

    def _check_models(self, models: Any) -> bool:
        """Validate ``models``; True when a cloud model may be chosen."""
        if models is None:
            return True
        if isinstance(models, str) or not all(isinstance(m, str) for m in models or ()) or not models:
            raise UsageError(f"models={models!r}: must be a non-empty list of model names")
        unknown = sorted(set(models) - self._model_names)
        if unknown:
            raise UsageError(
                f"models={list(models)!r}: unknown model(s) {unknown}; this router knows "
                f"{', '.join(sorted(self._model_names))}"
            )
        if self._nmodel:
            return any(m in self._model_names and m != self.policy.models[0].name for m in models)
        return self._cloud_name in models

    def _decide(
        self,
        prompt: str,
        force: str | None,
        local_only: bool,
        cloud_allowed: bool = True,
        allowed: list[str] | None = None,
    ) -> tuple[Decision, list[float], float]:
        """Router, quota refresh, then the policy's decision, counted for pacing and calibration."""
        t_start = time.perf_counter()
        prs, scores = None, []
        model_scores = None
        if self.router is not None:
            if self._nmodel:
                out_prs, out_scores, out_models = self.router.predict_models_one(prompt)
                model_scores = [float(x) for x in list(out_models)]
            else:
                out_prs, out_scores = self.router.predict_one(prompt)
            prs = float(out_prs)
            scores = [float(s) for s in list(out_scores)]
        extra: dict[str, Any] = {}
        if self._nmodel:
            extra = {"model_scores": model_scores, "allowed": allowed}
        t_route = time.perf_counter() - t_start
        now = time.time()
        self._maybe_refresh_quota(now)
        decision = self.policy.route(
            prompt,
            prs,
            force=force,
            local_only=local_only,
            cloud_configured=self.cloud is not None,
            cloud_open=self.cloud.available if self.cloud is not None else False,
            cloud_allowed=cloud_allowed,
            now=now,
            **extra,
        )
        return decision, scores, t_route

    def route(
        self,
        prompt: str,
        *,
        force: str | None = None,
        local_only: bool = False,
        models: list[str] | None = None,
    ) -> RouteDecision:
        """The whole decision `generate` would make for ``prompt`` (router, online calibration, pacing,
        ``force``/``local_only``, a remembered quota exhaustion, cloud availability), without generating.

        Counts as a request for pacing and as a routed prompt for online calibration, like `generate`, and
        is appended to the decision log (``"decided_only": true``). ``models``: the model names the route may
        choose among (the router bundle's model names; the edge is always allowed; leaving every cloud model
        out keeps the prompt on the edge with reason "forced"). ``force``: "edge", "cloud" (an N-model
        router: its best allowed cloud model at the current lambda) or a model's name."""
        self._check_args(prompt, None, None, None, None, None, force)
        cloud_allowed, allowed = self._allowed(models)
        t0 = time.perf_counter()
        decision, scores, _ = self._decide(
            prompt, self._norm_force(force), local_only, cloud_allowed, allowed
        )
        out = self._route_decision(decision, scores, time.perf_counter() - t0)
        rec = self._record(uuid.uuid4().hex, decision, {"route": _round(out.route_seconds)}, None, None, None)
        rec["decided_only"] = True
        self.decisions.append(rec, prompt=prompt)
        return out

    def _model_of(self, decision: Decision) -> str:
        if decision.route == "cloud":
            return decision.model or self._cloud_name
        return self._edge_name

    def _route_decision(self, decision: Decision, scores: list[float], seconds: float) -> RouteDecision:
        n = self._nmodel
        return RouteDecision(
            route=decision.route,
            reason=decision.reason,
            model=self._model_of(decision),
            prs=decision.prs,
            alpha=decision.alpha,
            target_rate=decision.target_rate,
            paced_rate=decision.paced_rate,
            wanted_cloud=decision.wanted_cloud,
            calibration=decision.calibration,
            observed=decision.observed,
            expected_requests=decision.expected_requests,
            cause=decision.details.get("cause"),
            metric_scores=scores,
            route_seconds=seconds,
            cost=decision.cost if n else None,
            scores=None
            if not n or decision.scores is None
            else {m.name: s for m, s in zip(self.policy.models, decision.scores, strict=True)},
            lambda_=decision.lambda_ if n else None,
            budget=decision.target_rate if n else None,
            paced_budget=decision.paced_rate if n else None,
            wanted_model=decision.details.get("wanted_model", decision.model) if n else None,
        )

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        force: str | None = None,
        local_only: bool = False,
        progress: Callable[[ProgressEvent], None] | None = None,
        deadline_s: float | None = None,
        strict: bool | None = None,
        cancel: threading.Event | None = None,
        num_images_per_prompt: int = 1,
        models: list[str] | None = None,
    ) -> GenerateResult:
        """Route and generate one image. Arguments left None take the config's defaults, then the pipeline's.

        ``force`` "edge"/"cloud" skips the router's decision; ``local_only`` keeps this prompt on the device.
        ``progress`` receives a `ProgressEvent` per edge denoising step and per cloud stream event (from this
        thread). ``deadline_s`` overrides the cloud time budget for this call. ``strict`` (default: the
        config's): when the cloud was wanted (router or ``force="cloud"``) and cannot deliver, raise the
        `routet2i.CloudError` (`CloudUnavailable`, `CloudRejected`, `QuotaExhausted`) instead of
        generating on the edge. Without it the cause is in ``result.cloud_error`` and logged as one WARNING.
        ``cancel``: a `threading.Event`; set from another thread, the edge run stops at the next denoising
        step (the device is free again at once) and a cloud stream is cancelled at its next event; raises
        `routet2i.GenerationCancelled`. Cancelling an `AsyncEdgeClient.generate` task sets it.
        ``num_images_per_prompt`` (1 to 64): ``result.images`` holds them all (``result.image`` is the first),
        image i generated with seed ``result.seeds[i] = seed + i`` (mod 2**64), wherever the prompt goes
        (one routing decision). On the edge they are denoised one after the other; in the cloud each is
        one request (charged as one image each). When the cloud fails on any of them, the whole batch is
        generated on the edge (images the cloud already made are dropped, though charged) or, with
        ``strict``, the error is raised. ``models`` and ``force`` (a model's name too) as in `route`; an
        N-model router's cloud choice is sent as the request's model and charged at its cost.
        """
        call = self._check_inputs(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            seed=seed,
            force=force,
            local_only=local_only,
            progress=progress,
            deadline_s=deadline_s,
            strict=strict,
            cancel=cancel,
            num_images_per_prompt=num_images_per_prompt,
            models=models,
        )
        t_start = time.perf_counter()
        decision, scores, out = self._route(call)
        self._refuse_decided_fallback(call, decision, out)
        if out.route == "cloud":
            self._cloud_attempt(call, decision, out)
        if not out.images:  # the edge: decided, or a fallback
            self._edge_run(call, decision, out)
        out.timings["total"] = time.perf_counter() - t_start
        return self._result(call, decision, scores, out)

    def _check_inputs(
        self,
        prompt: Any,
        *,
        negative_prompt: Any,
        num_inference_steps: Any,
        guidance_scale: Any,
        width: Any,
        height: Any,
        seed: Any,
        force: Any,
        local_only: bool,
        progress: Any,
        deadline_s: Any,
        strict: Any,
        cancel: Any,
        num_images_per_prompt: Any,
        models: Any,
    ) -> _Call:
        """`generate`'s arguments, completed from the config's [generation] defaults, checked (a
        `UsageError` naming the argument), with a request id and, when not given, a random seed."""
        gen = self.config.generation
        steps = num_inference_steps if num_inference_steps is not None else gen.num_inference_steps
        guidance = guidance_scale if guidance_scale is not None else gen.guidance_scale
        width = width if width is not None else gen.width
        height = height if height is not None else gen.height
        negative = negative_prompt if negative_prompt is not None else gen.negative_prompt
        self._check_args(prompt, seed, steps, guidance, width, height, force)
        if deadline_s is not None and (
            isinstance(deadline_s, bool)
            or not isinstance(deadline_s, (int, float))
            or not math.isfinite(deadline_s)
            or deadline_s <= 0
        ):
            raise UsageError(f"deadline_s={deadline_s!r}: must be a finite number of seconds > 0")
        n_images = num_images_per_prompt
        if isinstance(n_images, bool) or not isinstance(n_images, int) or not 1 <= n_images <= 64:
            raise UsageError(f"num_images_per_prompt={n_images!r}: must be an integer in [1, 64]")
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise UsageError(f"cancel={cancel!r}: must be a threading.Event (or None)")
        if strict is None:
            strict = self.config.policy.strict
        elif not isinstance(strict, bool):
            raise UsageError(f"strict={strict!r}: must be True, False or None (the config's)")
        request_id = uuid.uuid4().hex
        if seed is None:
            seed = self._rng.randint(0, _MAX_SEED)
        return _Call(
            prompt=prompt, negative=negative, steps=steps, guidance=guidance, width=width, height=height,
            seed=seed, n_images=n_images, force=force, local_only=local_only, models=models,
            progress=progress, cancel=cancel, deadline_s=deadline_s, strict=strict, request_id=request_id,
        )  # fmt: skip

    def _route(self, call: _Call) -> tuple[Decision, list[float], _Outcome]:
        """The routing decision (router, pacing, overrides; `_decide`) and the outcome it starts."""
        cloud_allowed, allowed = self._allowed(call.models)
        decision, scores, t_route = self._decide(
            call.prompt, self._norm_force(call.force), call.local_only, cloud_allowed, allowed
        )
        out = _Outcome(
            route=decision.route,
            reason=decision.reason,
            seeds=call.seeds(),
            timings={"route": t_route, "queue": 0.0, "generate": 0.0, "network": 0.0},
            quota=self.state.quota,
            cloud_error=decision.details.get("cause"),  # e.g. "circuit breaker open": decided without a call
        )
        return decision, scores, out

    def _refuse_decided_fallback(self, call: _Call, decision: Decision, out: _Outcome) -> None:
        """strict: a wanted cloud route the decision already keeps on the edge (quota exhausted, cloud
        unavailable) raises the `CloudError`, logged as a failed decision."""
        if (
            not call.strict
            or out.route != "edge"
            or out.reason not in ("quota_exhausted", "cloud_unavailable")
        ):
            return
        exhausted = out.reason == "quota_exhausted"
        cause = out.cloud_error or ("quota exhausted" if exhausted else "cloud unavailable")
        self._log(
            call.request_id, call.prompt, out.route, out.reason, decision, out.timings, out.quota, call.seed,
            cause, failed=True,
        )  # fmt: skip
        err_type = QuotaExhausted if exhausted else CloudUnavailable
        raise err_type(f"{cause} (strict: no fallback to the edge)", request_id=call.request_id)

    def _cloud_attempt(self, call: _Call, decision: Decision, out: _Outcome) -> None:
        """Generate every image in the cloud. A `CloudError` is raised (strict, logged as a failed decision)
        or turns ``out`` to the edge with the cause; a quota exhaustion is remembered either way."""
        t_cloud = time.perf_counter()
        try:
            self._cloud_images(call, decision, out)
        except CloudError as exc:
            out.images = []
            out.timings.update(network=time.perf_counter() - t_cloud, queue=0.0, generate=0.0)
            if isinstance(exc, QuotaExhausted):
                self._remember_exhaustion(exc)
                out.quota = self.state.quota
            if call.strict:
                self._log(
                    call.request_id, call.prompt, "cloud", exc.reason, decision, out.timings, out.quota,
                    call.seed, str(exc), failed=True,
                )  # fmt: skip
                raise
            out.route, out.reason, out.cloud_error = "edge", exc.reason, str(exc)
            out.seeds = call.seeds()
            logger.warning("cloud failed, generating on the edge: %s", exc)

    def _cloud_images(self, call: _Call, decision: Decision, out: _Outcome) -> None:
        """One cloud request per image (each its own idempotency key), added to ``out`` as they arrive."""
        assert self.cloud is not None
        on_progress = self._cloud_progress(call)
        for i, seed in enumerate(list(out.seeds)):
            request = self._cloud_request(call, decision, i, seed)
            try:
                got = self.cloud.generate(request, on_progress=on_progress, deadline_s=call.deadline_s)
            except CloudError as exc:
                out.attempts += exc.attempts
                if call.n_images > 1:
                    exc.args = (f"image {i + 1} of {call.n_images}: {exc}", *exc.args[1:])
                raise
            out.images.append(got.image)
            out.attempts += got.attempts
            out.model = got.model
            out.seeds[i] = got.seed
            out.timings["queue"] += got.queue_seconds
            out.timings["generate"] += got.generate_seconds
            out.timings["network"] += got.network_seconds
            if got.quota is not None:
                out.quota = got.quota
                self.state.set_quota(got.quota)

    def _cloud_progress(self, call: _Call) -> Callable[[int, int], None] | None:
        """The cloud stream's callback: progress events and the cancel check (None: no stream needed)."""
        if (call.progress is None and call.cancel is None) or not self.config.cloud.stream:
            return None

        def on_progress(step: int, total: int) -> None:
            _check_cancel(call.cancel)
            if call.progress is not None:
                call.progress(ProgressEvent("cloud", step, total, call.request_id))

        return on_progress

    def _cloud_request(self, call: _Call, decision: Decision, index: int, seed: int) -> CloudRequest:
        from routet2i.cloud_client import CloudRequest

        return CloudRequest(
            request_id=call.request_id if index == 0 else f"{call.request_id}-{index}",
            prompt=call.prompt,
            negative_prompt=call.negative,
            num_inference_steps=call.steps,
            guidance_scale=call.guidance,
            width=call.width,
            height=call.height,
            seed=seed,
            model=decision.model if self._nmodel else None,  # an N-model router's choice, charged its cost
            prs=decision.prs,
            alpha=decision.alpha,
            router_version=self._router_version,
            reason=decision.reason,
        )

    def _edge_run(self, call: _Call, decision: Decision, out: _Outcome) -> None:
        """Generate every image on the device; a failure is logged as a failed decision, then raised."""
        try:
            if self.edge is None:
                if out.cloud_error is not None:
                    raise ConnectionError(f"no edge bundle configured to fall back on: {out.cloud_error}")
                raise UsageError("no edge bundle configured: pass edge=... (or force='cloud')")
            images, t_queue, t_gen = self._edge_generate(call, out.seeds[0])
        except BaseException:
            self._log(
                call.request_id, call.prompt, out.route, out.reason, decision, out.timings, out.quota,
                call.seed, out.cloud_error, failed=True,
            )  # fmt: skip
            raise
        out.images = images
        out.timings["queue"] += t_queue
        out.timings["generate"] = t_gen
        out.model = self._edge_name

    def _result(self, call: _Call, decision: Decision, scores: list[float], out: _Outcome) -> GenerateResult:
        """The `GenerateResult`, and its line in the decision log."""
        timings = {k: _round(v) for k, v in out.timings.items()}
        image = out.images[0]
        keep_prompt = self.config.log.save_prompt and out.reason != "local_only"
        result = GenerateResult(
            image=image,
            route=out.route,
            reason=out.reason,
            prs=decision.prs,
            alpha=decision.alpha,
            timings=timings,
            quota=out.quota.to_dict() if out.quota is not None else None,
            seed=int(out.seeds[0]),
            request_id=call.request_id,
            width=image.width,
            height=image.height,
            model=out.model,
            target_rate=decision.target_rate,
            paced_rate=decision.paced_rate,
            cloud_attempts=out.attempts,
            cloud_error=out.cloud_error,
            metric_scores=scores,
            images=list(out.images),
            seeds=[int(x) for x in out.seeds],
            prompt=call.prompt if keep_prompt else None,
            cost=(decision.cost if out.route == "cloud" else 0.0) if self._nmodel else None,
        )
        self._log(
            call.request_id, call.prompt, out.route, out.reason, decision, timings, out.quota, call.seed,
            out.cloud_error,
        )  # fmt: skip
        return result

    def _remember_exhaustion(self, exc: Any) -> None:
        """A QuotaExhausted answer: keep the quota and when the exhaustion ends (routes stay on the edge)."""
        assert self.cloud is not None
        q = exc.quota
        if q is None:  # QuotaFailure carries no period end: ask (free) so the device knows how long
            with contextlib.suppress(CloudError):
                q = self.cloud.get_quota(timeout=min(2.0, self.config.cloud.deadline_s))
        if q is not None:
            self.state.set_quota(q)
        known = self.state.quota
        end = known.period_end_unix if known is not None and known.current(time.time()) else 0
        self.state.mark_exhausted(exhaustion_end(end, time.time()))

    def _edge_generate(self, call: _Call, seed: int) -> tuple[list[Any], float, float]:
        """Run the edge pipeline under the device lock: (images, queue seconds, generate seconds)."""
        kwargs: dict[str, Any] = {"negative_prompt": call.negative or None, "seed": seed}
        if call.steps is not None:
            kwargs["num_inference_steps"] = call.steps
        if call.guidance is not None:
            kwargs["guidance_scale"] = call.guidance
        if call.width is not None:
            kwargs["width"] = call.width
        if call.height is not None:
            kwargs["height"] = call.height
        n = call.n_images
        if n > 1:  # only then, so a ready pipeline object without the argument still serves one image
            kwargs["num_images_per_prompt"] = n
        progress, cancel, request_id = call.progress, call.cancel, call.request_id
        if progress is not None or cancel is not None:

            def on_step(step: int, total: int, *_: Any) -> None:
                if progress is not None:
                    progress(ProgressEvent("edge", int(step), int(total), request_id))
                _check_cancel(cancel)  # raised inside the denoising loop: the run stops at this step

            kwargs["callback"] = on_step
        t0 = time.perf_counter()
        with self._edge_lock:
            t1 = time.perf_counter()
            _check_cancel(cancel)  # cancelled while waiting for the device
            out = self.edge(call.prompt, **kwargs)
        images = list(out) if n > 1 else [out]
        if len(images) != n:
            raise RuntimeError(
                f"the edge pipeline returned {len(images)} images for num_images_per_prompt={n}"
            )
        return images, t1 - t0, time.perf_counter() - t1

    def _record(self, request_id, decision, timings, quota, seed, cloud_error):
        rec = {
            "request_id": request_id,
            "route": decision.route,
            "reason": decision.reason,
            "prs": decision.prs,
            "alpha": decision.alpha,
            "target_rate": decision.target_rate,
            "paced_rate": decision.paced_rate,
            "calibration": decision.calibration,
            "expected_requests": decision.expected_requests,
            "quota_remaining": quota.remaining if quota is not None else None,
            "seed": None if seed is None else int(seed),
            "timings": timings,
        }
        if decision.model is not None:  # an N-model router
            rec["model"], rec["cost"] = decision.model, decision.cost
            rec["lambda"] = (
                decision.lambda_ if decision.lambda_ is not None and math.isfinite(decision.lambda_) else None
            )
        if cloud_error:
            rec["cloud_error"] = cloud_error
        return rec

    def _log(
        self, request_id, prompt, route, reason, decision, timings, quota, seed, cloud_error, failed=False
    ):
        rec = self._record(request_id, decision, timings, quota, seed, None)
        rec["route"], rec["reason"] = route, reason
        if "model" in rec and route != decision.route:  # a cloud failure fell back to the edge
            rec["model"], rec["cost"] = self._edge_name, 0.0
        if cloud_error:
            rec["cloud_error"] = cloud_error
        if failed:
            rec["failed"] = True
        self.decisions.append(rec, prompt=prompt)


class AsyncEdgeClient:
    """asyncio twin of `EdgeClient`: generations run in worker threads, so the event loop stays free;
    ``progress`` callbacks are delivered on the event loop's thread. Cancelling a ``generate`` task stops
    its edge run at the next denoising step (the device is free for the next call at once)."""

    def __init__(self, *args: Any, max_workers: int = 2, **kwargs: Any) -> None:
        self._client = kwargs.pop("client", None) or EdgeClient(*args, **kwargs)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="routet2i")

    @classmethod
    def from_config(
        cls, path: str | Path | None = None, *, max_workers: int = 2, **overrides: Any
    ) -> AsyncEdgeClient:
        return cls(client=EdgeClient.from_config(path, **overrides), max_workers=max_workers)

    @property
    def client(self) -> EdgeClient:
        """The synchronous client underneath (policy, state, config)."""
        return self._client

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def generate(
        self, prompt: str, *, progress: Callable[[ProgressEvent], Any] | None = None, **kwargs: Any
    ) -> GenerateResult:
        """Same arguments as `EdgeClient.generate` (except ``cancel``: cancel the task instead)."""
        if "cancel" in kwargs:
            raise UsageError("AsyncEdgeClient.generate: cancel the task instead of passing cancel=")
        loop = asyncio.get_running_loop()
        cb = None
        if progress is not None:
            cb = lambda ev: loop.call_soon_threadsafe(progress, ev)  # noqa: E731
        cancel = threading.Event()
        fn = functools.partial(self._client.generate, prompt, progress=cb, cancel=cancel, **kwargs)
        try:
            return await self._run(fn)
        except asyncio.CancelledError:
            cancel.set()  # the worker thread stops at its next denoising step / stream event
            raise

    async def route(self, prompt: str, **kwargs: Any) -> RouteDecision:
        """Same arguments as `EdgeClient.route` (router inference runs in a worker thread)."""
        return await self._run(functools.partial(self._client.route, prompt, **kwargs))

    async def quota(self) -> QuotaInfo | None:
        """The last quota the cloud reported (may be stale), or None: `EdgeClient.quota` (no network)."""
        return await self._run(self._client.quota)

    async def refresh_quota(self) -> QuotaInfo | None:
        """Ask the cloud for the device's quota now (not charged); None when it cannot be reached."""
        return await self._run(self._client.refresh_quota)

    async def aclose(self) -> None:
        """Wait for the running generations and close, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, functools.partial(self._executor.shutdown, wait=True))
        await loop.run_in_executor(None, self._client.close)

    async def __aenter__(self) -> AsyncEdgeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
