"""`routet2i data stats`: cloud win rate and mean quality gap by noun count (the paper's Fig. 3).

For one edge/cloud model pair of a quality table, each prompt's combined quality of each model is
Q = sum_i w_i * q_i / sd_i (sd_i: the pooled standard deviation of metric i over both models, as in
ROUTET2I.md section 5; weights uniform by default). The gap is Q_cloud - Q_edge; the cloud wins a prompt
when the gap is > 0, the edge when < 0, and exact ties (frequent with human Likert ratings) are counted
apart. Prompts are grouped by their number of nouns (:func:`routet2i.training.nouns.count_nouns`), counts
at or above ``--max-nouns`` pooled in one last group.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from routet2i._errors import UsageError
from routet2i.paths import check_output_path

if TYPE_CHECKING:
    from routet2i.training.tables import PairData

logger = logging.getLogger(__name__)

__all__ = ["NounStats", "add_arguments", "combined_gap", "format_stats", "noun_stats", "run"]


@dataclass
class NounStats:
    """One row of the table: the prompts with a given noun count."""

    nouns: str  # noun count ("3") or the pooled last group ("8+")
    prompts: int  # prompts in the group
    cloud_win: float  # share of prompts where the cloud image is better (gap > 0)
    tie: float  # share of exact ties (gap == 0)
    edge_win: float  # share of prompts where the edge image is better (gap < 0)
    mean_gap: float  # mean of Q_cloud - Q_edge (pooled-sd units)
    mean_prs: float  # mean PRS label (> 0.5: edge better)


def combined_gap(pair: PairData, weights: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """[n] Q_cloud - Q_edge with each metric divided by its pooled standard deviation (both models)."""
    from routet2i.prs import normalize_weights

    w = normalize_weights(weights, len(pair.metrics))
    sd = np.concatenate([pair.q_edge, pair.q_cloud], axis=0).std(axis=0, ddof=1)
    sd = np.where(sd > 0, sd, 1.0)
    return ((pair.q_cloud - pair.q_edge) / sd) @ w


def noun_stats(
    pair: PairData, max_nouns: int = 8, weights: Sequence[float] | np.ndarray | None = None
) -> tuple[list[NounStats], dict[str, float]]:
    """(rows by noun count, overall summary with the Spearman correlation of noun count and gap)."""
    import pandas as pd
    from routet2i.prs import prs
    from routet2i.training.nouns import count_nouns

    if max_nouns < 1:
        raise UsageError(f"--max-nouns must be >= 1, got {max_nouns}")
    gap = combined_gap(pair, weights)
    labels = prs(pair.q_edge, pair.q_cloud, weights=weights)
    counts = count_nouns(pair.prompts)
    groups = np.minimum(counts, max_nouns)
    rows: list[NounStats] = []

    def _row(name: str, mask: np.ndarray) -> NounStats:
        g = gap[mask]
        return NounStats(
            nouns=name,
            prompts=int(mask.sum()),
            cloud_win=float(np.mean(g > 0)),
            tie=float(np.mean(g == 0)),
            edge_win=float(np.mean(g < 0)),
            mean_gap=float(g.mean()),
            mean_prs=float(labels[mask].mean()),
        )

    for c in range(int(groups.max()) + 1):
        mask = groups == c
        if mask.any():
            rows.append(_row(f"{c}+" if c == max_nouns else str(c), mask))
    all_row = _row("all", np.ones(len(gap), dtype=bool))
    spearman = float(pd.Series(counts).corr(pd.Series(gap), method="spearman"))
    summary = {
        "prompts": len(gap),
        "cloud_win": all_row.cloud_win,
        "tie": all_row.tie,
        "mean_gap": all_row.mean_gap,
    }
    summary["spearman_nouns_gap"] = spearman
    rows.append(all_row)
    return rows, summary


def format_stats(rows: list[NounStats], pair: PairData, summary: dict[str, float]) -> str:
    """A Markdown table (plus a header line) of :func:`noun_stats`."""
    lines = [
        f"{pair.dataset}: {pair.edge_model} (edge) -> {pair.cloud_model} (cloud), {summary['prompts']} prompts, "
        f"metrics {', '.join(pair.metrics)}; Spearman(nouns, gap) = {summary['spearman_nouns_gap']:.3f}",
        "",
        "| nouns | prompts | cloud win % | tie % | edge win % | mean gap (Q_c - Q_e, sd units) | mean PRS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.nouns} | {r.prompts} | {100 * r.cloud_win:.1f} | {100 * r.tie:.1f} | {100 * r.edge_win:.1f} "
            f"| {r.mean_gap:+.3f} | {r.mean_prs:.3f} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", required=True, help="quality table (CSV or Parquet, long format)")
    parser.add_argument("--dataset", required=True, help="dataset name in the table")
    parser.add_argument("--edge-model", required=True, help="edge model name")
    parser.add_argument("--cloud-model", required=True, help="cloud model name")
    parser.add_argument("--metrics", help="comma list of metrics (default: every metric both models have)")
    parser.add_argument("--weights", help="metric weights: '1,3' or 'name=1,other=3' (default uniform)")
    parser.add_argument("--max-nouns", type=int, default=8, help="pool noun counts >= this (default 8)")
    parser.add_argument("--json", help="also write the rows and summary to this JSON file")


def run(args: argparse.Namespace) -> int:
    from routet2i.training.labels import parse_weights
    from routet2i.training.tables import pair_data, read_table

    if args.json:
        check_output_path(args.json, "--json")
    metrics = None if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m.strip()]
    pair = pair_data(read_table(args.table), args.dataset, args.edge_model, args.cloud_model, metrics)
    weights = parse_weights(args.weights, pair.metrics)
    rows, summary = noun_stats(pair, max_nouns=args.max_nouns, weights=weights)
    print(format_stats(rows, pair, summary))
    if args.json:
        payload = {
            "dataset": pair.dataset,
            "edge_model": pair.edge_model,
            "cloud_model": pair.cloud_model,
            "metrics": pair.metrics,
            "summary": summary,
            "rows": [asdict(r) for r in rows],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0
