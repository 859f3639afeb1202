"""`routet2i eval`: K folds x seeds evaluation of every routing method on one edge/cloud pair.

ROUTET2I.md section 5, step by step:

1. Split the prompts by text into K folds (one split per seed; a text never sits in two folds).
2. For each seed, method and fold: train on the other K-1 folds (the trainer holds out its own inner
   validation split for early stopping), score the held-out fold. Rule methods score every prompt at once.
3. Combined quality Q: each metric divided by its pooled std (both models), weighted, summed.
4. At cloud rate rho, each fold sends its round(rho * n_fold) lowest-scored prompts to the cloud.
   Delta P(rho) is pooled over all out-of-fold decisions of one seed:
   100 * sum(Q_routed - Q_e) / sum(Q_c - Q_e). Mean and std over seeds, and a prompt-level bootstrap 95 %
   interval (prompts resampled, the seeds' decisions kept, averaged over seeds).
5. Cloud saving at a Delta P target t: the smallest rho on a 0.01 grid with Delta P(rho) >= t gives
   100 * (1 - rho), per seed, then mean and std.
6. The JSON of CONTRACTS.md (plus extra fields) and a PNG of Delta P against the cloud rate.

Ties in a method's score (noun counts) are broken by a random order fixed per seed, shared by all methods.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from routet2i.paths import atomic_path, atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "folds_by_text",
    "cloud_mask",
    "delta_p_curve",
    "evaluate_pair",
    "plot_curves",
    "add_arguments",
    "run",
]

GRID = np.round(np.arange(101) * 0.01, 2)  # cloud rates of the curves and of the cloud-saving search
DEFAULT_RATES = (0.3, 0.5, 0.7)
DEFAULT_TARGETS = (40.0, 50.0, 60.0)


def folds_by_text(prompts: list[str], k: int, seed: int) -> np.ndarray:
    """Fold id [n] in 0..k-1; identical texts share a fold; fold sizes differ by at most one text."""
    texts = sorted(set(prompts))
    rng = np.random.default_rng(seed)
    rng.shuffle(texts)
    fold_of = {t: i % k for i, t in enumerate(texts)}
    return np.array([fold_of[p] for p in prompts], dtype=np.int64)


def _n_cloud(rate: float, n: int) -> int:
    return int(np.floor(rate * n + 0.5))  # round half up


def _fold_orders(scores: np.ndarray, fold_id: np.ndarray, tiebreak: np.ndarray) -> list[np.ndarray]:
    """Per fold: its prompt indices from lowest to highest score (ties in ``tiebreak`` order)."""
    out = []
    for f in np.unique(fold_id):
        idx = np.flatnonzero(fold_id == f)
        out.append(idx[np.lexsort((tiebreak[idx], scores[idx]))])
    return out


def cloud_mask(scores: np.ndarray, fold_id: np.ndarray, rate: float, tiebreak: np.ndarray) -> np.ndarray:
    """Boolean [n]: the round(rate * n_fold) lowest scores of each fold go to the cloud."""
    mask = np.zeros(len(scores), dtype=bool)
    for order in _fold_orders(scores, fold_id, tiebreak):
        mask[order[: _n_cloud(rate, len(order))]] = True
    return mask


def delta_p_curve(
    scores: np.ndarray, fold_id: np.ndarray, gaps: np.ndarray, tiebreak: np.ndarray, grid: np.ndarray = GRID
) -> np.ndarray:
    """Pooled Delta P [len(grid), m] for the gap columns ``gaps`` [n, m] (one seed's out-of-fold scores)."""
    gain = np.zeros((len(grid), gaps.shape[1]))
    for order in _fold_orders(scores, fold_id, tiebreak):
        csum = np.vstack([np.zeros(gaps.shape[1]), np.cumsum(gaps[order], axis=0)])
        gain += csum[[_n_cloud(r, len(order)) for r in grid]]
    total = gaps.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100.0 * gain / total


def _saving(curve: np.ndarray, target: float, grid: np.ndarray = GRID) -> float:
    hit = np.flatnonzero(curve >= target - 1e-9)
    return float(100.0 * (1.0 - grid[hit[0]])) if len(hit) else 0.0


def _bootstrap(decisions: np.ndarray, gap: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % interval of Delta P: prompts resampled with replacement, seeds' decisions kept, seed-averaged."""
    if n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(gap), size=(n_boot, len(gap)))
    gained = (decisions * gap[None, :])[:, idx].sum(axis=-1)  # [S, B]
    total = gap[idx].sum(axis=-1)  # [B]
    with np.errstate(divide="ignore", invalid="ignore"):
        dp = 100.0 * (gained / total[None, :]).mean(axis=0)
    dp = dp[np.isfinite(dp)]
    return float(np.percentile(dp, 2.5)), float(np.percentile(dp, 97.5))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads (restored afterwards)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def evaluate_pair(
    pair,
    weights: np.ndarray,
    methods: list[str],
    folds: int = 5,
    seeds: int = 3,
    rates: tuple[float, ...] = DEFAULT_RATES,
    targets: tuple[float, ...] = DEFAULT_TARGETS,
    backbone: str = "",
    max_length: int = 128,
    train_cfg=None,
    overrides: dict[str, Any] | None = None,
    n_boot: int = 1000,
    cache_dir: str | None = None,
    progress: bool = True,
    threads: int = 1,
    first_seed: int = 0,
) -> dict[str, Any]:
    """The eval report (CONTRACTS.md JSON plus extra fields) of ``methods`` on ``pair``.

    ``threads``: torch intra-op threads while training. The routers are tiny (batches of 32 prompts), so
    more threads mostly add synchronization; on a shared CPU two threads made a fit several times slower.
    """
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    with torch_threads(threads), threadpool_limits(max(1, threads)):
        from routet2i.training.baselines import RULE_METHODS, combined_quality, rule_scores
        from routet2i.training.methods import POOLED_METHODS
        from routet2i.training.train import TrainConfig, predict, train_on

        cfg = train_cfg or TrainConfig()
        n = len(pair)
        q_e, q_c, sd = combined_quality(pair.q_edge, pair.q_cloud, weights)
        gap = q_c - q_e
        metric_gaps = (pair.q_cloud - pair.q_edge) / sd[None, :]
        gaps = np.column_stack([gap, metric_gaps])  # column 0: combined, then one per metric
        if gap.sum() <= 1e-9 * max(1.0, float(np.abs(gap).sum())):
            logger.warning(
                "%s: the cloud model is not better than the edge model in total (sum of Q_c - Q_e = %.3g); "
                "Delta P divides by that sum and is meaningless here",
                pair.dataset,
                gap.sum(),
            )
        pooled = [m for m in methods if m in POOLED_METHODS]
        trained = [m for m in methods if m not in RULE_METHODS and m not in POOLED_METHODS]
        feats = token_states_for(pair, backbone, max_length, cache_dir) if trained else None
        x_pooled = None
        if pooled:
            from routet2i.training.multitask import layer_mean, pooled_layer_states

            x_pooled = layer_mean(
                pooled_layer_states(pair.prompts, backbone, max_length, cache_dir=cache_dir)
            )
        nouns = None
        if "noun_count" in methods:
            from routet2i.training.nouns import count_nouns

            nouns = np.asarray(count_nouns(pair.prompts), dtype=np.float64)

        scores = {m: np.zeros((seeds, n)) for m in methods}
        fold_ids = np.zeros((seeds, n), dtype=np.int64)
        seconds = {m: 0.0 for m in methods}
        best_epochs: dict[str, list[int]] = {m: [] for m in methods}
        jobs = [(s, m) for s in range(seeds) for m in methods]
        bar = tqdm(total=len(jobs) * 1, desc=f"eval {pair.dataset}", unit="method-seed", disable=not progress)
        for s, m in jobs:
            sv = first_seed + s  # the seed value: split, initialization, random routing, tie order
            fold_ids[s] = folds_by_text(pair.prompts, folds, seed=sv)
            t0 = time.perf_counter()
            if m in RULE_METHODS:
                scores[m][s] = rule_scores(m, np.random.default_rng(1000 + sv), n, gap=gap, nouns=nouns)
            elif m in POOLED_METHODS:
                from routet2i.training.multitask import fit_predict

                for f in range(folds):
                    test = np.flatnonzero(fold_ids[s] == f)
                    train = np.flatnonzero(fold_ids[s] != f)
                    scores[m][s, test] = fit_predict(
                        x_pooled, pair, weights, train, test, sv * 100 + f, cfg, overrides
                    )
            else:
                for f in range(folds):
                    test = np.flatnonzero(fold_ids[s] == f)
                    train = np.flatnonzero(fold_ids[s] != f)
                    module, _, info = train_on(
                        m, pair, feats, train, weights, sd, cfg, seed=sv * 100 + f, overrides=overrides
                    )
                    scores[m][s, test] = predict(module, feats, test)
                    best_epochs[m].append(info["best_epoch"])
            seconds[m] += time.perf_counter() - t0
            bar.set_postfix(method=m, seed=s)
            bar.update(1)
        bar.close()

        tiebreaks = [np.random.default_rng(2000 + first_seed + s).permutation(n) for s in range(seeds)]
        report: dict[str, Any] = {
            "dataset": pair.dataset,
            "edge_model": pair.edge_model,
            "cloud_model": pair.cloud_model,
            "metrics": list(pair.metrics),
            "n_prompts": int(n),
            "folds": int(folds),
            "seeds": int(seeds),
            "first_seed": int(first_seed),
            "weights": [float(w) for w in weights],
            "rates": [float(r) for r in rates],
            "targets": [float(t) for t in targets],
            "backbone": backbone or "all-MiniLM-L6-v2 (packaged)",
            "train_config": {f.name: getattr(cfg, f.name) for f in fields(cfg)},
            "model_overrides": dict(overrides or {}),
            "edge_only_quality": float(q_e.mean()),
            "cloud_only_quality": float(q_c.mean()),
            "cloud_win_rate": float(np.mean(gap > 0)),
            "tie_rate": float(np.mean(gap == 0)),
            "total_gap": float(gap.sum()),
            "bootstrap_samples": int(n_boot),
            "methods": {},
        }
        for m in methods:
            curves = np.stack(
                [delta_p_curve(scores[m][s], fold_ids[s], gaps, tiebreaks[s]) for s in range(seeds)]
            )
            combined = curves[:, :, 0]  # [S, grid]
            entry: dict[str, Any] = {
                "delta_p": {},
                "delta_p_std": {},
                "delta_p_ci95": {},
                "delta_p_per_metric": {},
            }
            for r in rates:
                key = f"{r:g}"
                at = int(np.argmin(np.abs(GRID - r)))
                if abs(GRID[at] - r) < 1e-9:
                    vals = combined[:, at]
                    per_metric = curves[:, at, 1:].mean(axis=0)
                else:  # a rate off the 0.01 grid: compute it directly
                    c = np.stack(
                        [
                            delta_p_curve(scores[m][s], fold_ids[s], gaps, tiebreaks[s], np.array([r]))[0]
                            for s in range(seeds)
                        ]
                    )
                    vals, per_metric = c[:, 0], c[:, 1:].mean(axis=0)
                decisions = np.stack(
                    [cloud_mask(scores[m][s], fold_ids[s], r, tiebreaks[s]) for s in range(seeds)]
                )
                entry["delta_p"][key] = float(vals.mean())
                entry["delta_p_std"][key] = float(vals.std(ddof=1)) if seeds > 1 else 0.0
                entry["delta_p_ci95"][key] = list(
                    _bootstrap(decisions.astype(np.float64), gap, n_boot, seed=3000)
                )
                entry["delta_p_per_metric"][key] = {
                    name: float(v) for name, v in zip(pair.metrics, per_metric, strict=True)
                }
            savings = {f"{t:g}": [_saving(combined[s], t) for s in range(seeds)] for t in targets}
            entry["cloud_saving"] = {k: float(np.mean(v)) for k, v in savings.items()}
            entry["cloud_saving_std"] = {
                k: float(np.std(v, ddof=1)) if seeds > 1 else 0.0 for k, v in savings.items()
            }
            entry["curve"] = {
                "rates": [float(x) for x in GRID],
                "delta_p": [float(x) for x in combined.mean(axis=0)],
            }
            entry["seconds"] = round(seconds[m], 2)
            if best_epochs[m]:
                entry["mean_best_epoch"] = float(np.mean(best_epochs[m]))
            report["methods"][m] = entry
        report["seconds"] = round(time.perf_counter() - t_start, 2)
        return report


def token_states_for(pair, backbone: str, max_length: int, cache_dir: str | None):
    from routet2i.training.features import token_states

    return token_states(pair.prompts, backbone, max_length, cache_dir=cache_dir)


_STYLE = {
    "oracle": dict(color="black", ls=":"),
    "random": dict(color="gray", ls="--"),
    "noun_count": dict(color="tab:brown", ls="--"),
    "routet2i": dict(color="tab:red", lw=2.5, zorder=5),
    "multitask": dict(color="tab:orange", lw=2.5, zorder=6),
    "routellm_bert": dict(color="tab:blue"),
    "hybrid_llm": dict(color="tab:cyan"),
    "zooter": dict(color="tab:green"),
    "gap_regression": dict(color="tab:purple"),
}


def plot_curves(report: dict[str, Any], path: str | Path) -> Path:
    """PNG of pooled Delta P (quality gained, % of the cloud-edge gap) against the cloud rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=120)
    for m, entry in report["methods"].items():
        style = _STYLE.get(m, dict(ls="-.", lw=1.2))
        ax.plot(entry["curve"]["rates"], entry["curve"]["delta_p"], label=m, **style)
    ax.axhline(100, color="k", lw=0.6)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("cloud rate (fraction of prompts sent to the cloud)")
    ax.set_ylabel("Delta P (% of the cloud-only quality gain)")
    ax.set_xlim(0, 1)
    ax.set_title(
        f"{report['dataset']}: {report['edge_model']} -> {report['cloud_model']} "
        f"({report['n_prompts']} prompts, {report['folds']} folds x {report['seeds']} seeds)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    return save_figure(fig, path, "png")


def save_figure(fig: Any, path: str | Path, fmt: str | None = None) -> Path:
    """Write a matplotlib figure atomically (``routet2i.paths.atomic_path``) and close it. ``fmt``: the
    image format; None takes it from the path's suffix."""
    import matplotlib.pyplot as plt

    out = Path(path)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=fmt or out.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from routet2i.training.methods import METHODS

    parser.add_argument("--table", required=True, help="quality table (CSV or Parquet)")
    parser.add_argument("--dataset", required=True, help="dataset name in the table")
    parser.add_argument("--edge-model", required=True, help="edge model name in the table")
    parser.add_argument(
        "--cloud-model",
        required=True,
        action="append",
        help="cloud model name in the table; repeat it for N-model quality-vs-cost curves (multitask)",
    )
    parser.add_argument(
        "--costs",
        default=None,
        help="several --cloud-model: units per image, C1=UNITS,C2=UNITS (positive integers; default 1 each)",
    )
    parser.add_argument(
        "--budgets", default="1.0", help="several --cloud-model: budgets (units per prompt) to summarize"
    )
    parser.add_argument("--json", required=True, help="report JSON to write")
    parser.add_argument("--rates", default="0.3,0.5,0.7", help="cloud rates in (0, 1) for Delta P")
    parser.add_argument("--targets", default="40,50,60", help="Delta P targets (%%) for cloud saving")
    parser.add_argument("--folds", type=int, default=5, help="K folds, split by prompt text")
    parser.add_argument("--seeds", type=int, default=3, help="repetitions with different splits and inits")
    parser.add_argument("--methods", default=None, help=f"comma-separated, default all: {','.join(METHODS)}")
    parser.add_argument("--plot", default=None, help="PNG of Delta P against the cloud rate")
    parser.add_argument("--metrics", default=None, help="comma-separated metrics (default: all shared)")
    parser.add_argument("--weights", default=None, help="comma-separated metric weights (default uniform)")
    parser.add_argument(
        "--backbone", default="", help="HF id or folder of the token encoder (default MiniLM-L6)"
    )
    parser.add_argument("--max-length", type=int, default=128, help="tokenizer truncation length")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% interval"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TrainConfig or model config field (e.g. top_k=4, weight_decay=0.1, gamma=2)",
    )
    parser.add_argument("--cache-dir", default=None, help="token-state cache folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1)")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds are first_seed .. first_seed+seeds-1"
    )


