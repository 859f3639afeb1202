"""`routet2i.toml`: where the device finds its bundles, its cloud endpoint and its routing policy.

Precedence, lowest to highest: the dataclass defaults, the TOML file, environment variables
(``ROUTET2I_<FIELD>``, e.g. ``ROUTET2I_CLOUD=host:443``), then keyword arguments given in code. The device
token is read from an environment variable only (``ROUTET2I_TOKEN`` unless ``token_env`` names another):
a token written in the file is refused, so it never lands in a repository or a backup by accident.

`ClientConfig` is nested as the file is: the bundle keys are its own fields, and each ``[section]`` is a
dataclass that checks its own fields (`CloudConfig`, `PolicyConfig`, `LogConfig`, `GenerationConfig`). The
flat names (``deadline_s``, ``target_cloud_rate``, ...; `FLAT_FIELDS`) are the TOML keys inside their
section, the ``ROUTET2I_*`` variables and the `EdgeClient` keywords, and still build and read a config.

Example::

    router = "bundles/router"            # relative paths are relative to this file
    edge = "bundles/edge"

    [cloud]
    endpoint = "images.example.com:443"
    tls = true
    deadline_s = 90

    [policy]
    target_cloud_rate = 0.3
    calibration = "online"               # or "static": the bundle's table only
    local_only_keywords = ["passport", "medical"]

    [generation]
    scheduler = "dpm++"                  # or "ddim", "euler", "pndm"; unset: the edge bundle's own

    [log]
    decision_log = "~/.local/state/routet2i/decisions.jsonl"
    save_prompt = false                  # result.save() leaves the prompt out of the image's metadata
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routet2i._errors import UsageError

logger = logging.getLogger(__name__)

ENV_PREFIX = "ROUTET2I_"
# Edge schedulers by short name (routet2i.schedulers.ALIASES; "pnm" is a common misspelling of pndm).
SCHEDULER_NAMES = ("dpm++", "ddim", "euler", "pndm", "pnm", "plms")
DEFAULT_TOKEN_ENV = "ROUTET2I_TOKEN"


def default_state_dir() -> Path:
    """Where the device keeps its pacing state and decision log unless configured otherwise."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "routet2i"


