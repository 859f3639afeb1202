"""`routet2i data build`: generate edge and cloud images for a prompt file and score them into a quality table.

For every prompt, both pipelines (any two diffusers pipelines, loaded with ``DiffusionPipeline.from_pretrained``)
make ``--images-per-prompt`` images from the same fixed per-prompt seeds; the contrastive CLIP metrics of
:mod:`routet2i.training.metrics` score them; the scores (averaged over a prompt's images, ``n`` = images)
become rows ``dataset,prompt_id,prompt,model,metric,value,n`` of the table ``--out`` (CSV or Parquet).

Crash safety and resuming. Each finished batch of prompts is written as its own small part file (temp +
rename) in ``<out>.parts/``; at the end of a run the parts are merged into ``--out`` through a temp file +
rename, under a lock file ``<out>.lock``. A killed run therefore loses at most the batch in flight and never
leaves a half-written table; the next run merges the parts the killed one left. ``--resume`` skips prompts
whose rows are all present. Without ``--resume``, new prompts are appended to an existing table, and a
table that already holds some of this run's prompts for these models is an error.

Sharding. ``--shard I/N`` (0 <= I < N) takes the prompts whose position in the file (after ``--limit``)
is I modulo N; any number of shards may write to the same ``--out`` at once (the lock serializes merges).

Seeds. Image k of a prompt uses seed ``sha256(f"{seed}:{prompt_id}:{k}")`` (31 bits), the same for the edge
and the cloud pipeline, independent of batching, sharding and resuming.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from routet2i._errors import UsageError
from routet2i.paths import check_output_path

if TYPE_CHECKING:
    import pandas as pd
    from routet2i.training.prompts import PromptRecord

logger = logging.getLogger(__name__)

__all__ = ["BuildConfig", "BuildResult", "add_arguments", "build_table", "model_name", "prompt_seed", "run"]

_PARTS_SUFFIX = ".parts"
_LOCK_SUFFIX = ".lock"


@dataclass
class BuildConfig:
    """Everything `routet2i data build` needs (the CLI flags, one field each)."""

    prompts: Path  # prompt file (txt / csv / tsv / jsonl / json, see routet2i.training.prompts)
    edge_pipeline: str  # diffusers folder or Hugging Face id of the edge model
    cloud_pipeline: str  # diffusers folder or Hugging Face id of the cloud model
    clip: str  # CLIP folder or Hugging Face id for the contrastive metrics
    out: Path  # quality table to create or extend (.csv, .csv.gz, .parquet)
    dataset: str | None = None  # dataset name in the table; default: the prompt file's stem
    edge_model: str | None = None  # model name in the table; default: the edge pipeline's folder name
    cloud_model: str | None = None  # model name in the table; default: the cloud pipeline's folder name
    images_dir: Path | None = None  # save every image as DIR/<model>/<prompt_id>[_<k>].png
    resume: bool = False  # skip prompts already complete in the table (after a crash)
    shard: tuple[int, int] = (0, 1)  # (I, N): this run takes prompts whose index % N == I
    steps: int | None = None  # denoising steps for both pipelines (default: each pipeline's own)
    edge_steps: int | None = None  # overrides steps for the edge pipeline
    cloud_steps: int | None = None  # overrides steps for the cloud pipeline
    width: int | None = None  # image width (default: each pipeline's own)
    height: int | None = None  # image height (default: each pipeline's own)
    guidance: float | None = None  # classifier-free guidance scale (default: each pipeline's own)
    batch_size: int = 4  # prompts per pipeline call (and per part file)
    images_per_prompt: int = 1  # images per prompt and model; their metrics are averaged (n = this)
    column: str | None = None  # prompt column of csv/tsv/json prompt files (default: auto-detected)
    id_column: str | None = None  # id column of the prompt file (default: a hash of the prompt text)
    limit: int | None = None  # use only the first N prompts of the file
    seed: int = 0  # base of the per-prompt seeds
    metrics_file: Path | None = None  # metric pairs table (default: the shipped ten pairs)
    device: str | None = None  # torch device (default: cuda, then mps, then cpu)
    dtype: str | None = None  # torch dtype name (default: float16 on cuda, float32 elsewhere)
    clip_batch_size: int = 32  # images per CLIP call
    progress: bool = True  # show a tqdm progress bar
    extra: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for both pipeline calls


@dataclass
class BuildResult:
    """What a build did."""

    out: Path  # the table written
    dataset: str  # dataset name used
    edge_model: str  # edge model name used
    cloud_model: str  # cloud model name used
    metrics: list[str]  # metric names written
    n_generated: int  # prompts generated by this run
    n_skipped: int  # prompts of this shard already complete (resume)
    seconds: float  # wall time of generation and scoring


def model_name(pipeline: str) -> str:
    """Default model name of a pipeline: its folder's name (``org/name`` ids give ``name``)."""
    return Path(str(pipeline).rstrip("/\\")).name or str(pipeline)


