"""Label or architecture? The pooled-mean MLP head of `gap_regression` trained on the PRS label.

RouteT2I differs from the gap-regression baseline in two ways at once: its label (PRS soft labels, mostly
"who won") and its architecture (dual-gated token-selection MoE vs an MLP on mean-pooled token states).
This trains the baseline's architecture on RouteT2I's label (target 0.5 - PRS, MSE) with the same folds,
seeds and trainer, so the two effects separate. Prints ΔP at 30/50/70 % for seed sets 0-2, 3-5 and 6-8.

    .venv/bin/python bench/router_label_diagnostic.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import PAIRS, TABLE  # noqa: E402


def main() -> int:
    import routet2i.training.train as train
    from routet2i.prs import metric_distances, normalize_weights, prs_from_distances
    from routet2i.training.evaluate import evaluate_pair
    from routet2i.training.tables import pair_data, read_table

    original = train.make_targets

    def prs_label(method, q_edge, q_cloud, weights, sd, cfg, tau=1.0):
        if method == "gap_regression":
            prs = prs_from_distances(metric_distances(q_edge, q_cloud, gamma=cfg.gamma, eps=cfg.eps), weights)
            return (0.5 - prs).astype(np.float32)[:, None]  # higher = the cloud is better, like the gap
        return original(method, q_edge, q_cloud, weights, sd, cfg, tau)

    train.make_targets = prs_label  # evaluate_pair looks it up through train_on at call time
    df = read_table(TABLE)
    for ds, (edge, cloud) in PAIRS.items():
        pair = pair_data(df, ds, edge, cloud)
        for first_seed in (0, 3, 6):
            rep = evaluate_pair(
                pair,
                normalize_weights(None, len(pair.metrics)),
                ["gap_regression"],
                first_seed=first_seed,
                n_boot=0,
                progress=False,
            )
            dp = rep["methods"]["gap_regression"]["delta_p"]
            print(
                f"{ds:16s} seeds {first_seed}-{first_seed + 2}: "
                + " / ".join(f"{v:.1f}" for v in dp.values())
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