def _check_seconds(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{name}={value!r}: must be a positive number of seconds")


def _check_count(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name}={value!r}: must be an integer >= {low}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise UsageError(f"{name}={value!r}: must be true or false")


def _check_strings(name: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{name}={value!r}: must be a list of strings")


@dataclass(eq=False)
class CloudConfig:
    """``[cloud]``: the endpoint and how `routet2i.cloud_client.CloudClient` talks to it.

    Compatibility with the flat field it replaces (``ClientConfig.cloud`` was the endpoint string): a
    `CloudConfig` is true when an endpoint is set and compares equal to its endpoint string."""

    endpoint: str | None = None  # "host:port" of the cloud endpoint; None: edge only (TOML `endpoint`,
    # environment ROUTET2I_CLOUD, EdgeClient(cloud=...))
    tls: bool = False  # TLS channel (system roots unless ca_cert is set)
    ca_cert: str | None = None  # PEM file with the CA that signed the server's certificate
    client_cert: str | None = None  # PEM client certificate for mTLS (with client_key)
    client_key: str | None = None  # PEM client key for mTLS
    token: str | None = field(default=None, repr=False)  # bearer token; from the environment (token_env)
    # only, never from the file
    token_env: str = DEFAULT_TOKEN_ENV  # environment variable holding the token
    deadline_s: float = 120.0  # total time budget of one cloud generation, retries included
    attempt_timeout_s: float | None = None  # per-attempt timeout; None: whatever is left of the deadline
    retries: int = 3  # extra attempts on UNAVAILABLE / DEADLINE_EXCEEDED (same request_id)
    backoff_initial_s: float = 0.2  # first backoff; doubles per attempt, full jitter
    backoff_max_s: float = 5.0  # backoff cap
    breaker_failures: int = 1  # consecutive failed calls that open the circuit breaker
    breaker_reset_s: float = 30.0  # how long the breaker stays open before one trial call
    stream: bool = True  # use GenerateStream (progress events) when a progress callback is given

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UsageError naming the field, its value and what is allowed."""
        for name in ("deadline_s", "backoff_initial_s", "backoff_max_s", "breaker_reset_s"):
            _check_seconds(name, getattr(self, name))
        if self.attempt_timeout_s is not None and not self.attempt_timeout_s > 0:
            raise UsageError(f"attempt_timeout_s={self.attempt_timeout_s!r}: must be > 0 or unset")
        _check_count("retries", self.retries, 0)
        _check_count("breaker_failures", self.breaker_failures, 1)
        if (self.client_cert is None) != (self.client_key is None):
            raise UsageError("client_cert and client_key: give both (mTLS) or neither")

    def __bool__(self) -> bool:
        return bool(self.endpoint)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.endpoint == other
        if isinstance(other, CloudConfig):
            return dataclasses.astuple(self) == dataclasses.astuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment] - mutable


@dataclass
class PolicyConfig:
    """``[policy]``: how `routet2i.policy.RoutingPolicy` decides (`RoutingPolicy.from_config`)."""

    target_cloud_rate: float | None = None  # wanted share of cloud generations; None: the bundle's default
    budget: float | None = None  # average cloud cost units per prompt; with one cloud model of cost 1 the
    # same number as target_cloud_rate (its alias here: give either, or both equal). With several cloud
    # models (an N-model router bundle) budget is the parameter; target_cloud_rate given alone is read as
    # a budget in units too.
    calibration: str = "online"  # "online": alpha tracks the target quantile of the device's own PRS^;
    # "static": alpha from the bundle's calibration table only
    calibration_window: int = 500  # PRS^ values (numbers only) online calibration keeps per router
    pacing: bool = True  # quota-aware pacing: target min(rate, R/M) (README, SDK: quota-aware pacing)
    pacing_min_requests: int = 5  # requests seen before the device trusts its own request rate
    pacing_window_s: float = 7 * 86400.0  # how far back request times count for the rate estimate
    pacing_min_span_s: float | None = None  # the rate estimate spans at least this long (a burst is not a
    # trend); None: the quota period's length (a day, a month), at most pacing_window_s
    strict: bool = False  # True: a wanted cloud route that cannot be served raises (a `CloudError`)
    # instead of generating on the edge; generate(strict=...) overrides it per call
    local_only_patterns: list[str] = field(default_factory=list)  # regexes: a match keeps the prompt local
    local_only_keywords: list[str] = field(default_factory=list)  # words (case-insensitive, whole word)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UsageError naming the field, its value and what is allowed; budget fills target_cloud_rate."""
        self._check_rate_and_budget()
        _check_bool("strict", self.strict)
        if self.calibration not in ("online", "static"):
            raise UsageError(f"calibration={self.calibration!r}: must be 'online' or 'static'")
        _check_count("calibration_window", self.calibration_window, 1)
        if self.pacing_min_span_s is not None and (
            not isinstance(self.pacing_min_span_s, (int, float))
            or not math.isfinite(self.pacing_min_span_s)
            or self.pacing_min_span_s < 0
        ):
            raise UsageError(f"pacing_min_span_s={self.pacing_min_span_s!r}: must be seconds >= 0 or unset")
        _check_seconds("pacing_window_s", self.pacing_window_s)
        _check_count("pacing_min_requests", self.pacing_min_requests, 0)
        _check_strings("local_only_patterns", self.local_only_patterns)
        _check_strings("local_only_keywords", self.local_only_keywords)

    def _check_rate_and_budget(self) -> None:
        rate, budget = self.target_cloud_rate, self.budget
        if (
            rate is not None
            and not (budget is not None and rate == budget)
            and not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0)
        ):
            raise UsageError(f"target_cloud_rate={rate!r}: must be a number in [0, 1]")
        if budget is None:
            return
        if isinstance(budget, bool) or not (
            isinstance(budget, (int, float)) and 0.0 <= budget < float("inf")
        ):
            raise UsageError(
                f"budget={budget!r}: must be a finite number >= 0 (average cloud cost units per "
                "prompt; at most the router's one cloud model's cost, or its dearest model's)"
            )
        if rate is not None and rate != budget:
            raise UsageError(
                f"budget={budget!r} and target_cloud_rate={rate!r}: the same "
                "setting (budget is its alias); give one"
            )
        self.target_cloud_rate = budget


@dataclass
class LogConfig:
    """``[log]``: what the device writes down (decision log, pacing state, image metadata)."""

    decision_log: str | None = None  # JSONL decision log; None: <state dir>/decisions.jsonl; "": off
    log_prompts: bool = False  # write prompt text into the decision log
    save_prompt: bool = True  # `GenerateResult.save` writes the prompt into the image's metadata; false:
    # never (a local-only prompt is never written there either)
    state_file: str | None = None  # pacing + quota state; None: <state dir>/state.json; "": in memory only

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UsageError naming the field, its value and what is allowed."""
        _check_bool("save_prompt", self.save_prompt)
        _check_bool("log_prompts", self.log_prompts)

    def resolved_decision_log(self) -> Path | None:
        if self.decision_log == "":
            return None
        return (
            Path(self.decision_log).expanduser()
            if self.decision_log
            else default_state_dir() / "decisions.jsonl"
        )

    def resolved_state_file(self) -> Path | None:
        if self.state_file == "":
            return None
        return Path(self.state_file).expanduser() if self.state_file else default_state_dir() / "state.json"


@dataclass
class GenerationConfig:
    """``[generation]``: defaults for the `EdgeClient.generate` arguments left unset."""

    num_inference_steps: int | None = None  # None: the edge bundle's / server's default
    guidance_scale: float | None = None  # None: the pipeline default
    width: int | None = None  # None: the pipeline default
    height: int | None = None  # None: the pipeline default
    negative_prompt: str = ""  # default negative prompt
    scheduler: str | None = None  # edge denoising scheduler: "dpm++", "ddim", "euler", "pndm" (alias
    # "pnm", "plms"); None: the edge bundle's own (scheduler_config.json). The cloud uses its own.

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UsageError naming the field, its value and what is allowed; "pnm" becomes "pndm"."""
        if self.scheduler is None:
            return
        if not isinstance(self.scheduler, str) or self.scheduler.lower() not in SCHEDULER_NAMES:
            raise UsageError(
                f"scheduler={self.scheduler!r}: unknown scheduler; allowed: {', '.join(SCHEDULER_NAMES)} "
                "(or leave it unset for the edge bundle's own)"
            )
        self.scheduler = {"pnm": "pndm"}.get(self.scheduler.lower(), self.scheduler.lower())


# The sections of `ClientConfig`: attribute name = TOML section name.
SECTIONS: dict[str, type] = {
    "cloud": CloudConfig,
    "policy": PolicyConfig,
    "log": LogConfig,
    "generation": GenerationConfig,
}
_TOP_LEVEL = ("router", "edge", "providers", "check_hashes", "trusted_keys")


def _flat_fields() -> dict[str, tuple[str | None, str]]:
    out: dict[str, tuple[str | None, str]] = {name: (None, name) for name in _TOP_LEVEL}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            flat = "cloud" if (section, f.name) == ("cloud", "endpoint") else f.name
            out[flat] = (section, f.name)
    return out


# Flat option name -> (section or None for the top level, field in it). The flat names are the TOML keys
# (the [cloud] endpoint is the flat `cloud`), the ROUTET2I_<NAME> variables and the EdgeClient keywords.
FLAT_FIELDS: dict[str, tuple[str | None, str]] = _flat_fields()


@dataclass(init=False)
class ClientConfig:
    """Everything `EdgeClient` needs, by section as in ``routet2i.toml``: the bundles at the top level, then
    `cloud` (`CloudConfig`), `policy` (`PolicyConfig`), `log` (`LogConfig`), `generation`
    (`GenerationConfig`).

    The flat names still work: ``ClientConfig(target_cloud_rate=0.3, deadline_s=30)`` sets them in their
    section (`FLAT_FIELDS`; over a section object given as well), and ``config.deadline_s`` reads (and
    assignment writes) ``config.cloud.deadline_s``. ``cloud`` is the section; given as a string it is the
    endpoint (``config.cloud.endpoint``), and the section compares equal to that string."""

    router: str | None  # router bundle folder (`routet2i export router`)
    edge: str | None  # edge bundle folder (`routet2i export edge`)
    providers: list[Any] | None  # ONNX Runtime providers (names or [name, {options}]), best first;
    # None: the best available of TensorRT -> CUDA -> CPU
    check_hashes: str  # bundle sha256 check: "first" (re-hash only files changed since they last matched;
    # a hash cache in the user cache dir), "always", "never" (sizes only)
    trusted_keys: list[str] | None  # Ed25519 public-key PEM files; set: unsigned or wrongly signed bundles
    # are refused (the signature is checked at every launch, whatever check_hashes says)
    cloud: CloudConfig  # [cloud]
    policy: PolicyConfig  # [policy]
    log: LogConfig  # [log]
    generation: GenerationConfig  # [generation]

    def __init__(
        self,
        router: str | None = None,
        edge: str | None = None,
        providers: list[Any] | None = None,
        check_hashes: str = "first",
        trusted_keys: list[str] | None = None,
        cloud: CloudConfig | str | None = None,
        *,
        policy: PolicyConfig | None = None,
        log: LogConfig | None = None,
        generation: GenerationConfig | None = None,
        **flat: Any,
    ) -> None:
        unknown = sorted(set(flat) - set(FLAT_FIELDS))
        if unknown:
            raise TypeError(
                f"ClientConfig: unknown option(s) {unknown}; allowed: {', '.join(sorted(FLAT_FIELDS))}"
            )
        values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        if cloud is None or isinstance(cloud, str):  # the endpoint, as the flat field was
            if cloud is not None:
                values["cloud"]["endpoint"] = cloud
            cloud = None
        for name, value in flat.items():
            section, key = FLAT_FIELDS[name]
            values[str(section)][key] = value
        given = {"cloud": cloud, "policy": policy, "log": log, "generation": generation}
        for name, cls in SECTIONS.items():
            base = given[name]
            if base is None:
                base = cls(**values[name])
            elif isinstance(base, cls):
                base = dataclasses.replace(base, **values[name])  # a copy, validated again
            else:
                also = " or the endpoint 'host:port'" if name == "cloud" else ""
                raise UsageError(f"{name}={base!r}: must be a {cls.__name__}{also}")
            object.__setattr__(self, name, base)
        self.router = router
        self.edge = edge
        self.providers = providers
        self.check_hashes = check_hashes
        self.trusted_keys = trusted_keys
        self.validate()

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: a flat name of a section field (config.deadline_s)
        section, key = FLAT_FIELDS.get(name, (None, ""))
        if section is None or section not in self.__dict__:
            raise AttributeError(f"'ClientConfig' object has no attribute {name!r}")
        return getattr(self.__dict__[section], key)

    def __setattr__(self, name: str, value: Any) -> None:
        section, key = FLAT_FIELDS.get(name, (None, ""))
        if section is not None and not (name == "cloud" and isinstance(value, CloudConfig)):
            setattr(getattr(self, section), key, value)  # config.strict = True -> config.policy.strict
        else:
            object.__setattr__(self, name, value)

    def validate(self) -> None:
        """Raise UsageError naming the field, its value and what is allowed (every section too)."""
        for name in SECTIONS:
            getattr(self, name).validate()
        if self.check_hashes not in ("first", "always", "never"):
            raise UsageError(f"check_hashes={self.check_hashes!r}: allowed: first, always, never")
        if self.trusted_keys is not None and (
            not isinstance(self.trusted_keys, list) or not all(isinstance(k, str) for k in self.trusted_keys)
        ):
            raise UsageError(
                f"trusted_keys={self.trusted_keys!r}: must be a list of public-key PEM file paths"
            )
        if self.providers is not None:
            self.providers = _check_providers(self.providers)

    def resolved_decision_log(self) -> Path | None:
        return self.log.resolved_decision_log()

    def resolved_state_file(self) -> Path | None:
        return self.log.resolved_state_file()


def _check_providers(providers: Any) -> list[Any]:
    """Provider names and [name, {options}] pairs (e.g. TensorRT's trt_fp16_enable) -> names and tuples."""
    ok = isinstance(providers, list)
    norm: list[Any] = []
    for p in providers if ok else ():
        if isinstance(p, str):
            norm.append(p)
        elif (
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], dict)
        ):
            norm.append((p[0], dict(p[1])))
        else:
            ok = False
    if not ok:
        raise UsageError(
            f"providers={providers!r}: must be a list of provider names or [name, {{options}}] pairs"
        )
    return norm


