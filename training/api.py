"""The Python training API: `train_router` and `export_router`, what ``routet2i train`` and ``routet2i export
router`` do, as library calls (README, section Training).

    from routet2i.training import export_router, train_router

    router_dir = train_router(table="quality.csv", dataset="genai_bench", edge_model="SDXL_2_1",
                              cloud_model="SDXL_Base", out="runs/router")
    bundle = export_router(router_dir, "bundles/router", target_rate=0.3).bundle

Each keyword is the command's option with ``_`` for ``-`` (``edge_model=`` is ``--edge-model``), with the
same defaults and checks: `train_router` parses them with the command's own parser and runs the command's
own code, so the two never drift apart. Lists (``metrics``, ``weights``) may be Python lists or the CLI's
comma-separated text. Bad input raises `routet2i.UsageError` (a ``ValueError``) naming the option.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from routet2i._errors import UsageError

__all__ = ["export_router", "train_router"]

PathLike = str | os.PathLike[str]


class _RaisingParser(argparse.ArgumentParser):
    """The command's parser, raising `UsageError` instead of printing and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _argv(options: dict[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """Keyword arguments -> the command line the CLI would get (unknown names: UsageError listing the known)."""
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}  # dest -> action
    argv: list[str] = []
    for name, value in options.items():
        if name not in flags:
            raise UsageError(f"unknown option {name!r}; allowed: {', '.join(sorted(flags))}")
        if value is None:
            continue
        action = flags[name]
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UsageError(f"{name}={value!r}: must be True or False")
            if value:
                argv.append(flag)
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        argv += [flag, str(value)]
    return argv


def train_router(
    table: PathLike,
    dataset: str,
    edge_model: str,
    cloud_model: str,
    out: PathLike,
    **options: Any,
) -> Path:
    """Train a router on ``table`` (a quality table, CSV or Parquet) for the pair ``edge_model`` ->
    ``cloud_model`` of ``dataset`` and write the router folder ``out`` (``router.pt``, ``backbone/``,
    calibration table); returns ``out``. ``options``: those of ``routet2i train`` (``method``, default
    multitask; ``backbone``: hub id or folder of the token encoder, default MiniLM-L6; ``metrics``,
    ``weights``, ``gamma``, ``seed``, ``epochs``, ``lr``, ``weight_decay``, ``batch_size``, ``patience``,
    ``val_fraction``, ``loss``, ``top_k``, ``n_layers``, ``max_length``, ``cache_dir``, ``force``; see
    ``routet2i train --help``). Prints one summary line as the command does."""
    from routet2i.training import train

    parser = _RaisingParser(prog="train_router")
    train.add_arguments(parser)
    required = {"table": table, "dataset": dataset, "edge_model": edge_model, "cloud_model": cloud_model}
    args = parser.parse_args(_argv({**required, "out": out, **options}, parser))
    train.run(args)
    return Path(out)


def export_router(
    router: PathLike,
    out: PathLike,
    *,
    target_rate: float | None = None,
    force: bool = False,
    exporter: str = "auto",
    sign_key: PathLike | None = None,
    timing_runs: int | None = None,
    costs: dict[str, int] | None = None,
    budget: float | None = None,
) -> Any:
    """Export the router folder ``router`` (from `train_router`) to a validated ONNX router bundle at
    ``out`` (what the device's ``EdgeClient(router=...)`` loads), as ``routet2i export router`` does:
    ``target_rate`` picks the default alpha from the calibration table (default 0.3), ``exporter``
    "auto" | "torchscript" | "dynamo", ``sign_key`` an Ed25519 private key (PEM) to sign the manifest,
    ``timing_runs`` the ONNX Runtime runs per exporter for the latency comparison (default 20), ``costs``
    {cloud model: units per image} and ``budget`` (N-model routers) as ``--costs`` / ``--budget``. Returns
    the `routet2i.export.router.RouterExportResult` (``.bundle``, ``.exporter``, ``.routing``); a bundle
    whose ONNX outputs do not match torch raises ``ExportValidationError`` and leaves nothing behind."""
    from routet2i.export.router import RouterExportConfig
    from routet2i.export.router import export_router as _export

    config = RouterExportConfig(
        router=Path(router),
        out=Path(out),
        target_rate=target_rate,
        force=force,
        exporter=exporter,
        sign_key=None if sign_key is None else Path(sign_key),
        costs=None if costs is None else {str(k): int(v) for k, v in costs.items()},
        budget=budget,
    )
    if timing_runs is not None:
        config.timing_runs = timing_runs
    return _export(config)
