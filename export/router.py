"""`routet2i export router`: a trained router (ROUTER_DIR) to a validated ONNX router bundle.

Bundle (CONTRACTS.md section 3)::

    router.onnx      inputs input_ids, attention_mask (int64 [batch, sequence], both dynamic);
                     outputs prs [batch], metric_scores [batch, k]; an N-model router (trained with
                     several --cloud-model) also model_scores [batch, n_models]: each model's predicted
                     combined quality, columns in routing.json `models` order
    tokenizer/       the backbone's tokenizer files, tokenizer.json (fast) included: the device reads it
                     with the `tokenizers` library, no transformers
    routing.json     format_version, method, metrics, weights, gamma, edge/cloud model, dataset, calibration
                     [{rate, alpha}], target_rate, alpha (the default threshold), max_length, router_version,
                     models [{name, where: edge|cloud, cost}] (edge first, cost 0; --costs); N-model routers
                     also budget_table [{budget, lambda}] (budget ascending) and default_budget: the policy
                     picks argmax over allowed models of model_scores - lambda * cost
    manifest.json    sha256 of every file, versions, which exporter was kept and the validation numbers

Exporter choice. Both torch exporters are tried: TorchScript (``torch.onnx.export(dynamo=False)``, tracing)
and dynamo (``torch.onnx.export(dynamo=True)``, torch.export + onnxscript). Each graph is checked against
``specs.ROUTER`` and validated against torch on prompts of several lengths and batch sizes (max abs diff
<= 1e-4); of those that validate, the one with the lower ONNX Runtime median latency on one typical prompt
(what the device does per decision; the two sessions are timed interleaved so machine load hits both) is
kept, TorchScript winning ties within 5 %. Measured here (torch 2.13, onnxruntime 1.32, MiniLM-L6 RouteT2I
router, 2 shared CPU cores, interleaved medians): both validate at ~3e-7; TorchScript 34 / 100 / 1213 ms
vs dynamo 39 / 104 / 1330 ms at batch x tokens 1x3 / 2x19 / 8x128, with 693 vs 343 graph nodes (dynamo
folds shape arithmetic and emits LayerNormalization, but its attention path runs slightly slower in ORT).
So TorchScript is usually kept; the measurement stays per export because the gap is small and depends on
the backbone and the machine. ``--exporter`` forces one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from routet2i._errors import UsageError
from routet2i.alpha_table import alpha_at_rate, table_rows
from routet2i.bundle import publish_folder
from routet2i.export._log import cli_progress
from routet2i.export.specs import ROUTER, ExportValidationError, OutputMismatch, TensorSpec, compare_outputs
from routet2i.paths import check_output_path

logger = logging.getLogger(__name__)

__all__ = [
    "RouterExportConfig",
    "RouterExportResult",
    "export_router",
    "pick_alpha",
    "VALIDATION_PROMPTS",
    "add_arguments",
    "run",
]

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_TARGET_RATE = 0.3
TIE = 0.05  # relative latency difference under which TorchScript is kept

# Prompts of very different lengths (1 token to past max_length) for validation and timing.
VALIDATION_PROMPTS = [
    "fox",
    "a red fox in the snow",
    "an astronaut riding a horse on the moon, digital art, highly detailed, 4k",
    "A bowl of soup that looks like a monster, knitted out of wool.",
    "two dogs, three cats and a parrot sitting on a sofa in a living room with a large window, "
    "a fireplace, a bookshelf full of old books, a green rug and a lamp, photorealistic, golden hour",
    "the words 'deep learning' written in chalk on a blackboard",
    " ".join(["a very long prompt about many small objects on a wooden table"] * 12),
    "城市夜景 neon café — ünïcödé",
]


@dataclass
class RouterExportConfig:
    """One `export router` run."""

    router: Path  # ROUTER_DIR from `routet2i train` (router.pt + backbone/)
    out: Path  # bundle folder to create
    target_rate: float | None = None  # cloud rate whose alpha becomes the default; None: 0.3 (or nearest)
    force: bool = False  # replace an existing non-empty --out
    exporter: str = "auto"  # "auto" (try both, keep the validated faster one) | "torchscript" | "dynamo"
    opset: int = ROUTER.opset  # ONNX opset
    atol: float = ROUTER.atol  # max abs diff torch vs ORT on prs and metric_scores
    timing_runs: int = 20  # ORT runs per candidate for the latency comparison (median)
    sign_key: Path | None = None  # Ed25519 private key (PEM): sign manifest.json into manifest.sig
    costs: dict[str, int] | None = None  # cloud model -> quota units per image (None: 1 each; edge 0)
    budget: float | None = None  # N-model bundles: default average units per prompt (None: 1.0 or midpoint)


@dataclass
class RouterExportResult:
    """What `export_router` produced."""

    bundle: Path  # the bundle folder
    exporter: str  # the exporter kept
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)  # per exporter: validated, diff, ms
    routing: dict[str, Any] = field(default_factory=dict)  # routing.json
    seconds: float = 0.0  # total wall time


def _say(stage: str, message: str) -> None:
    logger.info("[export router] %s: %s", stage, message)  # shown by the CLI (routet2i.export._log)


def pick_alpha(calibration: list[dict[str, float]], rate: float) -> float:
    """The default alpha for ``--target-rate``: the one rule of `routet2i.alpha_table` (the row of the
    largest tabulated rate <= ``rate``), as training and the device read the table. A rate below the
    table's first row is refused: the device would thin that row's cloud decisions, a default alpha cannot."""
    rates, alphas = table_rows(calibration)
    if rate < rates[0] - 1e-12:
        raise UsageError(
            f"--target-rate {rate}: below the router's calibration table [{rates[0]:g}, {rates[-1]:g}]"
        )
    return alpha_at_rate(rates, alphas, rate)[0]


NMODEL_ROUTER = replace(
    ROUTER, outputs=(*ROUTER.outputs, TensorSpec("model_scores", "float32", ("batch", None)))
)
LAMBDA_STEPS = 2000  # points of the lambda grid of the budget table (0 .. the lambda where the edge wins)


def parse_costs(text: str | None) -> dict[str, int] | None:
    """--costs C1=UNITS,C2=UNITS -> {name: units}; UsageError (one line) on a malformed item."""
    if text is None:
        return None
    costs: dict[str, int] = {}
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        name, sep, units = item.rpartition("=")
        name = name.strip()
        try:
            value = int(units.strip())
        except ValueError:
            value = 0
        if not sep or not name or value < 1 or str(value) != units.strip():
            raise UsageError(
                f"--costs item {item!r}: expected CLOUD_MODEL=UNITS with UNITS a positive integer"
            )
        if name in costs:
            raise UsageError(f"--costs names {name!r} twice")
        costs[name] = value
    if not costs:
        raise UsageError("--costs is empty; expected CLOUD_MODEL=UNITS[,CLOUD_MODEL=UNITS...]")
    return costs


def model_costs(models: list[str], costs: dict[str, int] | None) -> list[int]:
    """Cost of each model (edge first: 0); ``costs`` must name every cloud model and no other (default 1)."""
    clouds = models[1:]
    if costs is None:
        return [0] + [1] * len(clouds)
    unknown = [m for m in costs if m not in clouds]
    if unknown:
        raise UsageError(
            f"--costs names {', '.join(repr(m) for m in unknown)}, not a cloud model of this router; "
            f"cloud models: {', '.join(clouds)}"
        )
    bad = [f"{m}={u!r}" for m, u in costs.items() if isinstance(u, bool) or not isinstance(u, int) or u < 1]
    if bad:
        raise UsageError(f"--costs {', '.join(bad)}: UNITS must be a positive integer")
    missing = [m for m in clouds if m not in costs]
    if missing:
        raise UsageError(
            f"--costs lacks {', '.join(repr(m) for m in missing)}: give every cloud model a cost "
            f"({', '.join(clouds)})"
        )
    return [0] + [int(costs[m]) for m in clouds]


def choose(scores, costs, lam: float, allowed=None):
    """Index [n] of argmax over the allowed models of scores - lam * cost (first wins ties: edge first)."""
    import numpy as np

    util = np.asarray(scores, dtype=np.float64) - lam * np.asarray(costs, dtype=np.float64)
    if allowed is not None:
        util = np.where(np.asarray(allowed, dtype=bool), util, -np.inf)
    return util.argmax(axis=1)


def budget_table(scores, costs, steps: int = LAMBDA_STEPS) -> list[dict[str, float]]:
    """[{budget, lambda}] sorted by budget: lambdas on a grid from 0 up to where the edge always wins;
    budget = mean cost of the argmax at that lambda over ``scores`` [n, M]; per budget the smallest lambda."""
    import numpy as np

    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    gain = (s[:, 1:] - s[:, :1]) / c[1:]
    top = max(float(gain.max()), 0.0) * 1.0001 + 1e-9
    rows: dict[float, float] = {}
    for lam in np.linspace(0.0, top, steps + 1):
        b = round(float(c[choose(s, c, float(lam))].mean()), 6)
        rows.setdefault(b, round(float(lam), 8))
    return [{"budget": b, "lambda": rows[b]} for b in sorted(rows)]


def _check_inputs(config: RouterExportConfig) -> None:
    router = Path(config.router)
    if not router.is_dir():
        raise UsageError(f"--router {router}: not a folder (expected ROUTER_DIR from `routet2i train`)")
    if not (router / "router.pt").is_file():
        raise UsageError(
            f"--router {router}: no router.pt checkpoint in it; run `routet2i train --out {router}`"
        )
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not config.force:
        raise UsageError(f"--out {out}: folder exists and is not empty (pass --force to replace it)")
    check_output_path(out, "--out", folder=True)
    if config.exporter not in ("auto", *EXPORTERS):
        raise UsageError(f"--exporter {config.exporter!r}: allowed auto, {', '.join(EXPORTERS)}")
    if config.target_rate is not None and not 0.0 <= config.target_rate <= 1.0:
        raise UsageError(f"--target-rate {config.target_rate}: must be a cloud rate in [0, 1]")


def _batches(tokenizer, max_length: int) -> list[tuple[str, dict[str, Any]]]:
    """Validation cases: batch sizes 1, 2, 3 and 8, lengths from 1 token to max_length (padded)."""
    p = VALIDATION_PROMPTS
    groups = [
        ("b1-short", p[:1]),
        ("b1-long", p[6:7]),
        ("b2", p[1:3]),
        ("b3-mixed", [p[0], p[4], p[7]]),
        ("b8", p),
    ]
    cases = []
    for name, prompts in groups:
        enc = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds = {k: enc[k].astype("int64") for k in ROUTER.input_names}
        cases.append((f"{name} len={feeds['input_ids'].shape[1]}", feeds))
    return cases


def _export_one(model, exporter: str, path: Path, opset: int, example: dict[str, Any], spec=ROUTER) -> None:
    import torch

    args = tuple(torch.from_numpy(example[k]) for k in ROUTER.input_names)
    if exporter == "torchscript":
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    else:
        batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("sequence", min=1, max=4096)
        program = torch.onnx.export(
            model,
            args,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
        program.save(str(path), external_data=False)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _validate(
    model, path: Path, cases, atol: float, spec=ROUTER
) -> tuple[list[OutputMismatch], list[str], dict[str, float]]:
    import torch

    problems = spec.check_graph(path)
    session = _session(path)
    failures: list[OutputMismatch] = []
    diffs: dict[str, float] = {}
    for case, feeds in cases:
        with torch.no_grad():
            outputs = model(*(torch.from_numpy(feeds[k]) for k in ROUTER.input_names))
        ref = {n: o.numpy() for n, o in zip(spec.output_names, outputs, strict=True)}
        try:
            got = dict(zip(spec.output_names, session.run(spec.output_names, feeds), strict=True))
        except Exception as exc:  # e.g. an axis the exporter made static: a failure of this case
            detail = f"ORT run failed: {str(exc).splitlines()[0][:200]}"
            failures += [
                OutputMismatch("router", n, case, float("inf"), atol, detail) for n in spec.output_names
            ]
            continue
        failures += compare_outputs("router", case, ref, got, atol, 0.0, diffs)
    return failures, problems, {k.split(".", 1)[1]: v for k, v in diffs.items()}


def _latency_ms(paths: dict[str, Path], feeds: dict[str, Any], runs: int) -> dict[str, float]:
    """Median ORT latency per graph, the sessions run alternately so that machine load hits all alike."""
    sessions = {name: _session(path) for name, path in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, feeds)  # warm-up
    for _ in range(runs):
        for name, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, feeds)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _save_tokenizer(router_dir: Path, out: Path) -> Any:
    """Backbone tokenizer files into ``out`` with tokenizer.json (fast) guaranteed. Returns the tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(router_dir / "backbone", use_fast=True)
    if not tokenizer.is_fast:
        raise UsageError(f"--router {router_dir}: backbone tokenizer has no fast (tokenizer.json) version")
    tokenizer.save_pretrained(out)
    if not (out / "tokenizer.json").is_file():
        tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    return tokenizer