def prompt_seed(base: int, prompt_id: str, k: int = 0) -> int:
    """Fixed seed of image ``k`` of a prompt (31 bits)."""
    digest = hashlib.sha256(f"{base}:{prompt_id}:{k}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError as exc:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 0/4") from exc
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: need N >= 1 and 0 <= I < N")
    return i, n


# ------------------------------------------------------------------------------------------- table files


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + _PARTS_SUFFIX)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Exclusive lock on ``<out>.lock``, removed on release (POSIX; a no-op where fcntl is missing).

    The holder deletes the lock file before unlocking, so none is left behind. A process that opened the
    file just before it was deleted would then lock an orphan inode: after locking, each process checks that
    the path still names the inode it holds, and starts over when it does not.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_name(out.name + _LOCK_SUFFIX)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    while True:
        f = open(path, "a")
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # closing releases the lock on the orphan
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.lockf(f, fcntl.LOCK_UN)
        f.close()


def _part_files(out: Path) -> list[Path]:
    d = _parts_dir(out)
    return sorted(p for p in d.glob("*.csv") if not p.name.startswith(".")) if d.is_dir() else []


def _load_all(out: Path) -> tuple[pd.DataFrame | None, list[Path], pd.DataFrame | None]:
    """(table rows or None, part files, part rows or None). Call under the lock."""
    import pandas as pd
    from routet2i.training.tables import IMAGE_COLUMN, read_table

    table = read_table(out, average=False) if out.exists() else None
    if table is not None and IMAGE_COLUMN in table.columns:
        raise UsageError(
            f"--out {str(out)!r} has an {IMAGE_COLUMN!r} column; data build writes averaged rows, use another --out"
        )
    parts = _part_files(out)
    part_rows = pd.concat([read_table(p, average=False) for p in parts], ignore_index=True) if parts else None
    return table, parts, part_rows


def _merge(out: Path, drop: pd.DataFrame | None = None) -> int:
    """Merge the part files into ``out`` (temp + rename) and delete them; rows matching ``drop`` (keys)
    are removed first. Returns the number of part rows merged. Call under the lock."""
    import pandas as pd
    from routet2i.training.tables import KEY, write_table

    table, parts, part_rows = _load_all(out)
    if part_rows is None and (drop is None or drop.empty):
        return 0
    frames = [f for f in (table, part_rows) if f is not None]
    merged = pd.concat(frames, ignore_index=True)
    if drop is not None and not drop.empty:
        keys = pd.MultiIndex.from_frame(drop[KEY])
        merged = merged[~pd.MultiIndex.from_frame(merged[KEY]).isin(keys)]
    # A run killed between the rename and the deletion of its parts leaves parts already merged: the
    # repeated rows are identical (same seeds), keep the first.
    before = len(merged)
    merged = merged.drop_duplicates(KEY, keep="first")
    if len(merged) < before:
        logger.warning("%s: %d repeated row(s) from part files dropped", out, before - len(merged))
    write_table(merged, out)
    for p in parts:
        p.unlink()
    with contextlib.suppress(OSError):
        _parts_dir(out).rmdir()
    return 0 if part_rows is None else len(part_rows)


def _write_part(out: Path, rows: pd.DataFrame, shard: tuple[int, int], batch: int) -> Path:
    from routet2i.training.tables import write_table

    d = _parts_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    name = f"shard{shard[0]}of{shard[1]}-{batch:06d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.csv"
    return write_table(rows, d / name)  # temp + rename (+ fsync): a part is whole or absent


# ------------------------------------------------------------------------------------------- generation


def _select(records: Sequence[PromptRecord], limit: int | None, shard: tuple[int, int]) -> list[PromptRecord]:
    if limit is not None:
        records = records[:limit]
    i, n = shard
    return [r for j, r in enumerate(records) if j % n == i]


