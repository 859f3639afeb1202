"""`routet2i-cloud`: serve SD3 pipelines over gRPC and administer devices and quotas.

    routet2i-cloud serve --pipeline [NAME=]P [--pipeline NAME=P ...] [--cost NAME=UNITS ...]
                         --listen HOST:PORT --db URL [--create-db] [--max-batch N]
                         [--tls-cert F --tls-key F] [--instance-id ID]
    routet2i-cloud device add --db URL --device-id ID --quota N --period day|month|total [--json]
    routet2i-cloud device show --db URL --device-id ID [--json]
    routet2i-cloud device list --db URL [--json]
    routet2i-cloud device set-quota --db URL --device-id ID [--quota N] [--period P] [--json]

P is a diffusers SD3 folder, a Hugging Face id, or `noop` (no model; for tests and benchmarks). Each
--pipeline is one served model with its own batcher, named NAME (a bare P: its last path part, as with one
model); the first is the default (a request with an empty `model`). --cost NAME=UNITS: quota units per
image of that model (a whole number >= 1; default 1).
URL is sqlite:///PATH.db (default: $ROUTET2I_CLOUD_DB or sqlite:///routet2i-cloud.db) or postgresql://...
Only `device add` (and `serve --create-db`) creates a store; every other command refuses a missing one.
Bad arguments print one line and exit 2; database passwords are never printed or logged.
Log level: --log-level or $ROUTET2I_LOG_LEVEL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_DB = "sqlite:///routet2i-cloud.db"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


def _quota(text: str) -> int:
    v = _nonneg_int(text)
    if v > 2**63 - 1:
        raise argparse.ArgumentTypeError(f"{text!r} is above the largest quota, 2**63-1")
    return v


def _pipeline_arg(text: str) -> tuple[str | None, str]:
    """``NAME=P`` -> (NAME, P); a bare P (no '=' before its first '/') -> (None, P)."""
    name, sep, spec = text.partition("=")
    if not sep or "/" in name:
        if not text.strip():
            raise argparse.ArgumentTypeError("is empty: give an SD3 folder, a Hugging Face id or noop")
        return None, text
    from routet2i.cloud_server.core import check_model_name

    try:
        check_model_name(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if not spec.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r}: give NAME=P with P an SD3 folder, a Hugging Face id or noop"
        )
    return name, spec


def _cost_arg(text: str) -> tuple[str, int]:
    """``NAME=UNITS`` with UNITS a whole number >= 1."""
    name, sep, units = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=UNITS (a served model's name, units >= 1)")
    try:
        v = int(units)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: UNITS {units!r} is not a whole number") from None
    if not 1 <= v <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"{text!r}: UNITS must be a whole number from 1 to 2**31-1")
    return name, v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return v


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=os.environ.get("ROUTET2I_CLOUD_DB", DEFAULT_DB),
                   help="quota store: sqlite:///PATH.db or postgresql://USER@HOST:PORT/DB (default: %(default)s)")  # fmt: skip
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: $ROUTET2I_LOG_LEVEL)")


def build_parser() -> argparse.ArgumentParser:
    from routet2i.cloud_server.store import PERIODS

    parser = _Parser(prog="routet2i-cloud", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("serve", help="serve SD3 pipelines over gRPC")
    s.add_argument("--pipeline", required=True, action="append", type=_pipeline_arg, metavar="[NAME=]P",
                   help="a served model: SD3 diffusers folder, Hugging Face id, or `noop`, optionally named "
                        "NAME= (repeatable, one batcher each; the first is the default model; a bare P is "
                        "named after its last path part)")  # fmt: skip
    s.add_argument(
        "--cost",
        action="append",
        type=_cost_arg,
        default=[],
        metavar="NAME=UNITS",
        help="quota units per image of served model NAME (repeatable; default 1 each)",
    )
    s.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to bind (default: %(default)s)")
    _add_db(s)
    s.add_argument("--max-batch", type=_positive_int, default=4, help="most requests per pipeline call")
    s.add_argument("--batch-window-ms", type=float, default=20.0, help="wait this long for a batch to fill")
    s.add_argument("--max-queue", type=_positive_int, default=64, help="waiting requests before shedding")
    s.add_argument("--default-steps", type=_positive_int, default=28)
    s.add_argument("--default-width", type=_nonneg_int, default=0, help="0: the model's native size")
    s.add_argument("--default-height", type=_nonneg_int, default=0, help="0: the model's native size")
    s.add_argument("--default-guidance", type=float, default=7.0)
    s.add_argument("--max-steps", type=_positive_int, default=100)
    s.add_argument("--max-size", type=_positive_int, default=2048, help="largest width/height accepted")
    s.add_argument("--max-guidance", type=float, default=30.0)
    s.add_argument("--max-prompt-chars", type=_positive_int, default=2000)
    s.add_argument(
        "--create-db",
        action="store_true",
        help="create the quota store if --db has none yet (default: refuse a missing store)",
    )
    s.add_argument(
        "--reservation-ttl",
        type=float,
        default=900.0,
        help="longest life of an uncommitted quota reservation (requests without a deadline)",
    )
    s.add_argument(
        "--reservation-margin",
        type=_nonneg_float,
        default=30.0,
        help="a reservation lives until its request's deadline plus this many seconds",
    )
    s.add_argument(
        "--idempotency-ttl",
        type=_nonneg_float,
        default=86400.0,
        help="seconds a charged request_id can be retried without a new charge (never past "
        "the end of its quota period)",
    )
    s.add_argument("--instance-id",
                   help="this server's identity in the quota ledger; a restart with the same id frees what "
                        "its killed predecessor held (default: HOSTNAME/LISTEN for a fixed port, else random)")  # fmt: skip
    s.add_argument("--max-concurrent-rpcs", type=_positive_int, help="gRPC refuses more (RESOURCE_EXHAUSTED)")
    s.add_argument("--max-receive-bytes", type=_positive_int, default=1 << 20, help="largest request message")
    s.add_argument("--tls-cert", type=Path, help="PEM certificate chain (enables TLS)")
    s.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", type=Path, help="PEM CA bundle: require client certificates (mTLS)")
    s.add_argument("--metrics-port", type=_nonneg_int, help="serve Prometheus /metrics on this port")
    s.add_argument("--grace", type=_nonneg_float, default=10.0,
                   help="seconds in-flight requests get at shutdown")  # fmt: skip
    s.add_argument("--device", help="torch device (default: cuda, then mps, then cpu)")
    s.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: float16 on GPU")
    s.add_argument("--torch-threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--noop-step-delay", type=_nonneg_float, default=0.0,
                   help="seconds per step of the noop pipeline")  # fmt: skip

    device = sub.add_parser("device", help="devices and quotas")
    dsub = device.add_subparsers(dest="device_command", metavar="SUBCOMMAND", parser_class=_Parser)
    dsub.required = True
    a = dsub.add_parser("add", help="add a device and print its bearer token (shown only once)")
    _add_db(a)
    a.add_argument("--device-id", required=True)
    a.add_argument("--quota", type=_quota, required=True, help="units (images) per period")
    a.add_argument("--period", choices=PERIODS, required=True)
    a.add_argument("--json", action="store_true", help='print {"device_id": ..., "token": ...}')
    sh = dsub.add_parser("show", help="a device's quota and usage in its current period")
    _add_db(sh)
    sh.add_argument("--device-id", required=True)
    sh.add_argument("--json", action="store_true")
    li = dsub.add_parser("list", help="every device with its usage")
    _add_db(li)
    li.add_argument("--json", action="store_true")
    sq = dsub.add_parser("set-quota", help="change a device's limit and/or period")
    _add_db(sq)
    sq.add_argument("--device-id", required=True)
    sq.add_argument("--quota", type=_quota)
    sq.add_argument("--period", choices=PERIODS)
    sq.add_argument("--json", action="store_true")
    return parser


def _snapshot_dict(snap: Any) -> dict[str, Any]:
    return {"device_id": snap.device_id, "limit": snap.limit, "used": snap.used, "reserved": snap.reserved,
            "remaining": snap.remaining, "period": snap.period, "period_end_unix": snap.period_end_unix}  # fmt: skip


def _print_snapshot(snap: Any) -> None:
    per = "in total" if snap.period == "total" else f"per {snap.period}"
    print(f"{snap.device_id}: {snap.used} used, {snap.reserved} in progress, {snap.remaining} remaining "
          f"of {snap.limit} {per}")  # fmt: skip


def _device(args: argparse.Namespace) -> int:
    from routet2i.cloud_server.store import open_store

    with open_store(args.db, create=args.device_command == "add") as store:
        if args.device_command == "add":
            token = store.add_device(args.device_id, quota=args.quota, period=args.period)
            if args.json:
                print(json.dumps({"device_id": args.device_id, "token": token}))
            else:
                print(f"device {args.device_id} added: quota {args.quota} per {args.period}")
                print("bearer token (shown only now; the store keeps only its hash):")
                print(token)
            return 0
        if args.device_command == "set-quota":
            if args.quota is None and args.period is None:
                raise ValueError("device set-quota: give --quota N and/or --period day|month|total")
            store.set_quota(args.device_id, quota=args.quota, period=args.period)
            snaps = [store.quota(args.device_id)]
        elif args.device_command == "show":
            snaps = [store.quota(args.device_id)]
        else:
            snaps = [store.quota(d.device_id) for d in store.list_devices()]
    if args.json:
        out = [_snapshot_dict(s) for s in snaps]
        print(json.dumps(out if args.device_command == "list" else out[0]))
    else:
        for s in snaps:
            _print_snapshot(s)
    return 0


def _models(args: argparse.Namespace) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """([(served name, spec)], {name: units}) from --pipeline and --cost; ValueError (exit 2) for a name
    served twice, a cost given twice, or a cost of a model not served."""
    from routet2i.cloud_server.core import check_costs
    from routet2i.cloud_server.pipelines import pipeline_name

    served: list[tuple[str, str]] = []
    for name, spec in args.pipeline:
        name = name or pipeline_name(spec)
        if any(name == n for n, _ in served):
            raise ValueError(f"--pipeline {name}: two pipelines are served as {name!r}; name them NAME=P")
        served.append((name, spec))
    costs: dict[str, int] = {}
    for name, units in args.cost:
        if name in costs:
            raise ValueError(f"--cost {name}: given twice")
        costs[name] = units
    check_costs(costs, [n for n, _ in served])
    return served, costs


def _serve(args: argparse.Namespace) -> int:
    from routet2i.cloud_server.core import ServerConfig
    from routet2i.cloud_server.pipelines import load_pipeline
    from routet2i.cloud_server.servicer import TlsConfig, create_server

    served, costs = _models(args)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
    config = ServerConfig(
        default_width=args.default_width, default_height=args.default_height, default_steps=args.default_steps,
        default_guidance=args.default_guidance, max_steps=args.max_steps, max_guidance=args.max_guidance,
        max_size=args.max_size, max_prompt_chars=args.max_prompt_chars, max_batch=args.max_batch,
        batch_window_s=args.batch_window_ms / 1000.0, max_queue=args.max_queue,
        reservation_ttl_s=args.reservation_ttl, reservation_margin_s=args.reservation_margin,
        idempotency_s=args.idempotency_ttl, instance_id=args.instance_id or "",
    )  # fmt: skip
    tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None

    def loader(spec: str) -> Any:
        return lambda: load_pipeline(spec, device=args.device, dtype=args.dtype,
                                     noop_step_delay_s=args.noop_step_delay, torch_threads=args.torch_threads)  # fmt: skip

    named = args.pipeline[0][0] is not None or len(served) > 1  # a single bare P: today's form
    pipelines: Any = {name: loader(spec) for name, spec in served} if named else loader(served[0][1])

    async def main() -> None:
        # handlers first: a SIGTERM right after "serving on port" (or while the model loads) is a clean stop
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server, port = await create_server(
            args.db, pipelines, args.listen, config=config, tls=tls, metrics_port=args.metrics_port,
            max_receive_message_bytes=args.max_receive_bytes, max_concurrent_rpcs=args.max_concurrent_rpcs,
            create_store=args.create_db, costs=costs,
        )  # fmt: skip
        print(f"routet2i-cloud: serving on port {port}", flush=True)
        table = ", ".join(f"{n} ({c} unit{'s' if c != 1 else ''})" for n, c in server.core.model_table())
        print(f"routet2i-cloud: models {table}; default {server.core.default_model}", flush=True)
        await stop.wait()
        await server.stop(args.grace)

    asyncio.run(main())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (args.log_level or os.environ.get("ROUTET2I_LOG_LEVEL") or
             ("INFO" if args.command == "serve" else "WARNING")).upper()  # fmt: skip
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        print(
            f"routet2i-cloud: error: --log-level {level!r} is not DEBUG, INFO, WARNING or ERROR",
            file=sys.stderr,
        )
        return 2
    from routet2i.cloud_server.safe_text import RedactingFormatter, redact

    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    import sqlite3

    from routet2i._errors import UsageError
    from routet2i.cloud_server.errors import CloudError

    expected: tuple[type[BaseException], ...] = (
        UsageError, ValueError, OSError, KeyError, CloudError, sqlite3.Error, OverflowError,
    )  # fmt: skip
    try:
        import psycopg

        expected += (psycopg.Error,)
    except ImportError:  # pragma: no cover
        pass
    try:
        return _device(args) if args.command == "device" else _serve(args)
    except expected as e:
        text = getattr(e, "detail", None) or str(e)  # StoreUnavailable: the admin-side detail
        msg = text.splitlines()[0] if text.strip() else type(e).__name__
        print(f"routet2i-cloud {args.command}: error: {redact(msg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
