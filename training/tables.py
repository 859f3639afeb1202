"""Quality tables: the long format of CONTRACTS.md section 3, read, validated, written, paired.

A quality table has one row per (dataset, prompt, model, metric) with the columns

    dataset, prompt_id, prompt, model, metric, value, n

``value`` is higher-is-better and finite; ``n`` is how many raters or images were averaged (may be empty).
CSV (``.csv``, ``.csv.gz``) and Parquet (``.parquet``, ``.pq``) are both read and written.

Several images per prompt and model: a table may carry an optional ``image`` column (any label: an index,
a seed, a file name). Its rows are then keyed by (dataset, prompt, model, metric, image), and
:func:`read_table` averages the images of each (dataset, prompt, model, metric) into one row whose ``n``
is the number of images averaged. Without an ``image`` column a repeated key is an error.
(`routet2i data build --images-per-prompt K` averages its K images itself and writes ``n = K``.)

Every error is one line (:class:`routet2i._errors.UsageError`); :func:`write_table` writes to a temporary
file beside the target and renames it, so a failed write leaves nothing half-written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from routet2i._errors import UsageError
from routet2i.paths import atomic_path

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "IMAGE_COLUMN",
    "KEY",
    "NModelData",
    "PairData",
    "average_images",
    "nmodel_data",
    "pair_data",
    "read_table",
    "validate_table",
    "write_table",
]

COLUMNS = ["dataset", "prompt_id", "prompt", "model", "metric", "value", "n"]
TEXT_COLUMNS = ["dataset", "prompt_id", "prompt", "model", "metric"]
KEY = ["dataset", "prompt", "model", "metric"]
IMAGE_COLUMN = "image"  # optional: several images per (dataset, prompt, model), averaged on read
_PARQUET = (".parquet", ".pq")
_MAX_LISTED = 20  # names listed in an "unknown name" error before "..."


def _listing(names: Sequence[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in _PARQUET


def _row_ref(df: pd.DataFrame, i: int) -> str:
    row = df.iloc[i]
    parts = [f"{c}={row[c]!r}" for c in ("dataset", "prompt_id", "model", "metric") if c in df.columns]
    return f"row {i + 1} ({', '.join(parts)})"


def validate_table(df: pd.DataFrame, source: str = "table") -> pd.DataFrame:
    """Check a long-format table and return a normalized copy (text columns str, value/n float).

    Raises UsageError (one line, naming ``source``) for: missing columns, empty text fields, a prompt_id
    with two prompt texts, non-numeric or non-finite values, negative ``n``, repeated keys.
    """
    import pandas as pd

    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise UsageError(
            f"{source}: missing column(s) {', '.join(missing)}; a quality table needs "
            f"{','.join(COLUMNS)} (found: {','.join(map(str, df.columns))})"
        )
    has_image = IMAGE_COLUMN in df.columns
    out = df[COLUMNS + ([IMAGE_COLUMN] if has_image else [])].copy().reset_index(drop=True)
    for col in TEXT_COLUMNS + ([IMAGE_COLUMN] if has_image else []):
        s = out[col]
        empty = s.isna() | (s.astype("str").str.len() == 0)
        if empty.any():
            raise UsageError(
                f"{source}: empty {col!r} in {int(empty.sum())} row(s), first at {_row_ref(out, int(np.flatnonzero(empty)[0]))}"
            )
        out[col] = s.astype("str")
    for col in ("value", "n"):
        raw = out[col]
        num = pd.to_numeric(raw, errors="coerce").astype("float64")
        bad_text = num.isna() & ~(raw.isna() | (raw.astype("str").isin(["", "nan", "NaN"])))
        if bad_text.any():
            i = int(np.flatnonzero(bad_text)[0])
            raise UsageError(f"{source}: {col!r} is not a number at {_row_ref(out, i)}: {raw.iloc[i]!r}")
        out[col] = num
    nonfinite = ~np.isfinite(out["value"].to_numpy())
    if nonfinite.any():
        i = int(np.flatnonzero(nonfinite)[0])
        raise UsageError(
            f"{source}: {int(nonfinite.sum())} non-finite 'value'(s), first at {_row_ref(out, i)}: {out['value'].iloc[i]}"
        )
    n = out["n"].to_numpy()
    bad_n = np.isinf(n) | (n < 0)
    if bad_n.any():
        i = int(np.flatnonzero(bad_n)[0])
        raise UsageError(
            f"{source}: 'n' must be empty or a finite count >= 0, got {n[i]} at {_row_ref(out, i)}"
        )
    key = KEY + ([IMAGE_COLUMN] if has_image else [])
    dup = out.duplicated(key, keep="first")
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        hint = "" if has_image else f" (several images per prompt: add an {IMAGE_COLUMN!r} column)"
        raise UsageError(
            f"{source}: {int(dup.sum())} duplicate ({', '.join(key)}) key(s), first at {_row_ref(out, i)}{hint}"
        )
    ids = out[["dataset", "prompt_id", "prompt"]].drop_duplicates()
    clash = ids.duplicated(["dataset", "prompt_id"], keep=False)
    if clash.any():
        row = ids[clash].iloc[0]
        raise UsageError(
            f"{source}: prompt_id {row['prompt_id']!r} of dataset {row['dataset']!r} has several prompt texts"
        )
    return out


def average_images(df: pd.DataFrame) -> pd.DataFrame:
    """Average the ``image`` rows of each (dataset, prompt, model, metric); ``n`` = images averaged.

    A table without an ``image`` column is returned unchanged.
    """
    if IMAGE_COLUMN not in df.columns:
        return df
    group = ["dataset", "prompt_id", "prompt", "model", "metric"]
    agg = df.groupby(group, sort=False, as_index=False).agg(value=("value", "mean"), n=("value", "size"))
    agg["n"] = agg["n"].astype("float64")
    n_multi = int((agg["n"] > 1).sum())
    if n_multi:
        logger.info("averaged several images for %d (prompt, model, metric) rows", n_multi)
    return agg[COLUMNS]


def read_table(path: str | os.PathLike[str], average: bool = True) -> pd.DataFrame:
    """Read and validate a quality table (CSV or Parquet). Several images per prompt are averaged
    (``average=False`` keeps the raw ``image`` rows)."""
    import pandas as pd

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"quality table {str(p)!r} is a folder; give the .csv or .parquet file")
    if not p.is_file():
        raise UsageError(f"quality table {str(p)!r} does not exist (build one with `routet2i data build`)")
    try:
        if _is_parquet(p):
            df = pd.read_parquet(p)
        else:
            # Text columns stay text ("00001" is an id, "NA" and "null" are prompts); only value/n are numbers.
            df = pd.read_csv(p, dtype="str", keep_default_na=False)
    except (ValueError, OSError, ImportError) as exc:  # pandas/pyarrow parse errors are ValueErrors
        raise UsageError(f"cannot read quality table {str(p)!r}: {str(exc).splitlines()[0]}") from exc
    if not _is_parquet(p):
        for col in ("value", "n"):
            if col in df.columns:
                df[col] = df[col].where(df[col] != "", None)
    out = validate_table(df, source=str(p))
    return average_images(out) if average else out


def _n_column(n: pd.Series) -> pd.Series:
    vals = n.to_numpy(dtype="float64")
    finite = vals[~np.isnan(vals)]
    if np.all(finite == np.round(finite)):
        return n.astype("Int64")  # integral counts print as 3, not 3.0
    return n


def write_table(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Validate ``df`` and write it to ``path`` (CSV or Parquet by extension) via a temp file + rename."""
    p = Path(path)
    out = validate_table(df, source="table to write")
    out["n"] = _n_column(out["n"])
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        if _is_parquet(p):
            out.to_parquet(tmp, index=False)
        else:
            compression = "gzip" if p.suffix.lower() == ".gz" else None
            out.to_csv(tmp, index=False, na_rep="", compression=compression)
    logger.info("wrote %d rows to %s", len(out), p)
    return p


