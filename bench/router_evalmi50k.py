"""Router experiments on the product's own pair: EvalMi-50K dev, sd_v2-1 -> sd3_5_large (issue 15).

Every variant is scored exactly as `routet2i eval` scores a method: 5 folds x 3 seeds split by prompt text
(``folds_by_text``), each fold's lowest scores sent to the cloud, pooled Delta P, the mean over seeds and
the prompt-level bootstrap 95 % interval. Features are frozen all-MiniLM-L6-v2 states, masked-mean pooled
per layer, computed once and cached under ~/.cache/routet2i/pooled (never in the repository). The data is
read from ../shared/data and never copied; only aggregate numbers are printed and written
(docs/results/evalmi50k_experiments.json).

    nice .venv/bin/python bench/router_evalmi50k.py                    # every variant
    nice .venv/bin/python bench/router_evalmi50k.py --only ridge_last,mt_mlp
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO.parent / "shared" / "data" / "quality" / "evalmi50k_dev.csv"
OUT = REPO / "docs" / "results" / "evalmi50k_experiments.json"
EDGE, CLOUD = "sd_v2-1", "sd3_5_large"


def load(cloud: str = CLOUD):
    from routet2i.training.tables import pair_data, read_table

    df = read_table(TABLE)
    pair = pair_data(df, "evalmi50k", EDGE, cloud)
    return pair


FRACTION = 1.0  # share of each training fold used (--learning-curve)


def scores_from(pair, variant: str, feats, train: np.ndarray, test: np.ndarray, seed: int) -> np.ndarray:
    """Routing score of the test prompts (lower = cloud) from a model fitted on ``train`` only."""
    from routet2i.training.multitask import fit_predict_variant

    if FRACTION < 1.0:
        train = np.sort(np.random.default_rng(seed).permutation(train)[: int(round(FRACTION * len(train)))])
    return fit_predict_variant(variant, pair, feats, train, test, seed)


def evaluate(
    pair, variant: str, feats, folds: int, seeds: int, n_boot: int = 1000, first_seed: int = 0
) -> dict:
    from routet2i.training.baselines import combined_quality
    from routet2i.training.evaluate import _bootstrap, cloud_mask, delta_p_curve, folds_by_text

    w = np.full(len(pair.metrics), 1.0 / len(pair.metrics))
    q_e, q_c, _ = combined_quality(pair.q_edge, pair.q_cloud, w)
    gap = q_c - q_e
    n = len(pair)
    dps, decisions, rate_err = [], [], []
    t0 = time.perf_counter()
    for s in range(first_seed, first_seed + seeds):
        fold_id = folds_by_text(pair.prompts, folds, seed=s)
        scores = np.zeros(n)
        for f in range(folds):
            test, train = np.flatnonzero(fold_id == f), np.flatnonzero(fold_id != f)
            scores[test] = scores_from(pair, variant, feats, train, test, seed=s * 100 + f)
        tb = np.random.default_rng(2000 + s).permutation(n)
        dps.append(delta_p_curve(scores, fold_id, gap[:, None], tb, np.array([0.3, 0.5, 0.7]))[:, 0])
        decisions.append(cloud_mask(scores, fold_id, 0.5, tb))
    dps = np.array(dps)
    lo, hi = _bootstrap(np.array(decisions, dtype=np.float64), gap, n_boot, seed=3000)
    return {
        "delta_p": {r: float(dps[:, i].mean()) for i, r in enumerate(("0.3", "0.5", "0.7"))},
        "delta_p_std_0.5": float(dps[:, 1].std(ddof=1)) if seeds > 1 else 0.0,
        "ci95_0.5": [lo, hi],
        "seconds": round(time.perf_counter() - t0, 1),
        "rate_err": rate_err,
    }


def calibration_check(pair, variant: str, feats, folds: int, seeds: int, rates=(0.3, 0.5)) -> dict:
    """Cloud rate on held-out prompts of the alpha `routet2i train` + `export router --target-rate` give.

    Outer folds by text: on the training part, what `routet2i train` does (fit + out-of-fold calibration
    table), then export's alpha for each target rate; the share of the held-out fold with prs < alpha."""
    from dataclasses import replace

    from routet2i.export.router import pick_alpha
    from routet2i.training.calibration import calibration_table
    from routet2i.training.evaluate import folds_by_text
    from routet2i.training.multitask import (
        VARIANTS,
        MultiTaskConfig,
        fit_and_calibrate,
        layer_mean,
        predict_multitask,
    )

    x = layer_mean(feats)
    cfg = replace(MultiTaskConfig(metrics=list(pair.metrics), hidden_size=x.shape[1]), **VARIANTS[variant])
    got: dict[str, list[float]] = {f"{r:g}": [] for r in rates}
    for s in range(seeds):
        fold_id = folds_by_text(pair.prompts, folds, seed=s)
        for f in range(folds):
            test, train = np.flatnonzero(fold_id == f), np.flatnonzero(fold_id != f)
            module, oof, _ = fit_and_calibrate(x, pair, train, cfg, seed=s * 100 + f)
            table = calibration_table(oof)
            prs = predict_multitask(module, x[test])
            for r in rates:
                got[f"{r:g}"].append(float(np.mean(prs < pick_alpha(table, r))))
    return {
        r: {
            "mean": float(np.mean(v)),
            "max_abs_err": float(np.max(np.abs(np.array(v) - float(r)))),
            "folds": v,
        }
        for r, v in got.items()
    }


