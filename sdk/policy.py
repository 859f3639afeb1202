"""The routing policy of the device: cloud iff PRS^ < alpha, with quota-aware pacing.

- alpha comes from the router bundle's calibration table (cloud rate -> alpha) for the target cloud rate:
  the row of the largest tabulated rate <= the target (ROUTET2I.md section 4).
- Quota-aware pacing (ours): with R cloud generations left in the quota period and M requests expected
  before the period ends (from the device's own request rate), the device targets
  ``rho_t = min(rho_r, R / M)`` so the quota lasts the whole period.
- ``force="edge"|"cloud"``, ``local_only`` rules (regexes / keywords, or a per-call flag) and a remembered
  quota exhaustion override the router. Precedence: local_only, then force="edge", then whatever keeps a
  wanted cloud route on the device (quota_exhausted, then cloud_unavailable), then force="cloud", then the
  router.

`DeviceState` keeps request times and the last quota seen in a small JSON file, written atomically
(temp file + rename), so pacing survives restarts.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routet2i._errors import UsageError

logger = logging.getLogger(__name__)

ROUTES = ("edge", "cloud")
REASONS = ("router", "forced", "quota_exhausted", "cloud_unavailable", "cloud_error", "local_only")
_MAX_TIMES = 512  # request times kept in the state file
EXHAUSTED_RECHECK_S = 3600.0  # without a period end (period "total"), ask the cloud again after this long


def exhaustion_end(period_end_unix: float, now: float) -> float:
    """Until when a quota exhaustion is remembered: the period end, or an hour for periods without one."""
    return float(period_end_unix) if period_end_unix > now else now + EXHAUSTED_RECHECK_S


@dataclass
class CalibrationTable:
    """Cloud rate -> alpha rows from routing.json, sorted by rate."""

    rates: list[float]  # cloud rates, ascending
    alphas: list[float]  # alpha for each rate (non-decreasing)

    @classmethod
    def from_routing(cls, routing: dict[str, Any]) -> CalibrationTable:
        rows = routing.get("calibration")
        if not isinstance(rows, list) or not rows:
            raise UsageError("routing.json: 'calibration' must be a non-empty list of {rate, alpha} rows")
        pairs = []
        for row in rows:
            try:
                pairs.append((float(row["rate"]), float(row["alpha"])))
            except (KeyError, TypeError, ValueError):
                raise UsageError(
                    f"routing.json: calibration row {row!r} needs numeric 'rate' and 'alpha'"
                ) from None
        pairs.sort()
        return cls([p[0] for p in pairs], [p[1] for p in pairs])

    def alpha(self, rate: float) -> tuple[float, float]:
        """(alpha, keep) for a cloud rate in [0, 1].

        alpha of the largest tabulated rate <= ``rate`` (as `routet2i.training.calibration.alpha_from_table`:
        never overspends the budget). Below the first row, which the table cannot resolve, the first row's
        alpha is used and only a ``keep`` = rate / rate_0 share of its cloud decisions is kept, so the expected
        cloud rate still matches. ``rate`` 0 gives alpha 0 (PRS^ is never negative): nothing goes to the cloud.
        """
        if math.isnan(rate) or not (0.0 <= rate <= 1.0):
            raise UsageError(f"cloud rate={rate!r}: must be in [0, 1]")
        if rate <= 0.0:
            return 0.0, 1.0
        r, a = self.rates, self.alphas
        if rate < r[0] - 1e-12:
            return a[0], (rate / r[0])
        i = bisect.bisect_right(r, rate + 1e-12)
        return a[i - 1], 1.0


class LocalOnlyRules:
    """Regexes and keywords that keep a prompt on the device."""

    def __init__(self, patterns: Sequence[str] = (), keywords: Sequence[str] = ()) -> None:
        self.patterns = []
        for p in patterns:
            try:
                self.patterns.append(re.compile(p))
            except re.error as exc:
                raise UsageError(
                    f"local_only_patterns: {p!r} is not a valid regular expression: {exc}"
                ) from None
        words = [re.escape(k.strip()) for k in keywords if k.strip()]
        self.keywords = re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE) if words else None

    def matches(self, prompt: str) -> bool:
        if self.keywords is not None and self.keywords.search(prompt):
            return True
        return any(p.search(prompt) for p in self.patterns)


@dataclass
class QuotaInfo:
    """The device's cloud quota as last reported by the cloud."""

    limit: int  # units per period
    used: int  # units used in the current period
    remaining: int  # units left in the current period
    period: str  # "day" | "month" | "total"
    period_end_unix: int  # end of the current period (0: none, e.g. "total")
    device_id: str = ""  # the device the token belongs to
    observed_unix: float = 0.0  # when the device learnt this

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "limit": self.limit,
            "used": self.used,
            "remaining": self.remaining,
            "period": self.period,
            "period_end_unix": self.period_end_unix,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuotaInfo:
        return cls(
            limit=int(d.get("limit", 0)),
            used=int(d.get("used", 0)),
            remaining=int(d.get("remaining", 0)),
            period=str(d.get("period", "")),
            period_end_unix=int(d.get("period_end_unix", 0)),
            device_id=str(d.get("device_id", "")),
            observed_unix=float(d.get("observed_unix", 0.0)),
        )

    def current(self, now: float) -> bool:
        """Still describes the running period (a passed period end means the numbers are stale)."""
        return self.period_end_unix <= 0 or now < self.period_end_unix