@dataclass
class PairData:
    """Per-prompt metric matrices of one edge/cloud model pair on one dataset (rows aligned)."""

    dataset: str  # dataset name in the table
    edge_model: str  # model whose images the device would make
    cloud_model: str  # model whose images the cloud would make
    metrics: list[str]  # the k metric names, column order of q_edge / q_cloud
    prompt_ids: list[str]  # n prompt ids, row order
    prompts: list[str]  # n prompt texts, row order
    q_edge: np.ndarray  # [n, k] float64 metric values of the edge model (higher is better)
    q_cloud: np.ndarray  # [n, k] float64 metric values of the cloud model
    # Every model of the dataset on the same prompts and metrics (auxiliary targets of the multi-task
    # router): names [M] and values [n, M, k] (NaN where a model lacks a prompt or metric).
    all_models: list[str] | None = None
    q_all: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)


def pair_data(
    df: pd.DataFrame,
    dataset: str,
    edge_model: str,
    cloud_model: str,
    metrics: Sequence[str] | None = None,
) -> PairData:
    """Align the edge and cloud metric values of every prompt of ``dataset``.

    ``metrics`` None: every metric that both models have (table order). Prompts missing a chosen metric
    for either model are dropped (count logged). Unknown names raise UsageError listing the known ones.
    """
    if df.empty:
        raise UsageError("the quality table is empty")
    datasets = list(dict.fromkeys(df["dataset"]))
    if dataset not in datasets:
        raise UsageError(f"--dataset {dataset!r} is not in the table; datasets: {_listing(datasets)}")
    d = df[df["dataset"] == dataset]
    models = list(dict.fromkeys(d["model"]))
    for arg, name in (("--edge-model", edge_model), ("--cloud-model", cloud_model)):
        if name not in models:
            raise UsageError(f"{arg} {name!r} is not in dataset {dataset!r}; models: {_listing(models)}")
    if edge_model == cloud_model:
        raise UsageError(f"--edge-model and --cloud-model must differ, both are {edge_model!r}")
    everyone = d
    d = d[d["model"].isin([edge_model, cloud_model])]
    have = {m: list(dict.fromkeys(d.loc[d["model"] == m, "metric"])) for m in (edge_model, cloud_model)}
    if metrics is None:
        chosen = [m for m in have[edge_model] if m in have[cloud_model]]
        dropped = sorted(set(have[edge_model]) ^ set(have[cloud_model]))
        if dropped:
            logger.warning("metrics not shared by %s and %s ignored: %s", edge_model, cloud_model, dropped)
        if not chosen:
            raise UsageError(f"{edge_model!r} and {cloud_model!r} share no metric in dataset {dataset!r}")
    else:
        chosen = list(metrics)
        if not chosen:
            raise UsageError("--metrics is empty; give at least one metric name")
        if len(set(chosen)) != len(chosen):
            raise UsageError(f"--metrics names a metric twice: {','.join(chosen)}")
        all_metrics = list(dict.fromkeys(d["metric"]))
        for m in chosen:
            for model in (edge_model, cloud_model):
                if m not in have[model]:
                    raise UsageError(
                        f"metric {m!r} is not in dataset {dataset!r} for model {model!r}; "
                        f"metrics: {_listing(have[model] or all_metrics)}"
                    )
    d = d[d["metric"].isin(chosen)]
    order = list(dict.fromkeys(d["prompt_id"]))
    texts = dict(zip(d["prompt_id"], d["prompt"], strict=True))
    wide = d.pivot_table(index="prompt_id", columns=["model", "metric"], values="value", aggfunc="first")
    wide = wide.reindex(index=order)
    cols_e = [(edge_model, m) for m in chosen]
    cols_c = [(cloud_model, m) for m in chosen]
    wide = wide.reindex(columns=cols_e + cols_c)
    complete = wide.notna().all(axis=1).to_numpy()
    n_drop = int((~complete).sum())
    if n_drop:
        logger.warning(
            "dataset %s: %d of %d prompts dropped (a metric is missing for %s or %s)",
            dataset,
            n_drop,
            len(complete),
            edge_model,
            cloud_model,
        )
    wide = wide[complete]
    if wide.empty:
        raise UsageError(
            f"dataset {dataset!r}: no prompt has every chosen metric for both {edge_model!r} and {cloud_model!r}"
        )
    ids = [str(i) for i in wide.index]
    everyone = everyone[everyone["metric"].isin(chosen)]
    full = everyone.pivot_table(
        index="prompt_id", columns=["model", "metric"], values="value", aggfunc="first"
    )
    full = full.reindex(index=wide.index, columns=[(m, x) for m in models for x in chosen])
    q_all = full.to_numpy(dtype=np.float64).reshape(len(ids), len(models), len(chosen))
    return PairData(
        dataset=dataset,
        edge_model=edge_model,
        cloud_model=cloud_model,
        metrics=chosen,
        prompt_ids=ids,
        prompts=[texts[i] for i in ids],
        q_edge=wide[cols_e].to_numpy(dtype=np.float64),
        q_cloud=wide[cols_c].to_numpy(dtype=np.float64),
        all_models=models,
        q_all=q_all,
    )


