"""`routet2i eval` with several --cloud-model: quality-vs-average-cost curves of N-model routing (issue 14).

Per seed, the prompts are split by text into K folds; the N-model router (``multitask`` with model_scores)
is fitted on K-1 folds and predicts every model's combined quality on the held-out fold, giving out-of-fold
predictions of every prompt. Combined quality of a model on a prompt: mean over the metrics of score /
that metric's pooled sd over all the dataset's scores (``tables.nmodel_data``). Policies, each swept over
lambda and read at the budgets of a grid (average cost units per prompt; edge 0):

- ``router``: argmax over all models of predicted quality - lambda * cost.
- ``router_only_<C>``: the same predictions restricted to the edge and cloud model C (same costs).
- ``random``: the best random mix of fixed choices at each budget (the upper concave hull of the
  (mean cost, mean quality) points of always-one-model; expected value of the random draw).
- ``oracle``: argmax of the true quality - lambda * cost (the N-model oracle).

At a budget B a policy uses the smallest lambda on its grid (negative lambdas included, so that a policy
spends its whole budget even where it predicts no gain) whose mean cost over the prompts (of one seed) is
<= B: lambda is read from predictions only, never from the labels (the budget is met on the prompts
routed, as the device's calibration does). Quality and spend are means over the prompts, then over seeds.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

__all__ = ["BUDGET_GRID", "policy_curve", "random_mix_curve", "evaluate_nmodel", "plot_nmodel"]

BUDGET_GRID_STEP = 0.05


def _budget_grid(max_cost: float) -> np.ndarray:
    return np.round(np.arange(0, max_cost + 1e-9, BUDGET_GRID_STEP), 4)


BUDGET_GRID = _budget_grid


def policy_curve(pred, true, costs, budgets, allowed=None, steps: int = 1500) -> dict[str, np.ndarray]:
    """Per budget: (mean true quality, mean cost) of argmax(pred - lambda * cost) with the smallest lambda
    of a grid whose mean cost is <= the budget. ``allowed`` [M] bool restricts the models (edge kept)."""
    from routet2i.export.router import choose

    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    mask = np.ones(len(c), dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    gain = (pred[:, 1:] - pred[:, :1])[:, mask[1:]] / c[1:][mask[1:]]
    top = max(float(gain.max()), 0.0) * 1.0001 + 1e-9
    levels = np.unique(c[mask])
    span = float(pred[:, mask].max() - pred[:, mask].min())
    bottom = -(span / float(np.diff(levels).min()) * 1.0001 + 1e-9) if len(levels) > 1 else 0.0
    lams = np.linspace(bottom, top, steps + 1)
    rows = np.arange(len(pred))
    spend, qual = np.zeros(len(lams)), np.zeros(len(lams))
    for i, lam in enumerate(lams):
        pick = choose(pred, c, float(lam), mask[None, :].repeat(len(pred), 0))
        spend[i], qual[i] = c[pick].mean(), true[rows, pick].mean()
    out_q, out_c = np.full(len(budgets), np.nan), np.full(len(budgets), np.nan)
    for j, b in enumerate(budgets):
        ok = np.flatnonzero(spend <= b + 1e-9)
        if len(ok) and b <= spend[0] + 1e-9:  # beyond the policy's largest spend: not reachable
            out_q[j], out_c[j] = qual[ok[0]], spend[ok[0]]
    return {"quality": out_q, "cost": out_c}


def random_mix_curve(true, costs, budgets) -> dict[str, np.ndarray]:
    """Best random mix of always-one-model policies at each budget (upper concave hull; expected value)."""
    true = np.asarray(true, dtype=np.float64)
    pts = sorted(zip(np.asarray(costs, dtype=np.float64), true.mean(axis=0), strict=True))
    hull: list[tuple[float, float]] = []
    for p in pts:
        while hull and hull[-1][0] == p[0]:
            if hull[-1][1] >= p[1]:
                break
            hull.pop()
        else:
            while len(hull) >= 2:
                (x1, y1), (x2, y2) = hull[-2], hull[-1]
                if (y2 - y1) * (p[0] - x1) <= (p[1] - y1) * (x2 - x1):
                    hull.pop()
                else:
                    break
            if not hull or hull[-1][1] < p[1]:
                hull.append(p)
    xs, ys = np.array([h[0] for h in hull]), np.array([h[1] for h in hull])
    b = np.asarray(budgets, dtype=np.float64)
    q = np.interp(np.minimum(b, xs[-1]), xs, ys)
    return {"quality": q, "cost": np.minimum(b, xs[-1])}


def evaluate_nmodel(
    data,
    x: np.ndarray,
    mcfg,
    costs: list[int],
    folds: int = 5,
    seeds: int = 3,
    first_seed: int = 0,
    budgets: tuple[float, ...] = (1.0,),
) -> dict[str, Any]:
    """The report's "nmodel" section (see the module docstring)."""
    from routet2i.training.evaluate import folds_by_text
    from routet2i.training.multitask import fit_multitask, predict_model_scores

    t0 = time.perf_counter()
    pair, true = data.pair, data.quality
    n, m = true.shape
    grid = _budget_grid(float(max(costs)))
    grid = np.unique(np.concatenate([grid, np.asarray(budgets, dtype=np.float64)]))
    clouds = data.models[1:]
    names = ["router", *(f"router_only_{c}" for c in clouds), "random", "oracle"]
    per_seed: dict[str, list[dict[str, np.ndarray]]] = {k: [] for k in names}
    for s in range(first_seed, first_seed + seeds):
        fold_id = folds_by_text(pair.prompts, folds, s)
        pred = np.zeros((n, m))
        for f in range(folds):
            test, train = np.flatnonzero(fold_id == f), np.flatnonzero(fold_id != f)
            module = fit_multitask(x, pair, train, mcfg, s * 100 + f, data)
            pred[test] = predict_model_scores(module, x[test])
        per_seed["router"].append(policy_curve(pred, true, costs, grid))
        for j, c in enumerate(clouds):
            allowed = np.zeros(m, dtype=bool)
            allowed[[0, j + 1]] = True
            per_seed[f"router_only_{c}"].append(policy_curve(pred, true, costs, grid, allowed))
        per_seed["random"].append(random_mix_curve(true, costs, grid))
        per_seed["oracle"].append(policy_curve(true, true, costs, grid))
    curves: dict[str, Any] = {}
    for name, runs in per_seed.items():
        q = np.array([r["quality"] for r in runs])
        c = np.array([r["cost"] for r in runs])
        ok = ~np.isnan(q).any(axis=0)
        curves[name] = {
            "budget": [float(b) for b in grid[ok]],
            "quality": [float(v) for v in q[:, ok].mean(0)],
            "quality_std": [float(v) for v in q[:, ok].std(0)],
            "cost": [float(v) for v in c[:, ok].mean(0)],
        }
    at: dict[str, Any] = {}
    for b in budgets:
        row: dict[str, Any] = {}
        for name, cv in curves.items():
            if b in cv["budget"]:
                i = cv["budget"].index(b)
                row[name] = {
                    "quality": cv["quality"][i],
                    "quality_std": cv["quality_std"][i],
                    "cost": cv["cost"][i],
                }
        singles = {k: v for k, v in row.items() if k.startswith("router_only_")}
        if "router" in row and singles:
            best = max(singles, key=lambda k: singles[k]["quality"])
            row["best_single"] = best.removeprefix("router_only_")
            row["gain_over_best_single"] = row["router"]["quality"] - singles[best]["quality"]
        at[f"{b:g}"] = row
    return {
        "models": list(data.models),
        "costs": [int(c) for c in costs],
        "n_prompts": int(n),
        "folds": folds,
        "seeds": seeds,
        "first_seed": first_seed,
        "quality_definition": "mean over metrics of score / the metric's pooled sd over the dataset",
        "model_mean_quality": {mm: float(v) for mm, v in zip(data.models, true.mean(0), strict=True)},
        "curves": curves,
        "at_budget": at,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def plot_nmodel(report: dict[str, Any], path) -> None:
    """PNG of combined quality against average cost per prompt for every policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nm = report["nmodel"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name, cv in nm["curves"].items():
        style = {"oracle": ":", "random": "--"}.get(name, "-")
        ax.plot(cv["cost"], cv["quality"], style, label=name, lw=2 if name == "router" else 1.2)
    ax.set_xlabel("average cost (units per prompt)")
    ax.set_ylabel("combined quality (metric / pooled sd, mean)")
    costs = ", ".join(f"{m}: {c}" for m, c in zip(nm["models"], nm["costs"], strict=True))
    ax.set_title(f"{report['dataset']}: {costs}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    from routet2i.training.evaluate import save_figure

    save_figure(fig, path)