class DeviceState:
    """Request times, the last quota seen and a remembered exhaustion; persisted to ``path`` (or memory).

    The quota and the exhaustion belong to one cloud account: ``cloud_key`` (a digest of endpoint and token)
    is stored with them, and a state file written for another endpoint or token keeps its request times
    (the device's own rate) but not that account's quota."""

    def __init__(self, path: str | os.PathLike[str] | None, cloud_key: str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.cloud_key = cloud_key
        self._lock = threading.Lock()
        self.request_times: list[float] = []
        self.quota: QuotaInfo | None = None
        self.exhausted_until: float = 0.0  # unix time until which the cloud is known to say "no quota"
        self._load()

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text())
            self.request_times = [float(t) for t in doc.get("request_times", [])][-_MAX_TIMES:]
            if self.cloud_key is not None and doc.get("cloud_key") != self.cloud_key:
                logger.info("state file %s: quota of another cloud endpoint or token, not used", self.path)
                return
            q = doc.get("quota")
            self.quota = QuotaInfo.from_dict(q) if isinstance(q, dict) else None
            self.exhausted_until = float(doc.get("exhausted_until", 0.0))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            logger.warning("state file %s unreadable (%s); starting afresh", self.path, exc)

    def _save(self) -> None:
        if self.path is None:
            return
        doc = {
            "version": 1,
            "request_times": self.request_times[-_MAX_TIMES:],
            "quota": None
            if self.quota is None
            else {**self.quota.to_dict(), "observed_unix": self.quota.observed_unix},
            "exhausted_until": self.exhausted_until,
            "cloud_key": self.cloud_key,
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(doc, f)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:  # state is an optimisation: never fail a generation because of it
            logger.warning("could not write state file %s: %s", self.path, exc)

    def record_request(self, now: float | None = None) -> None:
        with self._lock:
            self.request_times.append(time.time() if now is None else now)
            del self.request_times[:-_MAX_TIMES]
            self._save()

    def set_quota(self, quota: QuotaInfo, now: float | None = None) -> None:
        with self._lock:
            quota.observed_unix = time.time() if now is None else now
            self.quota = quota
            if quota.remaining > 0:
                self.exhausted_until = 0.0
            else:  # the last unit is spent: stop asking until the period ends
                self.exhausted_until = exhaustion_end(quota.period_end_unix, quota.observed_unix)
            self._save()

    def mark_exhausted(self, until: float) -> None:
        with self._lock:
            self.exhausted_until = until
            if self.quota is not None:
                self.quota.remaining = 0
                self.quota.used = max(self.quota.used, self.quota.limit)
            self._save()

    def is_exhausted(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.exhausted_until

    def request_rate(
        self, now: float, window_s: float, min_requests: int, min_span_s: float = 3600.0
    ) -> float | None:
        """Requests per second over the window, or None while too few requests were seen.

        The observed span counts as at least ``min_span_s``, so a burst of requests (a demo, a batch job)
        is not extrapolated to the whole period."""
        times = [t for t in self.request_times if now - window_s <= t <= now]
        if len(times) < max(min_requests, 2):
            return None
        span = max(now - times[0], min_span_s)
        return len(times) / span if span > 0 else None


@dataclass
class Decision:
    """Where one prompt goes and why."""

    route: str  # "edge" | "cloud"
    reason: str  # one of REASONS
    prs: float | None  # PRS^ from the router (None when no router ran)
    alpha: float | None  # threshold in force for this decision
    target_rate: float | None  # the configured cloud rate rho_r
    paced_rate: float | None  # rho_t = min(rho_r, R/M) actually used (== target_rate without pacing)
    expected_requests: float | None = None  # M, when pacing had an estimate
    details: dict[str, Any] = field(default_factory=dict)  # extra facts for the decision log


class RoutingPolicy:
    """Pure decision logic over PRS^, the calibration table, the pacing state and the overrides."""

    def __init__(
        self,
        routing: dict[str, Any] | None,
        target_cloud_rate: float | None = None,
        *,
        pacing: bool = True,
        pacing_window_s: float = 7 * 86400.0,
        pacing_min_requests: int = 5,
        pacing_min_span_s: float = 3600.0,
        local_only: LocalOnlyRules | None = None,
        state: DeviceState | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.routing = routing or {}
        self.table = CalibrationTable.from_routing(self.routing) if routing is not None else None
        if target_cloud_rate is None and routing is not None:
            target_cloud_rate = routing.get("target_rate")
        if target_cloud_rate is not None and not (0.0 <= float(target_cloud_rate) <= 1.0):
            raise UsageError(f"target_cloud_rate={target_cloud_rate!r}: must be in [0, 1]")
        self.target_rate = None if target_cloud_rate is None else float(target_cloud_rate)
        self.default_alpha = (
            None if routing is None or routing.get("alpha") is None else float(routing["alpha"])
        )
        self.pacing = pacing
        self.pacing_window_s = pacing_window_s
        self.pacing_min_requests = pacing_min_requests
        self.pacing_min_span_s = pacing_min_span_s
        self.local_only = local_only or LocalOnlyRules()
        self.state = state or DeviceState(None)
        self._rng = rng or random.Random()

    def paced_rate(self, now: float) -> tuple[float | None, float | None]:
        """(rho_t, M): the pacing target and the expected number of requests left in the period."""
        rho = self.target_rate
        if rho is None or not self.pacing:
            return rho, None
        q = self.state.quota
        if q is None or q.period_end_unix <= 0 or not q.current(now):
            return rho, None  # no period end known (or stale quota): nothing to pace against
        rate = self.state.request_rate(
            now, self.pacing_window_s, self.pacing_min_requests, self.pacing_min_span_s
        )
        if rate is None:
            return rho, None
        m = rate * (q.period_end_unix - now)
        if m <= 0:
            return rho, m
        return min(rho, q.remaining / m), m

    def decide(
        self,
        prompt: str,
        prs: float | None,
        *,
        force: str | None = None,
        local_only: bool = False,
        cloud_configured: bool = True,
        cloud_open: bool = True,
        now: float | None = None,
    ) -> Decision:
        """Decide edge or cloud. ``cloud_open`` False: the circuit breaker is open (cloud known down)."""
        if force is not None and force not in ROUTES:
            raise UsageError(f"force={force!r}: must be one of 'edge', 'cloud' or None")
        now = time.time() if now is None else now
        exhausted = self.state.is_exhausted(now)
        # with the quota spent, pacing says 0; decide with rho_r so the reason can say quota_exhausted
        rho_t, m = (self.target_rate, None) if exhausted else self.paced_rate(now)
        alpha, keep = (None, 1.0)
        if self.table is not None and rho_t is not None:
            alpha, keep = self.table.alpha(rho_t)
        elif self.default_alpha is not None:
            alpha = self.default_alpha

        def make(route: str, reason: str, **details: Any) -> Decision:
            return Decision(route, reason, prs, alpha, self.target_rate, rho_t, m, details)

        if local_only or self.local_only.matches(prompt):
            return make("edge", "local_only", per_call=bool(local_only))
        if force == "edge":
            return make("edge", "forced")
        if force == "cloud":
            want_cloud, reason = True, "forced"
        else:
            if prs is None or alpha is None:
                raise UsageError("no router bundle configured: pass router=... or force='edge'|'cloud'")
            want_cloud = prs < alpha and (keep >= 1.0 or self._rng.random() < keep)
            reason = "router"
            if not want_cloud:
                return make("edge", "router")
        # the route wanted is the cloud
        if exhausted:
            return make("edge", "quota_exhausted", wanted=reason, until=self.state.exhausted_until)
        if not cloud_configured:
            return make("edge", "cloud_unavailable", wanted=reason, cause="no cloud endpoint configured")
        if not cloud_open:
            return make("edge", "cloud_unavailable", wanted=reason, cause="circuit breaker open")
        return make("cloud", reason)