def _parse_floats(text: str, name: str) -> tuple[float, ...]:
    from routet2i._errors import UsageError

    try:
        vals = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise UsageError(f"{name} {text!r} is not a comma-separated list of numbers") from exc
    if not vals:
        raise UsageError(f"{name} is empty")
    return vals


def _parse_sets(items: list[str], cfg):
    """(TrainConfig with overrides, model overrides) from --set KEY=VALUE items."""
    from routet2i._errors import UsageError
    from routet2i.training.baselines import BaselineConfig
    from routet2i.training.model import RouterConfig

    train_fields = {f.name: f for f in fields(cfg)}
    from routet2i.training.multitask import MultiTaskConfig

    model_fields = {f.name for f in fields(RouterConfig)} | {f.name for f in fields(BaselineConfig)}
    model_fields |= {f.name for f in fields(MultiTaskConfig)}
    model_fields -= {"metrics", "weights", "backbone", "hidden_size", "method", "max_length"}
    model_fields -= {"n_outputs", "n_kernel", "components", "lr", "weight_decay"}
    train_over: dict[str, Any] = {}
    model_over: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or (key not in train_fields and key not in model_fields):
            raise UsageError(
                f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(set(train_fields) | model_fields))}"
            )
        value: Any = raw.strip()
        if value.lower() in ("true", "false"):
            value = value.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(value)
                    break
                except ValueError:
                    continue
        (train_over if key in train_fields else model_over)[key] = value
    return replace(cfg, **train_over), model_over


