"""Why does (or doesn't) the RouteT2I router beat the baselines? One setting changed at a time.

Runs the RouteT2I router (and optionally other methods) under variations of one setting each (label
temperature Gamma, K, loss, regularization, extra transformer layers), on all three public datasets with
the same 5 folds x 3 seeds as `make results`, and writes docs/results/experiments.json plus a markdown
table on stdout. Used to choose defaults that hold across datasets (never per dataset).

    .venv/bin/python bench/router_experiments.py                       # the default grid
    .venv/bin/python bench/router_experiments.py --only 'default;gamma=4'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from results import DOCS, PAIRS, TABLE  # noqa: E402

# name -> (TrainConfig overrides, model overrides)
GRID: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "gamma=4": ({"gamma": 4.0}, {}),
    "gamma=16": ({"gamma": 16.0}, {}),
    "loss=mse": ({"loss": "mse"}, {}),
    "top_k=4": ({}, {"top_k": 4}),
    "top_k=16": ({}, {"top_k": 16}),
    "n_layers=1": ({}, {"n_layers": 1}),
    "weight_decay=0.1": ({"weight_decay": 0.1}, {}),
    "lr=3e-4": ({"lr": 3e-4}, {}),
    "small (rank=8, score_dim=32)": ({}, {"rank": 8, "score_dim": 32}),
    "dropout=0.3": ({}, {"dropout": 0.3}),
    "gamma=4, top_k=16": ({"gamma": 4.0}, {"top_k": 16}),
    "no early stopping (100 epochs)": ({"max_epochs": 100, "patience": 1000, "restore_best": False}, {}),
}


def main(argv: list[str] | None = None) -> int:
    from routet2i.prs import normalize_weights
    from routet2i.training.evaluate import evaluate_pair
    from routet2i.training.tables import pair_data, read_table
    from routet2i.training.train import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="grid names separated by ';'")
    parser.add_argument("--methods", default="routet2i")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="a different seed set measures the noise")
    parser.add_argument("--tag", default="", help="suffix of the result names (e.g. @seeds3-5)")
    parser.add_argument("--out", default=str(DOCS / "results" / "experiments.json"))
    args = parser.parse_args(argv)
    names = list(GRID) if args.only is None else args.only.split(";")
    df = read_table(TABLE)
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for name in names:
        train_over, model_over = GRID[name]
        for ds, (edge, cloud) in PAIRS.items():
            pair = pair_data(df, ds, edge, cloud)
            t0 = time.perf_counter()
            rep = evaluate_pair(
                pair,
                normalize_weights(None, len(pair.metrics)),
                args.methods.split(","),
                seeds=args.seeds,
                first_seed=args.first_seed,
                train_cfg=replace(TrainConfig(), **train_over),
                overrides=model_over,
                n_boot=0,
                progress=False,
            )
            for m, e in rep["methods"].items():
                results.setdefault(name + args.tag, {}).setdefault(ds, {})[m] = {
                    "delta_p": e["delta_p"],
                    "delta_p_std": e["delta_p_std"],
                    "mean_best_epoch": e.get("mean_best_epoch"),
                }
            dp = rep["methods"][args.methods.split(",")[0]]["delta_p"]
            print(
                f"{name + args.tag:18s} {ds:16s} "
                + " ".join(f"{v:6.1f}" for v in dp.values())
                + f"  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(results, indent=1))
    print()
    print("| setting | " + " | ".join(f"{d} ΔP@30/50/70" for d in PAIRS) + " |")
    print("|---|" + "---|" * len(PAIRS))
    for name, per_ds in results.items():
        cells = []
        for d in PAIRS:
            e = per_ds.get(d, {}).get(args.methods.split(",")[0])
            cells.append(" / ".join(f"{v:.0f}" for v in e["delta_p"].values()) if e else "–")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