def _check_tokenizer_json(tokenizer, path: Path, max_length: int) -> list[str]:
    """The device's `tokenizers` path must give the same ids as the tokenizer the router was trained with."""
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(path))
    fast.no_padding()
    fast.enable_truncation(max_length=max_length)
    problems = []
    for prompt in VALIDATION_PROMPTS:
        want = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
        if fast.encode(prompt).ids != want:
            problems.append(f"tokenizer.json ids differ from the backbone tokenizer on {prompt[:40]!r}")
    return problems


def export_router(config: RouterExportConfig) -> RouterExportResult:
    """Export, validate, pick the exporter, write the bundle (see the module docstring)."""
    start = time.perf_counter()
    _check_inputs(config)
    sign_key = None
    if config.sign_key is not None:  # read before any work: a bad key fails in one line, at once
        from routet2i.signing import load_private_key

        sign_key = load_private_key(config.sign_key)
    from routet2i.training.model import load_router

    router_dir, out = Path(config.router), Path(config.out)
    _say("1/5 load", f"{router_dir}")
    try:
        model, ckpt = load_router(router_dir)
    except UsageError:
        raise
    except Exception as exc:  # a corrupt or foreign checkpoint: one line naming the file
        raise UsageError(
            f"--router {router_dir}: cannot load router.pt ({type(exc).__name__}: {exc})"
        ) from None
    missing = [k for k in ("metrics", "weights", "gamma", "calibration", "method") if k not in ckpt]
    if missing:
        raise UsageError(f"--router {router_dir}: router.pt lacks {missing}")
    calibration = [{"rate": float(c["rate"]), "alpha": float(c["alpha"])} for c in ckpt["calibration"]]
    if not calibration:
        raise UsageError(f"--router {router_dir}: router.pt has an empty calibration table")
    if config.target_rate is None:
        rates = sorted(c["rate"] for c in calibration)
        target_rate = min(max(DEFAULT_TARGET_RATE, rates[0]), rates[-1])
    else:
        target_rate = config.target_rate
    alpha = pick_alpha(calibration, target_rate)
    models = list(ckpt.get("models") or [ckpt.get("edge_model", ""), ckpt.get("cloud_model", "")])
    nmodel = len(models) > 2
    costs = model_costs(models, config.costs)
    spec = NMODEL_ROUTER if nmodel else ROUTER
    table: list[dict[str, float]] = []
    if nmodel:
        if "oof_model_scores" not in ckpt:
            raise UsageError(f"--router {router_dir}: router.pt lacks oof_model_scores (retrain it)")
        table = budget_table(ckpt["oof_model_scores"], costs)
        lo, hi = table[0]["budget"], table[-1]["budget"]
        if config.budget is None:
            budget = 1.0 if lo <= 1.0 <= hi else round((lo + hi) / 2, 6)
        elif not lo <= config.budget <= hi:
            raise UsageError(f"--budget {config.budget}: outside the router's budget table [{lo:g}, {hi:g}]")
        else:
            budget = float(config.budget)
    elif config.budget is not None:
        raise UsageError(
            "--budget is for N-model routers (trained with several --cloud-model); use --target-rate"
        )
    max_length = int(ckpt.get("max_length") or ckpt["config"].get("max_length", 128))
    n_params = sum(p.numel() for p in model.parameters())
    _say("1/5 load", f"method {ckpt['method']}, {len(ckpt['metrics'])} metrics, {n_params / 1e6:.1f}M params")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tokenizer = _save_tokenizer(router_dir, tmp / "tokenizer")
        problems = _check_tokenizer_json(tokenizer, tmp / "tokenizer" / "tokenizer.json", max_length)
        if problems:
            raise ExportValidationError(f"export router {router_dir}", [], problems)
        cases = _batches(tokenizer, max_length)
        # Timing on what the device does: one prompt of typical length per decision.
        enc = tokenizer([VALIDATION_PROMPTS[2]], truncation=True, max_length=max_length, return_tensors="np")
        timing_feeds = {k: enc[k].astype("int64") for k in ROUTER.input_names}

        exporters = EXPORTERS if config.exporter == "auto" else (config.exporter,)
        candidates: dict[str, dict[str, Any]] = {}
        all_failures: list[OutputMismatch] = []
        all_problems: list[str] = []
        for i, name in enumerate(exporters):
            path = tmp / f".candidate-{name}.onnx"
            _say(f"2/5 export {i + 1}/{len(exporters)}", f"{name} exporter, opset {config.opset}")
            t0 = time.perf_counter()
            entry: dict[str, Any] = {"validated": False}
            candidates[name] = entry
            try:
                _export_one(model, name, path, config.opset, cases[2][1], spec)  # batch 2: no size-1 axis
            except Exception as exc:  # an exporter that cannot handle the model is a candidate that lost
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                all_problems.append(f"{name} exporter failed: {entry['error']}")
                _say(f"2/5 export {i + 1}/{len(exporters)}", f"{name} failed: {entry['error']}")
                continue
            entry["export_seconds"] = round(time.perf_counter() - t0, 2)
            entry["bytes"] = path.stat().st_size
            failures, probs, diffs = _validate(model, path, cases, config.atol, spec)
            entry["max_abs_diff"] = diffs
            entry["validated"] = not failures and not probs
            all_failures += [
                OutputMismatch(f"router[{name}]", f.output, f.case, f.max_abs_diff, f.atol, f.detail)
                for f in failures
            ]
            all_problems += [f"{name}: {p}" for p in probs]
            for line in [str(f) for f in failures] + probs:
                _say("3/5 validate", f"{name}: {line}")
            _say(
                "3/5 validate",
                f"{name}: {'ok' if entry['validated'] else 'FAILED'} "
                f"(max abs diff prs {diffs.get('prs', float('nan')):.1e}, "
                f"metric_scores {diffs.get('metric_scores', float('nan')):.1e}; "
                f"{entry['bytes'] / 1e6:.1f} MB)",
            )
        valid = [n for n in exporters if candidates[n]["validated"]]
        if not valid:
            raise ExportValidationError(f"export router {router_dir}", all_failures, all_problems)
        latency = _latency_ms(
            {n: tmp / f".candidate-{n}.onnx" for n in valid}, timing_feeds, config.timing_runs
        )
        for name, ms in latency.items():
            candidates[name]["ort_ms_batch1"] = round(ms, 3)
        _say(
            "4/5 choose",
            "ORT median per prompt: " + ", ".join(f"{n} {ms:.2f} ms" for n, ms in latency.items()),
        )
        chosen = valid[0]
        for name in valid[1:]:
            if candidates[name]["ort_ms_batch1"] < candidates[chosen]["ort_ms_batch1"] * (1 - TIE):
                chosen = name
        if config.exporter != "auto":
            why = "the only exporter asked for (--exporter)"
        elif len(valid) == 1:
            why = "the only exporter whose graph validated"
        else:
            others = ", ".join(f"{n} {candidates[n]['ort_ms_batch1']:.2f} ms" for n in valid if n != chosen)
            mine = candidates[chosen]["ort_ms_batch1"]
            fastest = all(mine <= candidates[n]["ort_ms_batch1"] for n in valid)
            why = (
                f"validated and fastest on ONNX Runtime ({mine:.2f} ms per prompt vs {others})"
                if fastest
                else f"validated; within {TIE:.0%} of the fastest ({mine:.2f} ms vs {others}), TorchScript wins ties"
            )
        _say("4/5 choose", f"{chosen}: {why}")
        (tmp / f".candidate-{chosen}.onnx").rename(tmp / "router.onnx")
        for leftover in tmp.glob(".candidate-*"):
            leftover.unlink()

        digest = hashlib.sha256((router_dir / "router.pt").read_bytes()).hexdigest()[:12]
        routing = {
            "format_version": 1,
            "method": ckpt["method"],
            "metrics": list(ckpt["metrics"]),
            "score_names": list(ckpt.get("score_names", ckpt["metrics"])),
            "weights": [float(w) for w in ckpt["weights"]],
            "gamma": float(ckpt["gamma"]),
            "edge_model": ckpt.get("edge_model", ""),
            "cloud_model": ckpt.get("cloud_model", ""),
            "dataset": ckpt.get("dataset", ""),
            "calibration": sorted(calibration, key=lambda c: c["rate"]),
            "target_rate": float(target_rate),
            "alpha": float(alpha),
            "max_length": max_length,
            "router_version": f"{ckpt['method']}-{digest}",
            "models": [
                {"name": m, "where": "edge" if i == 0 else "cloud", "cost": int(c)}
                for i, (m, c) in enumerate(zip(models, costs, strict=True))
            ],
        }
        if nmodel:
            routing["budget_table"] = table
            routing["default_budget"] = float(budget)
        (tmp / "routing.json").write_text(json.dumps(routing, indent=2) + "\n")
        _say("5/5 manifest", "routing.json + sha256 of every file")
        from routet2i.bundle import write_manifest

        write_manifest(
            tmp,
            kind="router",
            extra={
                "router": {
                    "exporter": chosen,
                    "exporter_reason": why,
                    "candidates": candidates,
                    "opset": config.opset,
                    "validation": {
                        "atol": config.atol,
                        "cases": [c for c, _ in cases],
                        "provider": "CPUExecutionProvider",
                        "tokenizer_json_matches_backbone_tokenizer": True,
                    },
                    "params": n_params,
                    "source": str(router_dir),
                }
            },
            sign_key=sign_key,
        )
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = RouterExportResult(bundle=out, exporter=chosen, candidates=candidates, routing=routing)
    result.seconds = time.perf_counter() - start
    logger.info(
        f"[export router] bundle {out} ({result.seconds:.1f}s): exporter {chosen}, "
        f"{len(routing['metrics'])} metrics, target rate {target_rate:g} -> alpha {alpha:.4f}, "
        f"max_length {max_length}, version {routing['router_version']}"
    )
    return result