# Image formats matplotlib writes without extra packages (--plot).
PLOT_FORMATS = {".png", ".pdf", ".svg", ".jpg", ".jpeg"}


def check_eval_args(args: argparse.Namespace, n_texts: int | None = None) -> list[str]:
    """Validate rates/targets/folds/seeds/methods; returns the method list."""
    from routet2i._errors import UsageError
    from routet2i.paths import check_output_path
    from routet2i.training.methods import METHODS

    for r in _parse_floats(args.rates, "--rates"):
        if not (0.0 < r < 1.0):
            raise UsageError(f"--rates: {r:g} is outside (0, 1); give cloud rates such as 0.3,0.5,0.7")
    for t in _parse_floats(args.targets, "--targets"):
        if not (0.0 < t <= 100.0):
            raise UsageError(
                f"--targets: {t:g} is outside (0, 100]; give Delta P percentages such as 40,50,60"
            )
    check_output_path(args.json, "--json")
    if args.plot:
        check_output_path(args.plot, "--plot")
        if Path(args.plot).suffix.lower() not in PLOT_FORMATS:
            raise UsageError(
                f"--plot {args.plot!r}: the file name must end in one of {', '.join(sorted(PLOT_FORMATS))}"
            )
    if args.folds < 2:
        raise UsageError(f"--folds must be >= 2, got {args.folds}")
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    methods = list(METHODS) if not args.methods else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(
            f"--methods: unknown {','.join(unknown) or '(empty)'}; available: {', '.join(METHODS)}"
        )
    if n_texts is not None and n_texts < args.folds:
        raise UsageError(f"the pair has {n_texts} distinct prompt texts, fewer than --folds {args.folds}")
    return methods


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    return atomic_write(path, json.dumps(report, indent=1))