def nmodel_budget_check(folds: int, seeds: int, budgets=(0.5, 1.0, 1.5)) -> dict:
    """Issue 14: the exported budget table on prompts outside the training file. Per outer fold, what
    `routet2i train` + `export router --costs sdxl_base_1=1,sd3_5_large=3` do on the training part (fit,
    5-fold out-of-fold model_scores, budget_table), then lambda interpolated in the table at the budget and
    applied to the held-out fold: its spend and quality (also for the table of edge vs sd3_5_large only)."""
    from routet2i.export.router import budget_table, choose
    from routet2i.training.evaluate import folds_by_text
    from routet2i.training.multitask import (
        MultiTaskConfig,
        fit_and_calibrate,
        layer_mean,
        pooled_layer_states,
        predict_model_scores,
    )
    from routet2i.training.tables import nmodel_data, read_table

    data = nmodel_data(read_table(TABLE), "evalmi50k", EDGE, ["sdxl_base_1", "sd3_5_large"])
    pair, true = data.pair, data.quality
    costs = np.array([0, 1, 3])
    x = layer_mean(pooled_layer_states(pair.prompts))
    cfg = MultiTaskConfig(
        metrics=list(pair.metrics),
        hidden_size=int(x.shape[1]),
        models=data.models,
        model_columns=data.columns,
    )
    policies = {"router": np.array([1, 1, 1], bool), "only_sd3_5_large": np.array([1, 0, 1], bool)}
    acc = {p: {b: {"cost": np.zeros(len(pair)), "q": np.zeros(len(pair))} for b in budgets} for p in policies}
    out: dict = {}
    t0 = time.time()
    for s in range(seeds):
        fold_id = folds_by_text(pair.prompts, folds, s)
        for f in range(folds):
            test, train = np.flatnonzero(fold_id == f), np.flatnonzero(fold_id != f)
            oof: list = []
            module, _, _ = fit_and_calibrate(x, pair, train, cfg, 100 * s + f, nmodel=data, oof_scores=oof)
            pred = predict_model_scores(module, x[test])
            for name, allowed in policies.items():
                sub = np.where(allowed[None, :], oof[0], -1e9)  # a model left out never wins
                table = budget_table(sub, np.where(allowed, costs, 1))
                bs, ls = [r["budget"] for r in table], [r["lambda"] for r in table]
                for b in budgets:
                    lam = float(np.interp(b, bs, ls))
                    pick = choose(pred, costs, lam, np.repeat(allowed[None, :], len(test), 0))
                    acc[name][b]["cost"][test] = costs[pick]
                    acc[name][b]["q"][test] = true[test, pick]
            print(f"seed {s} fold {f}: {time.time() - t0:.0f} s", flush=True)
        for name in policies:
            for b in budgets:
                row = out.setdefault(name, {}).setdefault(f"{b:g}", {"spend": [], "quality": []})
                row["spend"].append(float(acc[name][b]["cost"].mean()))
                row["quality"].append(float(acc[name][b]["q"].mean()))
    return {"folds": folds, "seeds": seeds, "held_out": out, "seconds": round(time.time() - t0, 1)}


