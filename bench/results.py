"""Regenerate docs/RESULTS.md: every router on the public quality datasets and EvalMi-50K (`make results`).

For each dataset (edge -> cloud pair of ../shared/data/README.md) this runs the same evaluation as
`routet2i eval` (every method and the three ablations, 5 folds x 3 seeds, default settings, no per-dataset
tuning), writes docs/results/<dataset>.json and docs/<dataset>_curves.png, then docs/RESULTS.md with the
paper-style tables (Delta P at 30/50/70 %, cloud saving at 40/50/60 %, ablations) and the hand-written
analysis kept in docs/RESULTS_NOTES.md.

    .venv/bin/python bench/results.py                 # run all five (10-40 min each on 2 shared cores)
    .venv/bin/python bench/results.py --only tifa160  # one dataset; the others are read from their JSON
    .venv/bin/python bench/results.py --reuse         # rebuild RESULTS.md and the plots from the JSON files
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SHARED = Path(os.environ.get("ROUTET2I_SHARED_DATA", REPO.parent / "shared" / "data"))
TABLE = SHARED / "quality" / "public_quality_long.csv"
EVALMI = SHARED / "quality" / "evalmi50k_dev.csv"

# report name -> (edge model, cloud model); every metric the two share (tifa160: 5, agiqa3k: 2, genai: 1,
# evalmi50k: 3 human ratings).
PAIRS = {
    "genai_bench_527": ("SDXL_2_1", "SDXL_Base"),
    "tifa160": ("stable_diffusion_v1_5", "stable_diffusion_v2_1"),
    "agiqa3k": ("sd1.5_normal", "xl2.2_normal"),
    "evalmi50k": ("sd_v2-1", "sd3_5_large"),  # the product's own pair (issue 15)
    "evalmi50k_sdxl": ("sd_v2-1", "sdxl_base_1"),
}
# report name -> (table, dataset name in it); default: TABLE and the report name.
SOURCES = {"evalmi50k": (EVALMI, "evalmi50k"), "evalmi50k_sdxl": (EVALMI, "evalmi50k")}


def source(name: str) -> tuple[Path, str]:
    return SOURCES.get(name, (TABLE, name))


RATES = (0.3, 0.5, 0.7)
TARGETS = (40.0, 50.0, 60.0)
MAIN = [
    "multitask",
    "routet2i",
    "gap_regression",
    "zooter",
    "hybrid_llm",
    "routellm_bert",
    "noun_count",
    "random",
    "oracle",
]
ABL = ["routet2i", "routet2i_no_multimetric", "routet2i_no_token_selection", "routet2i_no_dual_gate"]


def run_dataset(name: str, folds: int, seeds: int, only_methods: list[str] | None = None) -> dict:
    from routet2i.prs import normalize_weights
    from routet2i.training.baselines import METHODS
    from routet2i.training.evaluate import evaluate_pair, plot_curves, write_json
    from routet2i.training.tables import pair_data, read_table

    edge, cloud = PAIRS[name]
    table, dataset = source(name)
    pair = pair_data(read_table(table), dataset, edge, cloud)
    weights = normalize_weights(None, len(pair.metrics))
    # The 1,590-prompt EvalMi-50K pairs: the main methods only (the MoE ablations would add ~3 x the MoE's
    # time on 2 shared cores; they are measured on the three public datasets).
    methods = list(METHODS) if table == TABLE else [m for m in METHODS if m in MAIN]
    path = DOCS / "results" / f"{name}.json"
    if only_methods:  # re-run these methods only, keep the others' entries (same folds, seeds, tie order)
        methods = only_methods
    report = evaluate_pair(pair, weights, methods, folds=folds, seeds=seeds, rates=RATES, targets=TARGETS)
    report["report_name"] = name
    if only_methods and path.is_file():
        old = json.loads(path.read_text())
        if (old["folds"], old["seeds"], old.get("first_seed", 0)) == (folds, seeds, 0):
            merged = dict(old["methods"])
            merged.update(report["methods"])
            report["methods"] = {m: merged[m] for m in METHODS if m in merged}
            report["seconds"] = old["seconds"] + report["seconds"]
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs while measured)"
    report["generated_unix"] = int(time.time())
    write_json(report, DOCS / "results" / f"{name}.json")
    plot_curves(report, DOCS / f"{name}_curves.png")
    print(f"{name}: {report['seconds']:.0f} s for all methods, {folds} folds x {seeds} seeds", flush=True)
    return report


def _pm(mean: float, std: float) -> str:
    return f"{mean:.1f} ± {std:.1f}"


def _dataset_table(r: dict, methods: list[str]) -> list[str]:
    head = "| method | ΔP@30 % | ΔP@50 % | ΔP@70 % | ΔP@50 % 95 % CI | saving @ΔP 40 % | @50 % | @60 % |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        e = r["methods"].get(m)
        if e is None:
            continue
        dp = [_pm(e["delta_p"][f"{x:g}"], e["delta_p_std"][f"{x:g}"]) for x in RATES]
        lo, hi = e["delta_p_ci95"]["0.5"]
        sv = [_pm(e["cloud_saving"][f"{t:g}"], e["cloud_saving_std"][f"{t:g}"]) for t in TARGETS]
        lines.append(f"| {m} | " + " | ".join(dp) + f" | [{lo:.0f}, {hi:.0f}] | " + " | ".join(sv) + " |")
    return lines


def _summary_table(reports: dict[str, dict], methods: list[str]) -> list[str]:
    names = list(reports)
    lines = ["| method | " + " | ".join(names) + " | mean |", "|---|" + "---|" * (len(names) + 1)]
    for m in methods:
        vals = [reports[n]["methods"][m]["delta_p"]["0.5"] for n in names if m in reports[n]["methods"]]
        cells = [
            _pm(reports[n]["methods"][m]["delta_p"]["0.5"], reports[n]["methods"][m]["delta_p_std"]["0.5"])
            if m in reports[n]["methods"]
            else "–"
            for n in names
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {sum(vals) / max(len(vals), 1):.1f} |")
    return lines


def _evalmi_experiments() -> list[str]:
    """The router experiments on EvalMi-50K (bench/router_evalmi50k.py) as tables, when they were run."""
    path = DOCS / "results" / "evalmi50k_experiments.json"
    if not path.is_file():
        return []
    exp = json.loads(path.read_text())
    out = [
        "",
        "## Router experiments on EvalMi-50K: sd_v2-1 -> sd3_5_large (`bench/router_evalmi50k.py`)",
        "",
        "One head or setting at a time on frozen all-MiniLM-L6-v2 features (masked-mean pooled per layer).",
        "Seeds 0-2: the 5 folds x 3 seeds of `routet2i eval` (same splits and tie order); `seeds10+1`: a",
        "one-seed screen on other splits (seed 10), used to choose settings without looking at seeds 0-2.",
        "",
        "| variant | seeds | ΔP@30 % | ΔP@50 % | ± std | ΔP@50 % 95 % CI | ΔP@70 % | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in exp.items():
        if key.endswith(":calibration"):
            continue
        parts = key.split(":")
        cloud, variant = parts[0], parts[1]
        seeds = parts[2] if len(parts) > 2 else "0-2"
        if seeds.startswith("train_fraction="):  # the learning curve: that share of each training fold
            variant, seeds = f"{variant}, {seeds.replace('_', ' ')}", "0-2"
        if cloud != "sd3_5_large":
            variant = f"{variant} (-> {cloud})"
        lo, hi = r["ci95_0.5"]
        dp = r["delta_p"]
        out.append(
            f"| {variant} | {seeds} | {dp['0.3']:.1f} | {dp['0.5']:.1f} | {r['delta_p_std_0.5']:.1f} | "
            f"[{lo:.1f}, {hi:.1f}] | {dp['0.7']:.1f} | {r['seconds']:.0f} |"
        )
    cal = {k: v for k, v in exp.items() if k.endswith(":calibration")}
    if cal:
        out += [
            "",
            "Calibration (item 4): on each outer fold's training part, what `routet2i train` does (fit + the",
            "table from 5-fold out-of-fold predictions), then `export router --target-rate`'s alpha; the cloud",
            "rate it gives on the held-out fold.",
            "",
            "| router | target rate | held-out cloud rate (mean of folds) | worst fold off by |",
            "|---|---|---|---|",
        ]
        for key, r in cal.items():
            for rate, v in r.items():
                out.append(f"| {key.split(':')[1]} | {rate} | {v['mean']:.3f} | {v['max_abs_err']:.3f} |")
    return out


NMODEL_COMMANDS = {
    "evalmi50k_nmodel": "--cloud-model sdxl_base_1 --cloud-model sd3_5_large --costs sdxl_base_1=1,sd3_5_large=3"
    " --budgets 0.5,1.0,1.5",
    "evalmi50k_nmodel4": "--cloud-model sdxl_base_1 --cloud-model ali_flux_schnell --cloud-model DALLE3"
    " --costs sdxl_base_1=1,ali_flux_schnell=2,DALLE3=4 --budgets 0.5,1.0,2.0",
}


def _nmodel_sections() -> list[str]:
    """N-model routing on EvalMi-50K (issue 14): docs/results/evalmi50k_nmodel*.json from `routet2i eval`."""
    out: list[str] = []
    for name, flags in NMODEL_COMMANDS.items():
        path = DOCS / "results" / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        nm = r["nmodel"]
        tiers = "; ".join(f"{m}: {c}" for m, c in zip(nm["models"], nm["costs"], strict=True))
        out += [
            "",
            f"## N-model routing on EvalMi-50K: {{{tiers}}} (issue 14)",
            "",
            f"`routet2i eval --table ../shared/data/quality/evalmi50k_dev.csv --dataset evalmi50k --edge-model "
            f"{nm['models'][0]} {flags} --folds {nm['folds']} --seeds {nm['seeds']}` ({nm['n_prompts']} prompts,"
            f" {nm['seconds'] / 60:.1f} min). Combined quality: mean over the metrics of score / that metric's"
            " pooled sd over the dataset; cost: average units per prompt (edge 0). Per seed, the N-model router"
            " (default multitask settings) predicts every model's quality out of fold; each policy picks the"
            " argmax of predicted quality - lambda x cost with the lambda whose mean spend over the prompts is"
            " at most the budget (read from the predictions, never the labels). `router_only_C`: the same"
            " predictions, edge vs C only. `random`: the best random mix of always-one-model choices. Mean ±"
            " std over seeds. Mean quality of each model alone: "
            + ", ".join(f"{m} {q:.3f}" for m, q in nm["model_mean_quality"].items())
            + ".",
            "",
            "| budget | router | "
            + " | ".join(f"only {c}" for c in nm["models"][1:])
            + " | random mix | oracle | router - best single |",
            "|---" * (len(nm["models"]) + 4) + "|",
        ]
        for b, row in nm["at_budget"].items():

            def cell(key: str, row: dict = row) -> str:
                v = row.get(key)
                return "—" if v is None else f"{v['quality']:.3f} ± {v['quality_std']:.3f} @ {v['cost']:.2f}"

            gain = row.get("gain_over_best_single")
            gain_s = "—" if gain is None else f"{gain:+.3f} (vs {row['best_single']})"
            cells = [cell("router"), *(cell(f"router_only_{c}") for c in nm["models"][1:])]
            out.append(
                f"| {b} | " + " | ".join(cells) + f" | {cell('random')} | {cell('oracle')} | {gain_s} |"
            )
        out += ["", "Cells: quality ± std over seeds @ mean spend (units per prompt).", ""]
        out += [f"![{name}]({name}_curves.png)"]
    return out


def write_results(reports: dict[str, dict]) -> Path:
    out = [
        "# Router results on public quality data and EvalMi-50K",
        "",
        "Generated by `make results` (`bench/results.py`); the analysis is `docs/RESULTS_NOTES.md`, included",
        "below. Do not edit this file by hand.",
        "",
        "Setup: frozen all-MiniLM-L6-v2 token states, every method with the same backbone, trainer budget,",
        "early stopping and splits; 5 folds (split by prompt text) x 3 seeds; default settings for every",
        "dataset (no per-dataset tuning). ΔP is pooled over all out-of-fold decisions of one seed, then mean ±",
        "std over the seeds (ROUTET2I.md section 5); the 95 % interval is a prompt-level bootstrap with the",
        "three seeds' decisions averaged. Cloud saving: 100 x (1 - the smallest cloud rate whose ΔP reaches",
        "the target), mean ± std over seeds. Random routing gives ΔP about 100 x rate; the oracle (true gap) is",
        "an upper bound, not a router. `multitask` (the default router, README) reads the same frozen",
        "backbone with every layer mean-pooled; the EvalMi-50K pairs run the main methods only.",
        "",
        "| dataset | edge -> cloud | metrics | prompts | cloud wins | ties | eval time (all methods) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in reports.items():
        out.append(
            f"| {n} | {r['edge_model']} -> {r['cloud_model']} | {', '.join(r['metrics'])} | {r['n_prompts']} | "
            f"{100 * r['cloud_win_rate']:.0f} % | {100 * r['tie_rate']:.0f} % | {r['seconds'] / 60:.1f} min |"
        )
    out += ["", "Eval time: wall clock on 2 CPU cores shared with other jobs while measured.", ""]
    out += ["## ΔP at 50 % cloud rate, every dataset", ""]
    out += _summary_table(reports, MAIN + ABL[1:])
    for n, r in reports.items():
        out += ["", f"## {n}: {r['edge_model']} -> {r['cloud_model']}", ""]
        out += _dataset_table(r, MAIN + ABL[1:])
        out += ["", f"![{n}]({n}_curves.png)"]
    out += _evalmi_experiments()
    out += _nmodel_sections()
    notes = DOCS / "RESULTS_NOTES.md"
    if notes.is_file():
        out += ["", notes.read_text().rstrip(), ""]
    path = DOCS / "RESULTS.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(out) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated datasets to re-run (others: JSON)")
    parser.add_argument("--reuse", action="store_true", help="rebuild RESULTS.md from the JSON files only")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--methods", default=None, help="re-run only these methods, merged into the existing JSON"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("ROUTET2I_LOG_LEVEL", "WARNING"))
    todo = list(PAIRS) if args.only is None else [s.strip() for s in args.only.split(",")]
    unknown = [d for d in todo if d not in PAIRS]
    if unknown:
        print(f"unknown dataset(s) {unknown}; available: {', '.join(PAIRS)}", file=sys.stderr)
        return 2
    missing = sorted({str(source(d)[0]) for d in todo if not source(d)[0].exists()})
    if not args.reuse and missing:
        print(
            f"quality data not found: {', '.join(missing)} (../shared/data is not part of the repo)",
            file=sys.stderr,
        )
        return 2
    reports = {}
    for name in PAIRS:
        path = DOCS / "results" / f"{name}.json"
        if not args.reuse and name in todo:
            only = [m.strip() for m in args.methods.split(",")] if args.methods else None
            reports[name] = run_dataset(name, args.folds, args.seeds, only)
        elif path.is_file():
            from routet2i.training.evaluate import plot_curves

            reports[name] = json.loads(path.read_text())
            plot_curves(reports[name], DOCS / f"{name}_curves.png")
    if not reports:
        print("no results to write", file=sys.stderr)
        return 2
    print(f"wrote {write_results(reports)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