def run(args: argparse.Namespace) -> int:
    from routet2i.training.train import (
        TrainConfig,
        check_settings,
        check_value,
        load_pair,
        split_cloud_models,
    )

    args.method = "multitask"
    split_cloud_models(args)
    check_eval_args(args)
    if len(args.cloud_models) > 1:
        return _run_nmodel(args)
    if args.costs is not None:
        from routet2i._errors import UsageError

        raise UsageError(
            "--costs needs several --cloud-model (N-model curves); one cloud model: Delta P curves"
        )
    cfg, overrides = _parse_sets(args.set, TrainConfig())
    check_value("max_length", args.max_length, "--max-length")
    check_settings(cfg, overrides, args.max_length, via="set")
    pair, weights = load_pair(args)
    methods = check_eval_args(args, n_texts=len(set(pair.prompts)))
    report = evaluate_pair(
        pair,
        weights,
        methods,
        folds=args.folds,
        seeds=args.seeds,
        rates=_parse_floats(args.rates, "--rates"),
        targets=_parse_floats(args.targets, "--targets"),
        backbone=args.backbone,
        max_length=args.max_length,
        train_cfg=cfg,
        overrides=overrides,
        n_boot=args.bootstrap,
        cache_dir=args.cache_dir,
        threads=args.threads,
        first_seed=args.first_seed,
    )
    write_json(report, args.json)
    if args.plot:
        plot_curves(report, args.plot)
    rates = list(report["methods"][methods[0]]["delta_p"])
    print(
        f"{pair.dataset}: {pair.edge_model} -> {pair.cloud_model}, {report['n_prompts']} prompts, {report['seconds']:.0f} s"
    )
    print(f"{'method':30s} " + " ".join(f"dP@{r:>5s}" for r in rates))
    for m, e in report["methods"].items():
        print(f"{m:30s} " + " ".join(f"{e['delta_p'][r]:6.1f}±{e['delta_p_std'][r]:4.1f}" for r in rates))
    return 0