@dataclass
class NModelData:
    """An edge model and several cloud models on the same prompts: the N-model router's targets.

    ``pair`` is the pair (edge, first cloud model) restricted to the prompts every model has;
    ``quality`` [n, M] is each model's combined quality (mean over the metrics of score / that metric's
    pooled sd over all the dataset's scores of that metric), columns in ``models`` order (edge first)."""

    pair: PairData
    models: list[str]  # edge, then the cloud models in --cloud-model order
    quality: np.ndarray  # [n, M] combined quality
    metric_sd: np.ndarray  # [k] pooled sd of each metric over all the dataset's scores
    columns: list[int]  # index of each model in pair.all_models


def nmodel_data(
    df: pd.DataFrame,
    dataset: str,
    edge_model: str,
    cloud_models: Sequence[str],
    metrics: Sequence[str] | None = None,
) -> NModelData:
    """The pair (edge, first cloud model) plus every cloud model's scores on the same prompts and metrics.

    Prompts lacking a chosen metric for any of the models are dropped (count logged)."""
    if len(set(cloud_models)) != len(cloud_models):
        raise UsageError(f"--cloud-model names a model twice: {', '.join(cloud_models)}")
    pair = pair_data(df, dataset, edge_model, cloud_models[0], metrics)
    assert pair.all_models is not None and pair.q_all is not None
    for name in cloud_models[1:]:
        if name not in pair.all_models:
            raise UsageError(
                f"--cloud-model {name!r} is not in dataset {dataset!r}; models: {_listing(pair.all_models)}"
            )
        if name == edge_model:
            raise UsageError(f"--edge-model and --cloud-model must differ, both are {edge_model!r}")
    models = [edge_model, *cloud_models]
    columns = [pair.all_models.index(m) for m in models]
    q = pair.q_all[:, columns]  # [n, M, k]
    keep = ~np.isnan(q).any(axis=(1, 2))
    if not keep.all():
        logger.warning(
            "dataset %s: %d of %d prompts dropped (a metric is missing for one of %s)",
            dataset,
            int((~keep).sum()),
            len(keep),
            ", ".join(models),
        )
    if keep.sum() < 2:
        raise UsageError(
            f"dataset {dataset!r}: fewer than 2 prompts have every metric for {', '.join(models)}"
        )
    rows = np.flatnonzero(keep)
    pair = PairData(
        dataset=pair.dataset,
        edge_model=pair.edge_model,
        cloud_model=pair.cloud_model,
        metrics=pair.metrics,
        prompt_ids=[pair.prompt_ids[i] for i in rows],
        prompts=[pair.prompts[i] for i in rows],
        q_edge=pair.q_edge[rows],
        q_cloud=pair.q_cloud[rows],
        all_models=pair.all_models,
        q_all=pair.q_all[rows],
    )
    d = df[(df["dataset"] == dataset) & df["metric"].isin(pair.metrics)]
    sd = np.array(
        [float(np.std(d.loc[d["metric"] == m, "value"].to_numpy(dtype=np.float64))) for m in pair.metrics]
    )
    sd = np.where(sd > 0, sd, 1.0)
    quality = (pair.q_all[:, columns] / sd).mean(axis=2)
    return NModelData(pair=pair, models=models, quality=quality, metric_sd=sd, columns=columns)