def _status(
    table: pd.DataFrame | None, dataset: str, models: Sequence[str], metrics: Sequence[str]
) -> tuple[set[str], pd.DataFrame | None]:
    """(prompt ids complete for every model x metric, rows of incomplete ones with our metrics)."""
    if table is None or table.empty:
        return set(), None
    t = table[(table["dataset"] == dataset) & table["model"].isin(models) & table["metric"].isin(metrics)]
    if t.empty:
        return set(), None
    counts = t.groupby("prompt_id").size()
    need = len(models) * len(metrics)
    done = set(counts.index[counts >= need].astype(str))
    partial = t[~t["prompt_id"].isin(done)]
    return done, partial


def _check_ids(
    existing: pd.DataFrame | None, dataset: str, records: Sequence[PromptRecord], out: Path
) -> None:
    """The table must not give one of our prompt ids another text, or one of our texts another id."""
    if existing is None or existing.empty:
        return
    d = existing.loc[existing["dataset"] == dataset, ["prompt_id", "prompt"]].drop_duplicates()
    text_of = dict(zip(d["prompt_id"], d["prompt"], strict=True))
    id_of = dict(zip(d["prompt"], d["prompt_id"], strict=True))
    for r in records:
        if text_of.get(r.prompt_id, r.prompt) != r.prompt or id_of.get(r.prompt, r.prompt_id) != r.prompt_id:
            raise UsageError(
                f"--out {str(out)!r}: dataset {dataset!r} already has prompt {r.prompt[:60]!r} or id {r.prompt_id!r} "
                "paired differently (another --id-column?); use another --dataset or --out"
            )