def _run_nmodel(args: argparse.Namespace) -> int:
    """Several --cloud-model: the N-model quality-vs-cost report (``nmodel_eval.py``)."""
    from routet2i._errors import UsageError
    from routet2i.export.router import model_costs, parse_costs
    from routet2i.prs import normalize_weights
    from routet2i.training.nmodel_eval import evaluate_nmodel, plot_nmodel
    from routet2i.training.tables import nmodel_data, read_table
    from routet2i.training.train import TrainConfig, check_settings, nmodel_features_config, parse_list
    from threadpoolctl import threadpool_limits

    cfg, overrides = _parse_sets(args.set, TrainConfig())
    check_settings(cfg, overrides, args.max_length, via="set")
    if args.methods and [m.strip() for m in args.methods.split(",") if m.strip()] != ["multitask"]:
        raise UsageError("--methods: several --cloud-model are evaluated with the N-model router: multitask")
    budgets = _parse_floats(args.budgets, "--budgets")
    if any(b < 0 for b in budgets):
        raise UsageError(f"--budgets {args.budgets!r}: budgets are average units per prompt, >= 0")
    data = nmodel_data(
        read_table(args.table),
        args.dataset,
        args.edge_model,
        args.cloud_models,
        parse_list(args.metrics, "--metrics"),
    )
    costs = model_costs(data.models, parse_costs(args.costs))
    check_eval_args(args, n_texts=len(set(data.pair.prompts)))
    weights = normalize_weights(parse_list(args.weights, "--weights", float), len(data.pair.metrics))
    args.epochs = overrides.get("epochs")
    x, mcfg = nmodel_features_config(data, weights, args, cfg)
    known = {f.name for f in fields(mcfg)}
    mcfg = replace(mcfg, **{k: v for k, v in overrides.items() if k in known})
    with torch_threads(args.threads), threadpool_limits(args.threads):
        nm = evaluate_nmodel(
            data,
            x,
            mcfg,
            costs,
            folds=args.folds,
            seeds=args.seeds,
            first_seed=args.first_seed,
            budgets=budgets,
        )
    report = {
        "dataset": data.pair.dataset,
        "edge_model": data.pair.edge_model,
        "cloud_models": list(data.models[1:]),
        "n_prompts": nm["n_prompts"],
        "metrics": list(data.pair.metrics),
        "nmodel": nm,
    }
    write_json(report, args.json)
    if args.plot:
        plot_nmodel(report, args.plot)
    print(f"{data.pair.dataset}: {', '.join(f'{m} ({c})' for m, c in zip(data.models, costs, strict=True))}")
    for b, row in nm["at_budget"].items():
        parts = [f"{k} {v['quality']:.3f} @ {v['cost']:.3f}" for k, v in row.items() if isinstance(v, dict)]
        print(f"budget {b}: " + "; ".join(parts))
        if "gain_over_best_single" in row:
            print(
                f"  gain over the best single cloud model ({row['best_single']}): {row['gain_over_best_single']:+.3f}"
            )
    return 0
