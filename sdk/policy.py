"""The routing policy of the device: cloud iff PRS^ < alpha, with online calibration and quota-aware pacing.

- alpha for the target cloud rate. ``calibration = "static"``: from the router bundle's calibration table
  (cloud rate -> alpha, computed on the training prompts): the row of the largest tabulated rate <= the
  target (`routet2i.alpha_table`). ``"online"`` (the default): the target quantile of PRS^ over the device's
  own recent prompts (a window of numbers, never prompt text), warm-started from the table and blended into
  the window as it fills, with the rate error of past decisions paid back, so the share of prompts the
  router wants in the cloud holds the target on the device's own traffic (ours; see README).
- Quota-aware pacing (ours): with R cloud generations left in the quota period and M requests expected
  before the period ends (from the device's long-run request rate: a burst is not a trend), the device
  targets ``rho_t = min(rho_r, R / M)`` so the quota lasts the whole period; online calibration tracks rho_t.
- ``force="edge"|"cloud"``, ``local_only`` rules (regexes / keywords, or a per-call flag) and a remembered
  quota exhaustion override the router. Precedence: local_only, then force="edge", then whatever keeps a
  wanted cloud route on the device (quota_exhausted, then cloud_unavailable), then force="cloud", then the
  router.

`DeviceState` keeps request counts, the last quota seen and the calibration windows in a small JSON file,
merged under a file lock and written atomically (temp file + rename), so pacing and calibration survive
restarts and several processes of one device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routet2i._errors import UsageError
from routet2i.alpha_table import alpha_at_rate, table_rows
from routet2i.paths import atomic_write

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: threads are locked, processes are not
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:  # pragma: no cover
    from routet2i.config import PolicyConfig

logger = logging.getLogger(__name__)

ROUTES = ("edge", "cloud")
REASONS = ("router", "forced", "quota_exhausted", "cloud_unavailable", "cloud_error", "local_only")
CALIBRATIONS = ("online", "static")
DEFAULT_WINDOW = 500  # PRS^ values kept per router for online calibration
WARMUP = 200  # values after which the online alpha no longer blends in the table's
PAYBACK_PROMPTS = 30  # the rate error owed is paid back over about this many prompts
MAX_PAYBACK = 0.3  # ... shifting the quantile level by at most this much
DEBT_MEMORY = 100  # prompts: an older error fades, so the overshoot after a shift in the device's
# traffic (while the window still holds the old prompts) is not paid back for hundreds of prompts
LEAK = 1.0 - 1.0 / DEBT_MEMORY
PERIOD_SECONDS = {"day": 86400.0, "month": 30 * 86400.0}  # quota period lengths for pacing
_MAX_ROUTERS = 4  # calibration windows kept in the state file (one per router bundle)
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
        try:
            rates, alphas = table_rows(rows)
        except UsageError as exc:
            raise UsageError(f"routing.json: {exc}") from None
        return cls(rates, alphas)

    def alpha(self, rate: float) -> tuple[float, float]:
        """(alpha, keep) for a cloud rate in [0, 1]: the one rule of `routet2i.alpha_table` (the row of the
        largest tabulated rate <= ``rate``, never overspending; rate 0 gives alpha 0; below the first row its
        alpha with ``keep`` = rate / rate_0, the share of its cloud decisions kept)."""
        return alpha_at_rate(self.rates, self.alphas, rate)


@dataclass(frozen=True)
class ModelSpec:
    """One model a router bundle routes to (routing.json ``models``): the edge (cost 0) or a cloud model."""

    name: str
    where: str  # "edge" | "cloud"
    cost: int  # quota units per image (the edge: 0)


def routing_models(routing: dict[str, Any] | None) -> list[ModelSpec]:
    """routing.json's ``models`` (edge first, cost 0; cloud costs positive integers), or for older bundles
    without it ``[edge_model/edge/0, cloud_model/cloud/1]``. A malformed list: one UsageError line."""
    routing = routing or {}
    rows = routing.get("models")
    if rows is None:
        return [
            ModelSpec(str(routing.get("edge_model") or "edge"), "edge", 0),
            ModelSpec(str(routing.get("cloud_model") or "cloud"), "cloud", 1),
        ]
    what = "routing.json: 'models' must be a list of {name, where: edge|cloud, cost}, the edge first (cost 0)"
    if not isinstance(rows, list) or len(rows) < 2:
        raise UsageError(f"{what} and at least one cloud model; got {rows!r}")
    out: list[ModelSpec] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) or not row["name"]:
            raise UsageError(f"{what}; row {i} is {row!r}")
        where, cost = row.get("where"), row.get("cost")
        want_edge = i == 0
        if where != ("edge" if want_edge else "cloud"):
            raise UsageError(f"{what}; row {i} ({row['name']!r}) has where={where!r}")
        if isinstance(cost, bool) or not isinstance(cost, int) or (cost != 0 if want_edge else cost < 1):
            raise UsageError(
                f"{what}; row {i} ({row['name']!r}) has cost={cost!r} "
                f"({'the edge costs 0' if want_edge else 'a positive integer of quota units'})"
            )
        out.append(ModelSpec(row["name"], where, cost))
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise UsageError(f"{what}; model names repeat: {names}")
    return out


@dataclass
class BudgetTable:
    """Budget (cost units per prompt) -> lambda rows from an N-model routing.json, budget ascending."""

    budgets: list[float]
    lambdas: list[float]

    @classmethod
    def from_routing(cls, routing: dict[str, Any]) -> BudgetTable:
        rows = routing.get("budget_table")
        what = (
            "routing.json: an N-model bundle needs 'budget_table': [{budget, lambda}, ...], budget ascending"
        )
        if not isinstance(rows, list) or not rows:
            raise UsageError(f"{what}; got {rows!r}")
        try:
            pairs = [(float(r["budget"]), float(r["lambda"])) for r in rows]
        except (TypeError, KeyError, ValueError):
            raise UsageError(f"{what}; got {rows!r}") from None
        if any(not (math.isfinite(b) and math.isfinite(lam) and b >= 0 and lam >= 0) for b, lam in pairs):
            raise UsageError(f"{what} (finite, >= 0); got {rows!r}")
        if any(b2 < b1 for (b1, _), (b2, _) in zip(pairs, pairs[1:], strict=False)):
            raise UsageError(f"{what}; not ascending: {rows!r}")
        return cls([b for b, _ in pairs], [lam for _, lam in pairs])

    def lam(self, budget: float) -> float:
        """lambda of the row of the largest tabulated budget <= ``budget`` (below the first row: its lambda)."""
        if budget <= 0.0:
            return math.inf
        i = 0
        for j, b in enumerate(self.budgets):
            if b <= budget:
                i = j
        return self.lambdas[i]


def choose(scores: Sequence[float], costs: Sequence[float], lam: float, allowed: Sequence[int]) -> int:
    """argmax over ``allowed`` model indices of scores[m] - lam * costs[m]; a tie goes to the cheaper (then
    the earlier) model; lam inf: the cheapest allowed model."""
    best, best_key = allowed[0], None
    for m in allowed:
        value = -costs[m] if math.isinf(lam) else scores[m] - lam * costs[m]
        key = (value, -costs[m])
        if best_key is None or key > best_key:
            best, best_key = m, key
    return best


def window_lambda(rows: Sequence[Sequence[float]], costs: Sequence[float], level: float) -> float:
    """The smallest lambda at which the mean cost of argmax_m (scores[m] - lambda * cost[m]) over the
    window's model_scores ``rows`` is <= ``level`` (exact: searched over the breakpoints where a prompt's
    choice changes; the mean cost does not increase with lambda)."""
    import numpy as np

    s = np.asarray(rows, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    cands = [np.zeros(1)]
    k = len(costs)
    for i in range(k):
        for j in range(i + 1, k):
            if c[i] != c[j]:
                cands.append((s[:, i] - s[:, j]) / (c[i] - c[j]))
    cand = np.unique(np.concatenate(cands))
    cand = cand[np.isfinite(cand) & (cand >= 0)]
    # evaluated just above each breakpoint, where a tie has gone to the cheaper model
    lams = cand + 1e-9 * (1.0 + cand)

    def mean_cost(lam: float) -> float:
        return float(c[np.argmax(s - lam * c, axis=1)].mean())

    lo, hi = 0, len(lams) - 1
    if mean_cost(0.0) <= level:
        return 0.0
    if mean_cost(float(lams[hi])) > level:
        return float(lams[hi])
    while lo < hi:  # smallest index with mean cost <= level
        mid = (lo + hi) // 2
        if mean_cost(float(lams[mid])) <= level:
            hi = mid
        else:
            lo = mid + 1
    return float(lams[lo])


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
    """What the device remembers between requests and restarts, in one small JSON file (or memory):

    - request counts per hour over the pacing window, the first request's time and a running total (the
      device's long-run request rate, for pacing);
    - the last quota seen and a remembered exhaustion, for one cloud account: ``cloud_key`` (a digest of
      endpoint and token) is stored with them, and a client of another endpoint or token neither uses nor
      erases them;
    - per router (a digest of its routing.json): the last PRS^ values routed (numbers only, never prompt
      text) and the rate error the online calibration is paying back.

    Several processes may share the file: every change is a read-merge-write under an exclusive lock on
    ``<file>.lock`` (`transaction`), and the file is replaced atomically (temp file + rename), so readers
    never see half a file and no process's requests are lost."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        cloud_key: str | None = None,
        *,
        keep_s: float = 7 * 86400.0,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.cloud_key = cloud_key
        self.keep_s = float(keep_s)  # request counts older than this are dropped
        self._lock = threading.RLock()
        self._depth = 0
        self._dirty = False
        self._last_bytes: bytes | None = None  # the file as last read or written by this object
        self._warned = False
        self.request_counts: dict[int, int] = {}  # hour (unix // 3600) -> requests in that hour
        self.first_request_unix = 0.0  # first request this state has seen (0: none)
        self.requests_total = 0  # requests recorded since the state file was created
        self.quota: QuotaInfo | None = None
        self.exhausted_until: float = 0.0  # unix time until which the cloud is known to say "no quota"
        self.calibration: dict[str, dict[str, Any]] = {}  # router key -> {"prs": [...], "error": e}
        self._foreign: dict[str, Any] | None = None  # another account's quota, kept as found
        self._refresh()  # no lock needed to read: the file is only ever replaced whole

    # --- the file

    @contextlib.contextmanager
    def transaction(self) -> Iterator[DeviceState]:
        """Hold the state (threads) and the file lock (processes); on entry the state is re-read when
        another process changed the file, on exit it is written once if anything changed. Re-entrant."""
        with self._lock:
            outer = self._depth == 0
            lock_fd = self._lock_file() if outer else None
            try:
                if outer:
                    self._refresh()
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                    if outer and self._dirty:
                        self._dirty = False
                        self._save()
            finally:
                if lock_fd is not None:
                    os.close(lock_fd)  # closing the descriptor releases the flock

    def _lock_file(self) -> int | None:
        if self.path is None or fcntl is None:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            self._warn(f"could not lock state file {self.path} ({exc}); other processes may overwrite it")
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            self._warn(f"could not lock state file {self.path} ({exc}); other processes may overwrite it")
            return None
        return fd

    def _warn(self, msg: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("%s", msg)

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._warn(f"state file {self.path} unreadable ({exc}); keeping the state in memory")
            return
        if data == self._last_bytes:  # nobody else wrote since: memory is current
            return
        self._last_bytes = data
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            self._load(doc)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            logger.warning("state file %s unreadable (%s); starting afresh", self.path, exc)

    def _load(self, doc: dict[str, Any]) -> None:
        counts = doc.get("request_counts")
        if isinstance(counts, dict):
            self.request_counts = {int(h): int(c) for h, c in counts.items()}
            self.first_request_unix = float(doc.get("first_request_unix", 0.0))
            self.requests_total = int(doc.get("requests_total", sum(self.request_counts.values())))
        else:  # version 1: a list of request times
            times = [float(t) for t in doc.get("request_times", [])]
            self.request_counts = {}
            for t in times:
                self.request_counts[int(t // 3600)] = self.request_counts.get(int(t // 3600), 0) + 1
            self.first_request_unix = min(times, default=0.0)
            self.requests_total = len(times)
        cal = doc.get("calibration")
        self.calibration = {}
        if isinstance(cal, dict):
            for key, entry in cal.items():
                if isinstance(entry, dict):
                    prs = [float(x) for x in entry.get("prs", [])]
                    self.calibration[str(key)] = {"prs": prs, "error": float(entry.get("error", 0.0))}
                    if isinstance(entry.get("scores"), list):  # an N-model router's model_scores rows
                        rows = [[float(x) for x in row] for row in entry["scores"]]
                        self.calibration[str(key)]["scores"] = rows
        q = doc.get("quota")
        if doc.get("cloud_key") != self.cloud_key:
            self.quota, self.exhausted_until = None, 0.0
            self._foreign = {k: doc.get(k) for k in ("quota", "exhausted_until", "cloud_key")}
            if q is not None:
                logger.info("state file %s: quota of another cloud endpoint or token, not used", self.path)
            return
        self._foreign = None
        self.quota = QuotaInfo.from_dict(q) if isinstance(q, dict) else None
        self.exhausted_until = float(doc.get("exhausted_until", 0.0))

    def _document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": 2,
            "request_counts": {str(h): c for h, c in sorted(self.request_counts.items())},
            "first_request_unix": self.first_request_unix,
            "requests_total": self.requests_total,
            "quota": None
            if self.quota is None
            else {**self.quota.to_dict(), "observed_unix": self.quota.observed_unix},
            "exhausted_until": self.exhausted_until,
            "cloud_key": self.cloud_key,
            "calibration": self.calibration,
        }
        if self._foreign is not None and self.quota is None and not self.exhausted_until:
            doc.update(self._foreign)  # nothing of our own account to store: keep the other one's
        return doc

    def _save(self) -> None:
        if self.path is None:
            return
        data = json.dumps(self._document(), separators=(",", ":")).encode()
        try:
            # private (owner only): quota and request history; no fsync: rewritten on every request
            atomic_write(self.path, data, private=True, fsync=False)
            self._last_bytes = data
        except OSError as exc:  # state is an optimisation: never fail a generation because of it
            self._warn(f"could not write state file {self.path}: {exc}")

    # --- requests and quota

    def record_request(self, now: float | None = None) -> None:
        """Count one request (a `route` or `generate` call) at ``now``."""
        now = time.time() if now is None else float(now)
        with self.transaction():
            hour = int(now // 3600)
            self.request_counts[hour] = self.request_counts.get(hour, 0) + 1
            oldest = int((now - self.keep_s) // 3600)
            for h in [h for h in self.request_counts if h < oldest]:
                del self.request_counts[h]
            if not self.first_request_unix or now < self.first_request_unix:
                self.first_request_unix = now
            self.requests_total += 1
            self._dirty = True

    def set_quota(self, quota: QuotaInfo, now: float | None = None) -> None:
        with self.transaction():
            quota.observed_unix = time.time() if now is None else now
            if self.quota is not None and self.quota.observed_unix > quota.observed_unix:
                return  # another process saw a newer one
            self.quota = quota
            if quota.remaining > 0:
                self.exhausted_until = 0.0
            else:  # the last unit is spent: stop asking until the period ends
                self.exhausted_until = exhaustion_end(quota.period_end_unix, quota.observed_unix)
            self._dirty = True

    def mark_exhausted(self, until: float) -> None:
        with self.transaction():
            self.exhausted_until = until
            if self.quota is not None:
                self.quota.remaining = 0
                self.quota.used = max(self.quota.used, self.quota.limit)
            self._dirty = True

    def is_exhausted(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.exhausted_until

    def request_rate(
        self, now: float, window_s: float, min_requests: int, min_span_s: float = 86400.0
    ) -> float | None:
        """The device's long-run request rate (per second), or None while fewer than ``min_requests``
        requests fall in the window.

        Requests of the last ``window_s`` divided by the time observed (since the first request, at most
        the window), where the time observed counts as at least ``min_span_s``: a burst (a demo, a batch job)
        on a young device is not extrapolated to the whole period."""
        start = now - window_s
        n = sum(c for h, c in self.request_counts.items() if (h + 1) * 3600 > start and h * 3600 <= now)
        if n < max(min_requests, 2):
            return None
        observed = now - max(self.first_request_unix, start)
        span = max(observed, min_span_s)
        return n / span if span > 0 else None

    # --- online calibration

    def calibration_window(self, key: str) -> tuple[list[float], float]:
        """(PRS^ values routed, oldest first; rate error owed) of the router ``key``."""
        entry = self.calibration.get(key)
        return (entry["prs"], entry["error"]) if entry else ([], 0.0)

    def observe_prs(self, key: str, prs: float, error: float, window: int) -> None:
        """Append one routed PRS^ to router ``key``'s window (the last ``window`` kept), store its error."""
        with self.transaction():
            entry = self.calibration.pop(key, None) or {"prs": [], "error": 0.0}
            entry["prs"].append(float(prs))
            del entry["prs"][:-window]
            entry["error"] = float(error)
            self.calibration[key] = entry  # most recently used last
            for old in list(self.calibration)[:-_MAX_ROUTERS]:
                del self.calibration[old]
            self._dirty = True

    def model_window(self, key: str) -> tuple[list[list[float]], float]:
        """(model_scores rows routed, oldest first; cost error owed) of the N-model router ``key``."""
        entry = self.calibration.get(key)
        return (entry.get("scores", []), entry["error"]) if entry else ([], 0.0)

    def observe_scores(self, key: str, scores: Sequence[float], error: float, window: int) -> None:
        """Append one routed model_scores row (rounded to 6 decimals, numbers only) to router ``key``'s
        window (the last ``window`` kept) and store its cost error."""
        with self.transaction():
            entry = self.calibration.pop(key, None) or {"prs": [], "error": 0.0}
            rows = entry.setdefault("scores", [])
            rows.append([round(float(x), 6) for x in scores])
            del rows[:-window]
            entry["error"] = float(error)
            self.calibration[key] = entry
            for old in list(self.calibration)[:-_MAX_ROUTERS]:
                del self.calibration[old]
            self._dirty = True


def router_key(routing: dict[str, Any]) -> str:
    """Which router a calibration window belongs to: a digest of its routing.json."""
    return hashlib.sha256(json.dumps(routing, sort_keys=True, default=str).encode()).hexdigest()[:16]


def window_quantile(sorted_prs: Sequence[float], rate: float) -> float:
    """alpha with a ``rate`` share of the (sorted) window below it: halfway between the neighbouring values,
    so exactly round(rate * n) values lie below. rate 0: 0 (PRS^ is never negative); rate 1: above all."""
    n = len(sorted_prs)
    if rate <= 0.0:
        return 0.0
    if rate >= 1.0:
        return math.nextafter(max(sorted_prs[-1], 1.0), math.inf)
    pos = min(max(rate * n - 0.5, 0.0), n - 1.0)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return sorted_prs[lo] + (pos - lo) * (sorted_prs[hi] - sorted_prs[lo])


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
    wanted_cloud: bool | None = None  # the router's own wish (None: forced or local-only, router not asked)
    calibration: str = "static"  # how alpha was found: "online" | "static"
    observed: int = 0  # PRS^ values in the online calibration window when deciding
    # N-model bundles (None/[] for a 2-model one):
    model: str | None = None  # the model chosen (edge or cloud model name)
    cost: float | None = None  # its cost in quota units (the edge: 0)
    lambda_: float | None = None  # the cost price in force: argmax of model_scores - lambda * cost
    scores: list[float] | None = None  # the router's model_scores (routing.json ``models`` order)


class RoutingPolicy:
    """Decision logic over PRS^, the calibration (table or online), the pacing state and the overrides."""

    def __init__(
        self,
        routing: dict[str, Any] | None,
        target_cloud_rate: float | None = None,
        *,
        pacing: bool = True,
        pacing_window_s: float = 7 * 86400.0,
        pacing_min_requests: int = 5,
        pacing_min_span_s: float | None = None,
        calibration: str = "online",
        calibration_window: int = DEFAULT_WINDOW,
        local_only: LocalOnlyRules | None = None,
        state: DeviceState | None = None,
        rng: random.Random | None = None,
        budget: float | None = None,
    ) -> None:
        """``target_cloud_rate``: a 2-model router's cloud share; ``budget``: average cloud cost units per
        prompt (a 2-model router: divided by its cloud model's cost; an N-model router: the parameter, and
        ``target_cloud_rate`` given alone is read as a budget too). ``self.target_rate`` holds the share
        (2-model) or the budget (N-model)."""
        self.routing = routing or {}
        self.models = routing_models(routing)
        self.costs = [float(m.cost) for m in self.models]
        self.nmodel = sum(m.where == "cloud" for m in self.models) >= 2 and routing is not None
        self.budget_table = BudgetTable.from_routing(self.routing) if self.nmodel else None
        self.table = (
            CalibrationTable.from_routing(self.routing) if routing is not None and not self.nmodel else None
        )
        # the units one cloud generation costs (a 2-model router: its one cloud model's cost, usually 1)
        self.unit_cost = 1.0 if self.nmodel else self.costs[1]
        if budget is not None and target_cloud_rate is not None and budget != target_cloud_rate:
            raise UsageError(
                f"budget={budget!r} and target_cloud_rate={target_cloud_rate!r}: the same setting; give one"
            )
        if self.nmodel:  # budget in units; target_cloud_rate alone means a budget too
            b = budget if budget is not None else target_cloud_rate
            if b is None:
                b = self.routing.get("default_budget")
            top = max(self.costs)
            if b is not None and not (0.0 <= float(b) <= top):
                raise UsageError(
                    f"budget={b!r}: must be in [0, {top:g}] (average cloud cost units per prompt; the "
                    f"models cost {', '.join(f'{m.name}={m.cost}' for m in self.models)})"
                )
            target_cloud_rate = None if b is None else float(b)
        else:
            if budget is not None:  # units -> the share of prompts in the cloud
                if not (0.0 <= float(budget) <= self.unit_cost):
                    raise UsageError(
                        f"budget={budget!r}: must be in [0, {self.unit_cost:g}] (this router's one cloud "
                        f"model {self.models[1].name!r} costs {self.unit_cost:g} units per image)"
                    )
                target_cloud_rate = float(budget) / self.unit_cost
            if target_cloud_rate is None and routing is not None:
                target_cloud_rate = routing.get("target_rate")
            if target_cloud_rate is not None and not (0.0 <= float(target_cloud_rate) <= 1.0):
                raise UsageError(f"target_cloud_rate={target_cloud_rate!r}: must be in [0, 1]")
        if calibration not in CALIBRATIONS:
            raise UsageError(f"calibration={calibration!r}: must be one of {', '.join(CALIBRATIONS)}")
        if not isinstance(calibration_window, int) or calibration_window < 1:
            raise UsageError(f"calibration_window={calibration_window!r}: must be an integer >= 1")
        self.target_rate = None if target_cloud_rate is None else float(target_cloud_rate)
        self.default_alpha = (
            None if routing is None or routing.get("alpha") is None else float(routing["alpha"])
        )
        self.pacing = pacing
        self.pacing_window_s = pacing_window_s
        self.pacing_min_requests = pacing_min_requests
        self.pacing_min_span_s = pacing_min_span_s
        self.calibration = calibration
        self.calibration_window = calibration_window
        self.router_key = router_key(routing) if routing is not None else None
        self.local_only = local_only or LocalOnlyRules()
        self.state = state or DeviceState(None)
        self._rng = rng or random.Random()

    @classmethod
    def from_config(
        cls,
        routing: dict[str, Any] | None,
        config: PolicyConfig,
        *,
        state: DeviceState | None = None,
        rng: random.Random | None = None,
    ) -> RoutingPolicy:
        """The policy a ``[policy]`` section (`routet2i.config.PolicyConfig`) describes, for ``routing``
        (the router bundle's routing.json; None: no router)."""
        return cls(
            routing,
            config.target_cloud_rate,
            pacing=config.pacing,
            pacing_window_s=config.pacing_window_s,
            pacing_min_requests=config.pacing_min_requests,
            pacing_min_span_s=config.pacing_min_span_s,
            calibration=config.calibration,
            calibration_window=config.calibration_window,
            local_only=LocalOnlyRules(config.local_only_patterns, config.local_only_keywords),
            state=state,
            rng=rng,
            budget=config.budget,
        )

    def paced_rate(self, now: float) -> tuple[float | None, float | None]:
        """(rho_t, M): the pacing target and the expected number of requests left in the period."""
        rho = self.target_rate
        if rho is None or not self.pacing:
            return rho, None
        q = self.state.quota
        if q is None or q.period_end_unix <= 0 or not q.current(now):
            return rho, None  # no period end known (or stale quota): nothing to pace against
        min_span = self.pacing_min_span_s
        if min_span is None:  # a burst is not a trend: the rate spans at least one period (or the window)
            min_span = min(PERIOD_SECONDS.get(q.period, 86400.0), self.pacing_window_s)
        rate = self.state.request_rate(now, self.pacing_window_s, self.pacing_min_requests, min_span)
        if rate is None:
            return rho, None
        m = rate * (q.period_end_unix - now)
        if m <= 0:
            return rho, m
        return min(rho, q.remaining / (m * self.unit_cost)), m

    def alpha_for(self, rate: float | None) -> tuple[float | None, float, int]:
        """(alpha, keep, observed) for a cloud rate: the table's answer, blended into the online one.

        Online: alpha is the quantile of the router's recent PRS^ values (the window) at ``rate`` plus the
        rate error still owed divided by `PAYBACK_PROMPTS` (so the long-run rate matches, not only its
        expectation), weighted by n / `WARMUP` against the table's alpha until `WARMUP` values are seen."""
        if rate is None:
            return self.default_alpha, 1.0, 0
        a_tab, keep = self.table.alpha(rate) if self.table is not None else (self.default_alpha, 1.0)
        if self.calibration != "online" or self.router_key is None:
            return a_tab, keep, 0
        prs, error = self.state.calibration_window(self.router_key)
        n = len(prs)
        if n == 0:
            return a_tab, keep, 0
        level = min(max(rate + max(-MAX_PAYBACK, min(MAX_PAYBACK, error / PAYBACK_PROMPTS)), 0.0), 1.0)
        if rate <= 0.0:
            level = 0.0  # a zero target is exact: nothing goes to the cloud
        a_win = window_quantile(sorted(prs), level)
        w = min(1.0, n / min(WARMUP, self.calibration_window))
        if a_tab is None or w >= 1.0:
            return a_win, 1.0, n
        return (1.0 - w) * a_tab + w * a_win, (1.0 - w) * keep + w, n

    def decide(
        self,
        prompt: str,
        prs: float | None,
        *,
        force: str | None = None,
        local_only: bool = False,
        cloud_configured: bool = True,
        cloud_open: bool = True,
        cloud_allowed: bool = True,
        now: float | None = None,
        model_scores: Sequence[float] | None = None,
        allowed: Sequence[str] | None = None,
    ) -> Decision:
        """Decide edge or cloud. ``cloud_open`` False: the circuit breaker is open (cloud known down).
        ``cloud_allowed`` False: the caller's model list leaves the cloud out (reason "forced").
        N-model routers: ``model_scores`` (the router's, ``self.models`` order), ``allowed`` (the cloud
        model names the caller allows; None: all) and ``force`` may also name a model (`decide_models`).
        Pure: nothing is recorded (`route` records)."""
        if self.nmodel:
            return self.decide_models(
                prompt, model_scores, prs=prs, force=force, local_only=local_only,
                cloud_configured=cloud_configured, cloud_open=cloud_open, allowed=allowed, now=now,
            )  # fmt: skip
        if force is not None and force not in ROUTES:
            raise UsageError(f"force={force!r}: must be one of 'edge', 'cloud' or None")
        now = time.time() if now is None else now
        exhausted = self.state.is_exhausted(now)
        # with the quota spent, pacing says 0; decide with rho_r so the reason can say quota_exhausted
        rho_t, m = (self.target_rate, None) if exhausted else self.paced_rate(now)
        alpha, keep, observed = self.alpha_for(rho_t)
        calibration = "online" if observed else "static"

        def make(route: str, reason: str, wish: bool | None = None, **details: Any) -> Decision:
            return Decision(
                route, reason, prs, alpha, self.target_rate, rho_t, m, details, wish, calibration, observed
            )

        if local_only or self.local_only.matches(prompt):
            return make("edge", "local_only", per_call=bool(local_only))
        if force == "edge" or not cloud_allowed:
            return make("edge", "forced")
        wanted: bool | None = None
        if force == "cloud":
            reason = "forced"
        else:
            if prs is None or alpha is None:
                raise UsageError("no router bundle configured: pass router=... or force='edge'|'cloud'")
            wanted = prs < alpha and (keep >= 1.0 or self._rng.random() < keep)
            reason = "router"
            if not wanted:
                return make("edge", "router", wanted)
        # the route wanted is the cloud
        if exhausted:
            return make("edge", "quota_exhausted", wanted, wanted=reason, until=self.state.exhausted_until)
        if not cloud_configured:
            return make(
                "edge", "cloud_unavailable", wanted, wanted=reason, cause="no cloud endpoint configured"
            )
        if not cloud_open:
            return make("edge", "cloud_unavailable", wanted, wanted=reason, cause="circuit breaker open")
        return make("cloud", reason, wanted)

    # --- N-model routers

    def lambda_for(self, budget: float | None) -> tuple[float, int]:
        """(lambda, observed) for a (paced) budget: the budget table's lambda, blended (n / `WARMUP`) into
        the window's: the smallest lambda at which the argmax over the recent model_scores rows spends at
        most the budget plus the cost error owed / `PAYBACK_PROMPTS` (so the long-run spend holds it)."""
        assert self.budget_table is not None
        if budget is None or budget <= 0.0:
            return math.inf, 0  # nothing to the cloud
        lam_tab = self.budget_table.lam(budget)
        if self.calibration != "online" or self.router_key is None:
            return lam_tab, 0
        rows, error = self.state.model_window(self.router_key)
        n = len(rows)
        if n == 0:
            return lam_tab, 0
        top = max(self.costs)
        shift = max(-MAX_PAYBACK * top, min(MAX_PAYBACK * top, error / PAYBACK_PROMPTS))
        lam_win = window_lambda(rows, self.costs, min(max(budget + shift, 0.0), top))
        w = min(1.0, n / min(WARMUP, self.calibration_window))
        return (1.0 - w) * lam_tab + w * lam_win, n

    def model_index(self, name: str) -> int | None:
        for i, m in enumerate(self.models):
            if m.name == name:
                return i
        return None

    def decide_models(
        self,
        prompt: str,
        model_scores: Sequence[float] | None,
        *,
        prs: float | None = None,
        force: str | None = None,
        local_only: bool = False,
        cloud_configured: bool = True,
        cloud_open: bool = True,
        allowed: Sequence[str] | None = None,
        now: float | None = None,
    ) -> Decision:
        """An N-model decision: argmax over the allowed models (the edge always) of model_scores[m] -
        lambda * cost[m], lambda for the (paced) budget. ``force``: "edge", "cloud" (the best allowed cloud
        model by the same rule) or a model's name. Precedence as `decide`."""
        names = [m.name for m in self.models]
        if force is not None and force not in ROUTES and force not in names:
            raise UsageError(
                f"force={force!r}: must be 'edge', 'cloud', a model name ({', '.join(names)}) or None"
            )
        if allowed is None:
            cloud_idx = list(range(1, len(names)))
        else:
            unknown = sorted(set(allowed) - set(names))
            if unknown:
                raise UsageError(f"models: unknown model(s) {unknown}; this router knows {', '.join(names)}")
            cloud_idx = [i for i in range(1, len(names)) if names[i] in set(allowed)]
        now = time.time() if now is None else now
        exhausted = self.state.is_exhausted(now)
        budget_t, m = (self.target_rate, None) if exhausted else self.paced_rate(now)
        lam, observed = self.lambda_for(budget_t)
        calibration = "online" if observed else "static"
        scores = None if model_scores is None else [float(x) for x in model_scores]
        if scores is not None and len(scores) != len(names):
            raise UsageError(
                f"model_scores: {len(scores)} values for {len(names)} models ({', '.join(names)})"
            )

        def make(route: str, reason: str, idx: int, wish: bool | None = None, **details: Any) -> Decision:
            return Decision(
                route, reason, prs, None, self.target_rate, budget_t, m, details, wish, calibration, observed,
                model=names[idx], cost=self.costs[idx], lambda_=lam, scores=scores,
            )  # fmt: skip

        if local_only or self.local_only.matches(prompt):
            return make("edge", "local_only", 0, per_call=bool(local_only))
        if force == "edge" or force == names[0] or (force is None and allowed is not None and not cloud_idx):
            return make("edge", "forced", 0)
        wanted: bool | None = None
        if force is not None and force != "cloud":
            idx, reason = names.index(force), "forced"
        elif force == "cloud":
            if not cloud_idx:
                return make("edge", "forced", 0)
            reason = "forced"
            if scores is None:
                idx = min(cloud_idx, key=lambda i: (self.costs[i], i))  # no router: the cheapest
            else:
                idx = choose(scores, self.costs, 0.0 if math.isinf(lam) else lam, cloud_idx)
        else:
            if scores is None:
                raise UsageError("no router bundle configured: pass router=... or force='edge'|'cloud'")
            idx = choose(scores, self.costs, lam, [0, *cloud_idx])
            wanted, reason = idx != 0, "router"
            if not wanted:
                return make("edge", "router", 0, wanted, wanted_cost=0.0)
        wish = {"wanted": reason, "wanted_model": names[idx]}
        cost = {"wanted_cost": self.costs[idx]} if wanted is not None else {}
        if exhausted:
            return make(
                "edge", "quota_exhausted", 0, wanted, **wish, **cost, until=self.state.exhausted_until
            )
        if not cloud_configured:
            return make(
                "edge", "cloud_unavailable", 0, wanted, **wish, **cost, cause="no cloud endpoint configured"
            )
        if not cloud_open:
            return make("edge", "cloud_unavailable", 0, wanted, **wish, **cost, cause="circuit breaker open")
        return make("cloud", reason, idx, wanted, **cost)

    def _observe_models(self, decision: Decision) -> None:
        if self.calibration != "online" or self.router_key is None or decision.wanted_cloud is None:
            return
        if decision.scores is None or not all(math.isfinite(x) for x in decision.scores):
            return
        if decision.paced_rate is None:
            return
        with self.state.transaction():
            rows, error = self.state.model_window(self.router_key)
            weight = min(1.0, len(rows) / min(WARMUP, self.calibration_window))
            spent = float(decision.details.get("wanted_cost", 0.0))
            error = LEAK * error + weight * (decision.paced_rate - spent)
            self.state.observe_scores(self.router_key, decision.scores, error, self.calibration_window)

    def observe(self, decision: Decision) -> None:
        """Online calibration: add a router decision's PRS^ to the window and its rate error to the debt."""
        if self.nmodel:
            self._observe_models(decision)
            return
        if self.calibration != "online" or self.router_key is None or decision.wanted_cloud is None:
            return
        if decision.prs is None or not math.isfinite(decision.prs) or decision.paced_rate is None:
            return
        with self.state.transaction():
            prs, error = self.state.calibration_window(self.router_key)
            weight = min(1.0, len(prs) / min(WARMUP, self.calibration_window))  # no debt for the table's
            error = LEAK * error + weight * (decision.paced_rate - float(decision.wanted_cloud))
            self.state.observe_prs(self.router_key, decision.prs, error, self.calibration_window)

    def route(self, prompt: str, prs: float | None, *, now: float | None = None, **kwargs: Any) -> Decision:
        """`decide`, counting the request for pacing and the PRS^ for calibration, as one transaction of
        the state (so processes sharing the state file see each other's requests in order)."""
        now = time.time() if now is None else now
        with self.state.transaction():
            self.state.record_request(now)
            decision = self.decide(prompt, prs, now=now, **kwargs)
            self.observe(decision)
        return decision