# ------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", required=True, type=Path, help="ROUTER_DIR written by `routet2i train`")
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    parser.add_argument(
        "--target-rate",
        type=float,
        default=None,
        help=f"cloud rate whose calibrated alpha is the default (default {DEFAULT_TARGET_RATE})",
    )
    parser.add_argument(
        "--costs",
        default=None,
        help="quota units per image of every cloud model: C1=UNITS,C2=UNITS (positive integers; default 1 each)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="N-model routers: default average units per prompt (default 1.0 if in the budget table, else its midpoint)",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument(
        "--exporter",
        choices=("auto", *EXPORTERS),
        default="auto",
        help="auto: try both torch exporters, keep the validated faster one",
    )
    parser.add_argument(
        "--sign-key", type=Path, help="Ed25519 private key (PEM) to sign the manifest (routet2i dev keygen)"
    )


def run(args: argparse.Namespace) -> int:
    config = RouterExportConfig(
        router=args.router,
        out=args.out,
        target_rate=args.target_rate,
        force=args.force,
        exporter=args.exporter,
        sign_key=args.sign_key,
        costs=parse_costs(args.costs),
        budget=args.budget,
    )
    try:
        with cli_progress():
            export_router(config)
    except ExportValidationError as exc:
        print(f"routet2i export router: error: {exc}")
        return 1
    return 0