def _load_pipeline(path: str, device: str, dtype: Any, arg: str):
    from routet2i.training.hub import check_hub_id

    check_hub_id(path, arg)  # an unreachable hub: one line that suggests a local folder
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{arg} {path!r}: cannot load a diffusers pipeline: {str(exc).splitlines()[0]}"
        ) from exc
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompts: list[str], seeds: list[int], k: int, kwargs: dict[str, Any], arg: str) -> list:
    import torch

    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    try:
        out = pipe(prompt=prompts, num_images_per_prompt=k, generator=generators, output_type="pil", **kwargs)
    except (ValueError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{arg}: the pipeline rejected the generation settings: {msg}") from exc
    images = list(out.images)
    if len(images) != len(prompts) * k:
        raise RuntimeError(f"{arg}: expected {len(prompts) * k} images, the pipeline returned {len(images)}")
    return images


def _rows(
    dataset: str, batch: Sequence[PromptRecord], model: str, q: np.ndarray, k: int, metrics: Sequence[str]
) -> list[tuple]:
    rows = []
    for i, rec in enumerate(batch):
        mean = q[i * k : (i + 1) * k].mean(axis=0)  # images of one prompt are contiguous (prompt-major)
        rows += [
            (dataset, rec.prompt_id, rec.prompt, model, m, float(mean[j]), k) for j, m in enumerate(metrics)
        ]
    return rows


def _validate(cfg: BuildConfig) -> None:
    for name in ("batch_size", "images_per_prompt", "clip_batch_size"):
        if int(getattr(cfg, name)) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("steps", "edge_steps", "cloud_steps", "width", "height", "limit"):
        v = getattr(cfg, name)
        if v is not None and int(v) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if (cfg.width is None) != (cfg.height is None):
        raise UsageError("--width and --height go together")
    if cfg.guidance is not None and not np.isfinite(cfg.guidance):
        raise UsageError(f"--guidance must be a finite number, got {cfg.guidance}")
    if Path(cfg.out).suffix.lower() not in (".csv", ".gz", ".parquet", ".pq"):
        raise UsageError(f"--out {str(cfg.out)!r}: use a .csv, .csv.gz or .parquet file")
    check_output_path(cfg.out, "--out")
    if cfg.images_dir is not None:
        check_output_path(cfg.images_dir, "--images-dir", folder=True)


def build_table(cfg: BuildConfig) -> BuildResult:
    """Generate, score and merge into ``cfg.out`` (see the module docstring)."""
    import pandas as pd
    import torch
    from routet2i.training.metrics import ClipQualityScorer, best_device, load_metric_pairs
    from routet2i.training.prompts import load_prompt_records
    from routet2i.training.tables import COLUMNS
    from tqdm.auto import tqdm

    _validate(cfg)
    out = Path(cfg.out)
    dataset = cfg.dataset or Path(cfg.prompts).stem
    edge_model = cfg.edge_model or model_name(cfg.edge_pipeline)
    cloud_model = cfg.cloud_model or model_name(cfg.cloud_pipeline)
    if edge_model == cloud_model:
        raise UsageError(
            f"edge and cloud model names are both {edge_model!r}; name them with --edge-model/--cloud-model"
        )
    pairs = load_metric_pairs(cfg.metrics_file)
    metrics = [p.metric for p in pairs]
    records = _select(load_prompt_records(cfg.prompts, cfg.column, cfg.id_column), cfg.limit, cfg.shard)
    ours = {r.prompt_id for r in records}

    with _locked(out):
        table, _, part_rows = _load_all(out)
        frames = [f for f in (table, part_rows) if f is not None]
        existing = pd.concat(frames, ignore_index=True) if frames else None
        _check_ids(existing, dataset, records, out)
        done, partial = _status(existing, dataset, [edge_model, cloud_model], metrics)
        done &= ours
        present = done | (set() if partial is None else set(partial["prompt_id"]) & ours)
        if present and not cfg.resume:
            raise UsageError(
                f"--out {str(out)!r} already holds {len(present)} of these prompts for dataset {dataset!r} and models "
                f"{edge_model!r}/{cloud_model!r}; pass --resume to skip them, or choose another --out or --dataset"
            )
        drop = None
        if partial is not None:
            drop = partial[partial["prompt_id"].isin(ours)]
            if not drop.empty:
                logger.warning(
                    "%d incomplete prompt(s) in %s will be generated again", drop["prompt_id"].nunique(), out
                )
        n_merged = _merge(out, drop)
        if n_merged:
            logger.warning("merged %d row(s) left in %s by an earlier run", n_merged, _parts_dir(out))
    todo = [r for r in records if r.prompt_id not in done]
    logger.info("%d prompts in this shard: %d done, %d to generate", len(records), len(done), len(todo))
    result = BuildResult(out, dataset, edge_model, cloud_model, metrics, len(todo), len(done), 0.0)
    if not todo:
        return result

    device = cfg.device or best_device()
    if cfg.dtype is None:
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise UsageError(f"--dtype {cfg.dtype!r} is not a torch dtype (float32, float16, bfloat16)")
    scorer = ClipQualityScorer(cfg.clip, pairs=pairs, device=device, batch_size=cfg.clip_batch_size)
    pipes = {
        edge_model: _load_pipeline(cfg.edge_pipeline, device, dtype, "--edge-pipeline"),
        cloud_model: _load_pipeline(cfg.cloud_pipeline, device, dtype, "--cloud-pipeline"),
    }
    common: dict[str, Any] = dict(cfg.extra)
    if cfg.width is not None:
        common.update(width=cfg.width, height=cfg.height)
    if cfg.guidance is not None:
        common["guidance_scale"] = cfg.guidance
    kwargs = {}
    for model, own in ((edge_model, cfg.edge_steps), (cloud_model, cfg.cloud_steps)):
        steps = own if own is not None else cfg.steps
        kwargs[model] = dict(common, **({"num_inference_steps": steps} if steps is not None else {}))
    args_of = {edge_model: "--edge-pipeline", cloud_model: "--cloud-pipeline"}
    if cfg.images_dir is not None:
        for model in pipes:
            (Path(cfg.images_dir) / model).mkdir(parents=True, exist_ok=True)

    k = cfg.images_per_prompt
    t0 = time.perf_counter()
    bar = tqdm(total=2 * k * len(todo), unit="img", desc=f"data build {dataset}", disable=not cfg.progress)
    try:
        for b, start in enumerate(range(0, len(todo), cfg.batch_size)):
            batch = todo[start : start + cfg.batch_size]
            texts = [r.prompt for r in batch]
            seeds = [prompt_seed(cfg.seed, r.prompt_id, j) for r in batch for j in range(k)]
            rows: list[tuple] = []
            for model, pipe in pipes.items():
                images = _generate(pipe, texts, seeds, k, kwargs[model], args_of[model])
                q = scorer.score(images)
                if cfg.images_dir is not None:
                    for i, img in enumerate(images):
                        rec, j = batch[i // k], i % k
                        stem = rec.prompt_id if k == 1 else f"{rec.prompt_id}_{j}"
                        img.save(Path(cfg.images_dir) / model / f"{stem}.png")
                rows += _rows(dataset, batch, model, q, k, metrics)
                bar.update(len(images))
            _write_part(out, pd.DataFrame(rows, columns=COLUMNS), cfg.shard, b)
    finally:
        bar.close()
        result.seconds = time.perf_counter() - t0
        with _locked(out):
            _merge(out)
    return result


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--prompts", required=True, type=Path, help="prompt file: .txt (one per line), .csv/.tsv/.jsonl/.json")
    a("--edge-pipeline", required=True, help="edge diffusers pipeline (folder or Hugging Face id)")
    a("--cloud-pipeline", required=True, help="cloud diffusers pipeline (folder or Hugging Face id)")
    a("--clip", required=True, help="CLIP model for the metrics (folder or Hugging Face id)")
    a("--out", required=True, type=Path, help="quality table to create or extend (.csv or .parquet)")
    a("--dataset", help="dataset name in the table (default: the prompt file's name)")
    a("--edge-model", help="edge model name in the table (default: the pipeline folder's name)")
    a("--cloud-model", help="cloud model name in the table (default: the pipeline folder's name)")
    a("--images-dir", type=Path, help="also save the images under DIR/<model>/")
    a("--resume", action="store_true", help="skip prompts already complete in --out")
    a("--shard", default="0/1", help="I/N: take every N-th prompt starting at I (0-based; default 0/1)")
    a("--steps", type=int, help="denoising steps for both pipelines (default: each pipeline's own)")
    a("--edge-steps", type=int, help="denoising steps of the edge pipeline (overrides --steps)")
    a("--cloud-steps", type=int, help="denoising steps of the cloud pipeline (overrides --steps)")
    a("--width", type=int, help="image width (with --height; default: each pipeline's own)")
    a("--height", type=int, help="image height (with --width)")
    a("--guidance", type=float, help="guidance scale (default: each pipeline's own)")
    a("--batch-size", type=int, default=4, help="prompts per pipeline call (default 4)")
    a("--images-per-prompt", type=int, default=1, help="images per prompt and model, averaged (default 1)")
    a("--column", help="prompt column of a csv/tsv/json prompt file (default: prompt/caption/text)")
    a("--id-column", help="prompt id column (default: a hash of the prompt text)")
    a("--limit", type=int, help="only the first N prompts of the file")
    a("--seed", type=int, default=0, help="base of the fixed per-prompt seeds (default 0)")
    a(
        "--metrics-file",
        type=Path,
        help="metric pairs CSV (metric,positive,negative; default: the ten shipped)",
    )
    a("--device", help="torch device (default: cuda, then mps, then cpu)")
    a("--dtype", help="torch dtype (default: float16 on cuda, float32 elsewhere)")
    a("--clip-batch-size", type=int, default=32, help="images per CLIP call (default 32)")
    a("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    cfg = BuildConfig(
        prompts=args.prompts,
        edge_pipeline=args.edge_pipeline,
        cloud_pipeline=args.cloud_pipeline,
        clip=args.clip,
        out=args.out,
        dataset=args.dataset,
        edge_model=args.edge_model,
        cloud_model=args.cloud_model,
        images_dir=args.images_dir,
        resume=args.resume,
        shard=parse_shard(args.shard),
        steps=args.steps,
        edge_steps=args.edge_steps,
        cloud_steps=args.cloud_steps,
        width=args.width,
        height=args.height,
        guidance=args.guidance,
        batch_size=args.batch_size,
        images_per_prompt=args.images_per_prompt,
        column=args.column,
        id_column=args.id_column,
        limit=args.limit,
        seed=args.seed,
        metrics_file=args.metrics_file,
        device=args.device,
        dtype=args.dtype,
        clip_batch_size=args.clip_batch_size,
        progress=not args.no_progress,
    )
    r = build_table(cfg)
    rate = 2 * cfg.images_per_prompt * r.n_generated / r.seconds if r.seconds > 0 else 0.0
    print(
        f"{r.out}: dataset {r.dataset!r}, {r.edge_model} -> {r.cloud_model}, {len(r.metrics)} metrics; "
        f"{r.n_generated} prompts generated ({rate:.2f} images/s), {r.n_skipped} already done"
    )
    print(
        f"next: routet2i labels --table {r.out} --dataset {r.dataset} --edge-model {r.edge_model} "
        f"--cloud-model {r.cloud_model} --out labels.csv"
    )
    return 0