# TOML section of each flat field (None: top level). Keys outside this map are rejected with the list.
_SECTIONS: dict[str, str | None] = {name: section for name, (section, _) in FLAT_FIELDS.items()}
# Keys also accepted at the top level of the file (as well as in their section).
_ALSO_TOP_LEVEL = frozenset({"scheduler"})
# Inside [cloud] the endpoint is spelled `endpoint` (the flat field is `cloud`).
_CLOUD_ENDPOINT_KEY = "endpoint"
# Fields holding paths: relative values in a TOML file are relative to the file's folder.
_PATH_FIELDS = ("router", "edge", "ca_cert", "client_cert", "client_key", "decision_log", "state_file")


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path} is a folder; give the routet2i.toml file") from None
    except UnicodeDecodeError as exc:  # tomllib decodes UTF-8 itself
        raise UsageError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None


def _flatten(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """TOML document -> {field: value}, refusing unknown keys and a token in the file."""
    out: dict[str, Any] = {}
    sections = {s for s in _SECTIONS.values() if s is not None}
    for key, value in doc.items():
        if key in sections and isinstance(value, dict):
            for sub, subval in value.items():
                name = "cloud" if (key == "cloud" and sub == _CLOUD_ENDPOINT_KEY) else sub
                if name == "token":
                    raise UsageError(
                        f"{path}: [{key}] token: the token is never read from a file; "
                        f"export {DEFAULT_TOKEN_ENV}=... (or set token_env) instead"
                    )
                if _SECTIONS.get(name) != key or (key == "cloud" and sub == "cloud"):
                    allowed = sorted(
                        (_CLOUD_ENDPOINT_KEY if (f == "cloud") else f)
                        for f, s in _SECTIONS.items()
                        if s == key
                    )
                    raise UsageError(f"{path}: unknown key [{key}] {sub!r}; allowed: {', '.join(allowed)}")
                out[name] = subval
        else:
            if key == "token":
                raise UsageError(
                    f"{path}: token: the token is never read from a file; export {DEFAULT_TOKEN_ENV}=... instead"
                )
            if key in _ALSO_TOP_LEVEL:
                if key in doc.get(str(_SECTIONS[key]), {}):
                    raise UsageError(
                        f"{path}: {key} given twice (top level and [{_SECTIONS[key]}]); give it once"
                    )
                out[key] = value
                continue
            if key not in _SECTIONS or _SECTIONS[key] is not None:
                top = sorted({f for f, s in _SECTIONS.items() if s is None} | _ALSO_TOP_LEVEL)
                raise UsageError(
                    f"{path}: unknown top-level key {key!r}; allowed: {', '.join(top)} "
                    f"and the sections {', '.join(sorted(sections))}"
                )
            out[key] = value
    for name in _PATH_FIELDS:
        value = out.get(name)
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            out[name] = str(p if p.is_absolute() else (path.parent / p))
    if isinstance(out.get("trusted_keys"), list):  # key files, relative to the TOML file's folder too
        out["trusted_keys"] = [
            str(path.parent / Path(k).expanduser()) if isinstance(k, str) and "-----BEGIN" not in k else k
            for k in out["trusted_keys"]
        ]
    return out


def _parse_env(name: str, raw: str, f: dataclasses.Field) -> Any:
    """Parse an environment variable by the field's declared type."""
    var = ENV_PREFIX + name.upper()
    kind = str(f.type)
    try:
        if kind.startswith("bool"):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind.startswith("list"):
            return [s.strip() for s in raw.split(",") if s.strip()]
        if kind.startswith("str"):
            return raw  # "" is meaningful for decision_log / state_file: off
        if "None" in kind and raw.strip() == "":
            return None
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise UsageError(f"environment variable {var}={raw!r}: not a valid {kind}") from None
    return raw


def _field(name: str) -> dataclasses.Field:
    """The dataclass field behind a flat option name (for its declared type)."""
    section, key = FLAT_FIELDS[name]
    cls = ClientConfig if section is None else SECTIONS[section]
    return next(f for f in dataclasses.fields(cls) if f.name == key)


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in FLAT_FIELDS:
        if name in ("token", "token_env"):
            continue
        var = ENV_PREFIX + name.upper()
        if var in environ:
            out[name] = _parse_env(name, environ[var], _field(name))
    return out


# ROUTET2I_* variables that are not ClientConfig fields but mean something to some part of routet2i.
OTHER_ENV = frozenset(
    {
        "LOG_LEVEL",  # logging level of the CLIs
        "CACHE_DIR",  # user cache dir of the device (bundle hash cache, ONNX Runtime graphs)
        "CACHE",  # workstation feature cache (training)
        "DEMO_CACHE",  # the demo's build cache
        "BENCH_CACHE",  # benchmarks' cache
        "CLOUD_DB",  # routet2i-cloud's quota store URL
        "SHARED_DATA",  # benchmarks / tests: the public data folder
        "TEST_PG_URL",  # tests: a PostgreSQL server
        "PG_DIR",  # tests: PostgreSQL scratch folder
        "PG_PORT",  # tests: PostgreSQL port
    }
)
# Names people reach for, and the setting they mean.
_ENV_ALIASES = {"ENDPOINT": "CLOUD", "CLOUD_ENDPOINT": "CLOUD", "STEPS": "NUM_INFERENCE_STEPS"}


def unknown_env_vars(environ: dict[str, str], token_env: str = DEFAULT_TOKEN_ENV) -> list[str]:
    """One message per ``ROUTET2I_*`` variable that no part of routet2i reads (a typo is silently
    ignored otherwise), with the setting it probably meant."""
    import difflib

    fields = {name.upper() for name in FLAT_FIELDS} - {"TOKEN", "TOKEN_ENV"}
    known = fields | OTHER_ENV
    out = []
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var == token_env:
            continue
        name = var[len(ENV_PREFIX) :]
        if name in known:
            continue
        guess = _ENV_ALIASES.get(name) or next(
            iter(difflib.get_close_matches(name, sorted(known), n=1)), None
        )
        hint = f" (did you mean {ENV_PREFIX}{guess}?)" if guess else ""
        out.append(f"environment variable {var} is not a routet2i setting and is ignored{hint}")
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> ClientConfig:
    """Build a `ClientConfig` from ``path`` (optional), the environment and ``overrides``.

    ``overrides`` set to None are ignored, so CLI flags can be passed straight through.
    """
    env = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path).expanduser()
        values.update(_flatten(_load_toml(p), p))
        logger.info("config: read %s", p)
    values.update(_from_env(env))
    known = set(FLAT_FIELDS)
    for key, value in overrides.items():
        if key not in known:
            raise UsageError(f"unknown config option {key!r}; allowed: {', '.join(sorted(known))}")
        if value is not None:
            values[key] = value
    token_env = values.get("token_env", DEFAULT_TOKEN_ENV)
    for message in unknown_env_vars(env, token_env):
        logger.warning("%s", message)
    if "token" not in overrides or overrides.get("token") is None:
        values["token"] = env.get(token_env) or None
    try:
        return ClientConfig(**values)
    except TypeError as exc:  # a wrongly typed value a section could not take
        raise UsageError(f"bad config: {exc}") from None
