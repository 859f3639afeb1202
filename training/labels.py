"""`routet2i labels`: PRS soft labels for one edge/cloud model pair of a quality table.

Writes ``prompt_id,prompt,D_<metric>...,prs`` (CONTRACTS.md section 3) with D_i and PRS computed exactly as
ROUTET2I.md section 2 by :mod:`routet2i.prs`. Defaults: gamma 1.0, eps 1e-6, uniform weights; the dataset
means mu_i are the means over the prompts kept for this pair (prompts missing a metric for either model
are dropped, with the count in the log).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from routet2i._errors import UsageError
from routet2i.paths import atomic_path, check_output_path
from routet2i.prs import DEFAULT_EPS, DEFAULT_GAMMA, metric_distances, normalize_weights

if TYPE_CHECKING:
    import pandas as pd
    from routet2i.training.tables import PairData

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "labels_frame", "parse_weights", "run", "write_labels"]


def parse_weights(text: str | None, metrics: Sequence[str]) -> np.ndarray | None:
    """``"1,3"`` (metric order) or ``"sharp=1,color=3"`` (missing names get 0) -> weights, or None."""
    if text is None or not text.strip():
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    named: dict[str, float] = {}
    try:
        if all("=" in p for p in parts):
            for p in parts:
                name, val = p.split("=", 1)
                named[name.strip()] = float(val)
        else:
            w = [float(p) for p in parts]
    except ValueError as exc:
        raise UsageError(f"--weights {text!r} is not a comma list of numbers or name=number pairs") from exc
    if named:
        unknown = [n for n in named if n not in metrics]
        if unknown:
            raise UsageError(
                f"--weights names unknown metric(s) {', '.join(unknown)}; metrics: {', '.join(metrics)}"
            )
        w = [named.get(m, 0.0) for m in metrics]
    if len(w) != len(metrics):
        raise UsageError(
            f"--weights has {len(w)} value(s) for {len(metrics)} metric(s): {', '.join(metrics)}"
        )
    return normalize_weights(w, len(metrics))


def labels_frame(
    pair: PairData,
    weights: Sequence[float] | np.ndarray | None = None,
    gamma: float = DEFAULT_GAMMA,
    eps: float = DEFAULT_EPS,
) -> pd.DataFrame:
    """The labels table of a :class:`~routet2i.training.tables.PairData`: prompt_id, prompt, D_*, prs."""
    import pandas as pd

    D = metric_distances(pair.q_edge, pair.q_cloud, gamma=gamma, eps=eps)
    w = normalize_weights(weights, D.shape[1])
    out = pd.DataFrame({"prompt_id": pair.prompt_ids, "prompt": pair.prompts})
    for j, m in enumerate(pair.metrics):
        out[f"D_{m}"] = D[:, j]
    out["prs"] = D @ w
    return out


def write_labels(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a labels CSV through a temp file + rename."""
    p = Path(path)
    with atomic_path(p) as tmp:
        df.to_csv(tmp, index=False)
    return p


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", required=True, help="quality table (CSV or Parquet, long format)")
    parser.add_argument("--dataset", required=True, help="dataset name in the table")
    parser.add_argument("--edge-model", required=True, help="model name of the edge images")
    parser.add_argument("--cloud-model", required=True, help="model name of the cloud images")
    parser.add_argument(
        "--out", required=True, help="labels CSV to write (prompt_id,prompt,D_<metric>...,prs)"
    )
    parser.add_argument("--metrics", help="comma list of metrics (default: every metric both models have)")
    parser.add_argument(
        "--weights",
        help="PRS weights: '1,3' in metric order or 'name=1,other=3' (normalized; default uniform)",
    )
    parser.add_argument("--gamma", type=float, default=DEFAULT_GAMMA, help=f"Gamma (default {DEFAULT_GAMMA})")
    parser.add_argument("--eps", type=float, default=DEFAULT_EPS, help=f"eps (default {DEFAULT_EPS:g})")


def run(args: argparse.Namespace) -> int:
    from routet2i.training.tables import pair_data, read_table

    check_output_path(args.out, "--out")
    metrics = None if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m.strip()]
    pair = pair_data(read_table(args.table), args.dataset, args.edge_model, args.cloud_model, metrics)
    weights = parse_weights(args.weights, pair.metrics)
    df = labels_frame(pair, weights=weights, gamma=args.gamma, eps=args.eps)
    write_labels(df, args.out)
    edge_share = float((df["prs"] > 0.5).mean())
    print(
        f"wrote {len(df)} labels ({len(pair.metrics)} metrics) to {args.out}: "
        f"mean PRS {df['prs'].mean():.3f}, edge better for {100 * edge_share:.1f}% of prompts"
    )
    return 0