def main() -> int:
    from routet2i.training.multitask import VARIANTS, pooled_layer_states

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated variants")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cloud", default=CLOUD)
    ap.add_argument("--first-seed", type=int, default=0, help="screens use other splits than 0..2")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--learning-curve", default=None, metavar="VARIANT", help="Delta P against training size")
    ap.add_argument("--calibration", default=None, metavar="VARIANT", help="measure the calibration instead")
    ap.add_argument(
        "--nmodel-budget-check",
        action="store_true",
        help="issue 14: the exported budget table on held-out prompts",
    )
    args = ap.parse_args()
    if not TABLE.is_file():
        print(f"skipped: {TABLE} is not there", file=sys.stderr)
        return 0
    if args.nmodel_budget_check:
        r = nmodel_budget_check(args.folds, args.seeds)
        path = REPO / "docs" / "results" / "evalmi50k_nmodel_budget_check.json"
        path.write_text(json.dumps(r, indent=1) + "\n")
        for name, rows in r["held_out"].items():
            for b, v in rows.items():
                print(
                    f"{name} budget {b}: held-out spend {np.mean(v['spend']):.3f}, quality {np.mean(v['quality']):.3f}"
                )
        return 0
    pair = load(args.cloud)
    feats = pooled_layer_states(pair.prompts)
    if args.learning_curve:
        global FRACTION
        results = json.loads(args.out.read_text()) if args.out.is_file() else {}
        for frac in (0.25, 0.5, 0.75, 1.0):
            FRACTION = frac
            r = evaluate(pair, args.learning_curve, feats, args.folds, args.seeds)
            results[f"{args.cloud}:{args.learning_curve}:train_fraction={frac:g}"] = r
            n = int(round(frac * len(pair) * (args.folds - 1) / args.folds))
            print(
                f"{frac:4.2f} of the training folds ({n} prompts): dP@50 {r['delta_p']['0.5']:.1f}",
                flush=True,
            )
        FRACTION = 1.0
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        return 0
    if args.calibration:
        results = json.loads(args.out.read_text()) if args.out.is_file() else {}
        r = calibration_check(pair, args.calibration, feats, args.folds, args.seeds)
        results[f"{args.cloud}:{args.calibration}:calibration"] = r
        for rate, v in r.items():
            print(
                f"target {rate}: held-out cloud rate {v['mean']:.3f}, worst fold off by {v['max_abs_err']:.3f}"
            )
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        return 0
    names = args.only.split(",") if args.only else list(VARIANTS)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in names:
        r = evaluate(pair, name, feats, args.folds, args.seeds, first_seed=args.first_seed)
        key = f"{args.cloud}:{name}" + (f":seeds{args.first_seed}+{args.seeds}" if args.first_seed else "")
        results[key] = r
        ci = r["ci95_0.5"]
        print(
            f"{key:45s} dP@30 {r['delta_p']['0.3']:5.1f}  dP@50 {r['delta_p']['0.5']:5.1f} "
            f"+-{r['delta_p_std_0.5']:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]  dP@70 {r['delta_p']['0.7']:5.1f}"
            f"  {r['seconds']:.0f}s",
            flush=True,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
