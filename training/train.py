"""`routet2i train`: fit one router (the default multitask router, RouteT2I, an ablation or a baseline).

The default method is ``multitask`` (``multitask.py``: heads on the layer-mean pooled frozen backbone,
calibrated on out-of-fold predictions of the whole file; ``_run_multitask``). Everything below serves
RouteT2I, its ablations and the trained baselines (``--method``).

Reads top to bottom:

1. ``TrainConfig``: the optimizer, budget, early stopping and label settings shared by every method.
2. ``model_config``: the architecture of a method (RouteT2I switches for the ablations, baseline heads).
3. ``make_targets``: what a method learns (PRS soft labels D_i per metric, PRS, or a baseline's label).
4. ``fit`` / ``predict``: one loop for every method on cached backbone token states, AdamW, mini-batches,
   early stopping on an inner validation split (restores the best epoch).
5. ``train_on``: split -> targets -> fit, used by this command and by every fold of ``routet2i eval``.
6. ``run``: the CLI: pair the table, train on every prompt (inner validation split for early stopping and
   calibration), calibrate, write ROUTER_DIR.

Defaults (ROUTET2I.md section 8): the MoE overfits a few hundred prompts within tens of full-batch epochs,
so the defaults train at most 60 epochs with weight decay 1e-2, dropout 0.1 and early stopping (patience 8)
on 20 % of the training prompts, split by prompt text. The same defaults serve every dataset.
"""

from __future__ import annotations

import argparse
import copy
import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "TRAINABLE",
    "model_config",
    "make_targets",
    "split_by_text",
    "fit",
    "predict",
    "train_on",
    "add_arguments",
    "run",
]

TRAINABLE = (
    "routet2i",
    "routet2i_no_multimetric",
    "routet2i_no_token_selection",
    "routet2i_no_dual_gate",
    "routellm_bert",
    "hybrid_llm",
    "zooter",
    "gap_regression",
    "multitask",
)


@dataclass
class TrainConfig:
    """Training settings shared by every trained method (same budget for RouteT2I and the baselines)."""

    max_epochs: int = 60  # upper bound on epochs; early stopping usually ends sooner
    batch_size: int = 32  # prompts per optimizer step
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-2  # AdamW decoupled weight decay (strong: the data sets are small)
    val_fraction: float = 0.2  # share of the training prompts held out (by text) for early stopping
    patience: int = 8  # epochs without a better validation loss before stopping
    loss: str = "bce"  # RouteT2I: "bce" (soft-label BCE on each head) or "mse", summed over heads
    gamma: float = 1.0  # Gamma of the PRS labels D_i (ROUTET2I.md section 2)
    eps: float = 1e-6  # eps of the PRS labels
    restore_best: bool = True  # keep the epoch with the best validation loss (False: the last epoch)


def model_config(
    method: str,
    metrics: list[str],
    weights: list[float] | None,
    backbone: str,
    hidden_size: int,
    max_length: int,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """RouterConfig (RouteT2I and its ablations) or BaselineConfig of ``method``; ``overrides`` set fields."""
    from routet2i.training.baselines import ABLATIONS, BaselineConfig
    from routet2i.training.model import RouterConfig

    overrides = dict(overrides or {})
    if method.startswith("routet2i"):
        cfg: Any = RouterConfig(
            metrics=list(metrics),
            weights=weights,
            backbone=backbone,
            hidden_size=hidden_size,
            max_length=max_length,
        )
        if method in ABLATIONS:
            overrides[ABLATIONS[method]] = False
    else:
        cfg = BaselineConfig(method=method, backbone=backbone, hidden_size=hidden_size, max_length=max_length)
    known = {f.name for f in fields(cfg)}
    return replace(cfg, **{k: v for k, v in overrides.items() if k in known})


def make_targets(
    method: str,
    q_edge: np.ndarray,
    q_cloud: np.ndarray,
    weights: np.ndarray,
    sd: np.ndarray,
    cfg: TrainConfig,
    tau: float = 1.0,
) -> np.ndarray:
    """Targets [n, t] of the training prompts. The PRS means mu come from these prompts only."""
    from routet2i.prs import metric_distances, prs_from_distances
    from routet2i.training.baselines import baseline_targets

    if method.startswith("routet2i"):
        D = metric_distances(q_edge, q_cloud, gamma=cfg.gamma, eps=cfg.eps)
        if method == "routet2i_no_multimetric":
            return prs_from_distances(D, weights)[:, None].astype(np.float32)
        return D.astype(np.float32)
    q_e = (q_edge / sd) @ weights
    q_c = (q_cloud / sd) @ weights
    return baseline_targets(method, q_e, q_c, tau=tau)


def split_by_text(
    prompts: list[str], idx: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) subsets of ``idx``; prompts with the same text land on the same side."""
    texts = sorted({prompts[i] for i in idx})
    rng = np.random.default_rng(seed)
    rng.shuffle(texts)
    n_val = int(round(fraction * len(texts)))
    if len(texts) >= 2:
        n_val = min(max(n_val, 1), len(texts) - 1)
    else:
        n_val = 0
    val_texts = set(texts[:n_val])
    val = np.array([i for i in idx if prompts[i] in val_texts], dtype=np.int64)
    train = np.array([i for i in idx if prompts[i] not in val_texts], dtype=np.int64)
    return train, val


def _loss(method: str, module, states, mask, target, cfg: TrainConfig):
    import torch.nn.functional as F
    from routet2i.training.baselines import baseline_loss

    if method.startswith("routet2i"):
        _, logits = module.forward_states(states, mask, return_logits=True)
        if cfg.loss == "mse":
            return F.mse_loss(logits.sigmoid(), target, reduction="none").mean(0).sum()
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0).sum()
    return baseline_loss(method, module.raw(states, mask), target)


def fit(
    module,
    method: str,
    feats,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    y_train: np.ndarray,
    y_val: np.ndarray,
    cfg: TrainConfig,
    seed: int,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``module`` in place on ``feats`` rows; keep the epoch with the best validation loss."""
    import torch
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    yt = torch.as_tensor(y_train)
    yv = torch.as_tensor(y_val)
    vs, vm = feats.subset(val_idx) if len(val_idx) else (None, None)
    best, best_state, best_epoch, history = float("inf"), None, -1, []
    epochs = tqdm(
        range(cfg.max_epochs), desc=f"train {method}", unit="epoch", disable=not progress, leave=False
    )
    for epoch in epochs:
        module.train()
        order = torch.randperm(len(train_idx), generator=gen)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            b = order[start : start + cfg.batch_size].numpy()
            s, m = feats.subset(train_idx[b])
            loss = _loss(method, module, s, m, yt[b], cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        module.eval()
        with torch.no_grad():
            val = float(_loss(method, module, vs, vm, yv, cfg)) if vs is not None else total / len(order)
        history.append({"epoch": epoch, "train_loss": total / len(order), "val_loss": val})
        epochs.set_postfix(val=f"{val:.4f}")
        if val < best - 1e-6:
            best, best_epoch = val, epoch
            best_state = copy.deepcopy(module.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    if best_state is not None and cfg.restore_best:
        module.load_state_dict(best_state)
    module.eval()
    return {"best_epoch": best_epoch, "best_val_loss": best, "epochs_run": len(history), "history": history}


def predict(module, feats, idx: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """PRS^ (or the baseline's PRS-like score) [len(idx)] in eval mode."""
    import torch

    module.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            s, m = feats.subset(idx[start : start + batch_size])
            out.append(module.forward_states(s, m)[0].numpy())
    return np.concatenate(out) if out else np.zeros(0)


def train_on(
    method: str,
    pair,
    feats,
    idx: np.ndarray,
    weights: np.ndarray,
    sd: np.ndarray,
    cfg: TrainConfig,
    seed: int,
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
) -> tuple[Any, Any, dict[str, Any]]:
    """(module, model config, info) trained on the prompts ``idx`` of ``pair`` (inner val split inside)."""
    import torch
    from routet2i.training.baselines import PooledRouter
    from routet2i.training.model import RouteT2IRouter

    mcfg = model_config(
        method,
        pair.metrics,
        [float(w) for w in weights],
        feats.backbone,
        feats.hidden_size,
        feats.max_length,
        overrides,
    )
    y = make_targets(
        method, pair.q_edge[idx], pair.q_cloud[idx], weights, sd, cfg, tau=getattr(mcfg, "tau", 1.0)
    )
    pos = {int(i): j for j, i in enumerate(idx)}
    tr, va = split_by_text(pair.prompts, idx, cfg.val_fraction, seed)
    torch.manual_seed(seed)
    module = RouteT2IRouter(mcfg) if method.startswith("routet2i") else PooledRouter(mcfg)
    info = fit(
        module,
        method,
        feats,
        tr,
        va,
        y[[pos[int(i)] for i in tr]],
        y[[pos[int(i)] for i in va]],
        cfg,
        seed,
        progress,
    )
    info.update(train_idx=tr, val_idx=va)
    return module, mcfg, info


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--table", required=True, help="quality table (CSV or Parquet)")
    parser.add_argument("--dataset", required=True, help="dataset name in the table")
    parser.add_argument("--edge-model", required=True, help="edge model name in the table")
    parser.add_argument(
        "--cloud-model",
        required=True,
        action="append",
        help="cloud model name in the table; repeat it for an N-model router (method multitask)",
    )
    parser.add_argument("--out", required=True, help="ROUTER_DIR to write (router.pt + backbone/)")
    from routet2i.training.methods import DEFAULT_METHOD

    parser.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help=f"one of {', '.join(TRAINABLE)} (default {DEFAULT_METHOD}; routet2i: the paper's MoE)",
    )
    parser.add_argument(
        "--backbone", default="", help="HF id or folder of the token encoder (default MiniLM-L6)"
    )
    parser.add_argument("--metrics", default=None, help="comma-separated metrics (default: all shared)")
    parser.add_argument("--weights", default=None, help="comma-separated metric weights (default uniform)")
    parser.add_argument("--gamma", type=float, default=d.gamma, help="Gamma of the PRS labels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"maximum epochs (default {d.max_epochs}; multitask: its MLPs' epochs, default 20)",
    )
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--patience", type=int, default=d.patience)
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction)
    parser.add_argument("--loss", choices=("bce", "mse"), default=d.loss)
    parser.add_argument("--top-k", type=int, default=None, help="tokens kept per expert (RouteT2I)")
    parser.add_argument("--n-layers", type=int, default=None, help="trainable transformer layers (RouteT2I)")
    parser.add_argument("--max-length", type=int, default=128, help="tokenizer truncation length")
    parser.add_argument("--cache-dir", default=None, help="token-state cache folder")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")


def parse_list(text: str | None, name: str, kind=str) -> list | None:
    """Comma-separated CLI list, or None."""
    from routet2i._errors import UsageError

    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except ValueError as exc:
        raise UsageError(f"{name} {text!r}: {exc}") from exc


# Allowed values of every training and model setting, checked before any work (CLI flags and eval --set):
# name -> (kind, low, high, low_open). kind "int" | "float" | "bool" | a tuple of allowed strings.
# The upper bounds on sizes keep a typo from allocating gigabytes (top_k is also capped by max_length).
MAX_LAYERS = 12
BOUNDS: dict[str, tuple[Any, float | None, float | None, bool]] = {
    "max_epochs": ("int", 1, 100_000, False),
    "batch_size": ("int", 1, 1_000_000, False),
    "lr": ("float", 0.0, 10.0, True),
    "weight_decay": ("float", 0.0, 1e3, False),
    "val_fraction": ("float", 0.0, 0.99, False),
    "patience": ("int", 0, 100_000, False),
    "loss": (("bce", "mse"), None, None, False),
    "gamma": ("float", 0.0, 1e6, True),
    "eps": ("float", 0.0, 1.0, True),
    "restore_best": ("bool", None, None, False),
    "seed": ("int", 0, 2**32 - 1, False),
    "max_length": ("int", 1, 4096, False),
    "top_k": ("int", 1, 4096, False),
    "n_layers": ("int", 0, MAX_LAYERS, False),
    "n_heads": ("int", 1, 64, False),
    "rank": ("int", 1, 4096, False),
    "score_dim": ("int", 1, 4096, False),
    "activation": (("gelu", "relu", "tanh"), None, None, False),
    "dropout": ("float", 0.0, 0.99, False),
    "multimetric": ("bool", None, None, False),
    "token_selection": ("bool", None, None, False),
    "dual_gate": ("bool", None, None, False),
    "hidden": ("int", 0, 65_536, False),
    "tau": ("float", 0.0, 1e6, True),
    "gap_scale": ("float", 0.0, 1e6, True),
    "n_mlp": ("int", 1, 64, False),
    "auxiliary": ("bool", None, None, False),
    "epochs": ("int", 1, 100_000, False),
}


def check_value(name: str, value: Any, flag: str | None = None) -> None:
    """UsageError (one line) when ``value`` is outside BOUNDS[name]; ``flag`` names it in the message."""
    import math

    from routet2i._errors import UsageError

    if name not in BOUNDS:
        return
    kind, lo, hi, lo_open = BOUNDS[name]
    label = flag or name
    if isinstance(kind, tuple):
        if value not in kind:
            raise UsageError(f"{label} must be one of {', '.join(kind)}, got {value!r}")
        return
    if kind == "bool":
        if not isinstance(value, bool):
            raise UsageError(f"{label} must be true or false, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{label} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
    if kind == "int" and not (isinstance(value, int) or float(value).is_integer()):
        raise UsageError(f"{label} must be an integer, got {value!r}")
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        low = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise UsageError(f"{label} must be a finite number {low} and <= {hi:g}, got {value!r}")


def check_settings(cfg: TrainConfig, overrides: dict[str, Any], max_length: int, via: str) -> None:
    """Every TrainConfig field and model override within BOUNDS; top_k <= max_length. ``via``: flag style."""
    from routet2i._errors import UsageError

    def label(name: str) -> str:
        return f"--{name.replace('_', '-')}" if via == "flag" else f"--set {name}"

    for f in fields(cfg):
        check_value(f.name, getattr(cfg, f.name), label(f.name))
    for name, value in overrides.items():
        check_value(name, value, label(name))
    top_k = overrides.get("top_k")
    if top_k is not None and top_k > max_length:
        raise UsageError(
            f"{label('top_k')} must be <= --max-length ({max_length}: a prompt never has more tokens), got {top_k}"
        )


def split_cloud_models(args: argparse.Namespace) -> list[str]:
    """--cloud-model given once or repeated: sets ``args.cloud_models`` (the list) and ``args.cloud_model``
    (the first one: what the pair code reads). Several need the multitask method (UsageError otherwise)."""
    from routet2i._errors import UsageError

    clouds = args.cloud_model if isinstance(args.cloud_model, list) else [args.cloud_model]
    args.cloud_models = list(clouds)
    args.cloud_model = clouds[0]
    method = getattr(args, "method", "multitask")
    if len(clouds) > 1 and method != "multitask":
        raise UsageError(
            f"--method {method!r} routes one pair; several --cloud-model need the N-model router: --method multitask"
        )
    if len(set(clouds)) != len(clouds):
        raise UsageError(f"--cloud-model names a model twice: {', '.join(clouds)}")
    return args.cloud_models


def check_train_args(args: argparse.Namespace) -> None:
    from routet2i._errors import UsageError
    from routet2i.paths import check_output_path

    split_cloud_models(args)
    if args.method not in TRAINABLE:
        raise UsageError(
            f"--method {args.method!r} is not a trainable router; choose one of {', '.join(TRAINABLE)}"
        )
    for name in ("epochs", "batch_size", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (0.0 <= args.val_fraction < 1.0):
        raise UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not (args.gamma > 0):
        raise UsageError(f"--gamma must be > 0, got {args.gamma}")
    check_value("seed", args.seed, "--seed")
    check_value("max_length", args.max_length, "--max-length")
    check_settings(_train_config(args), _overrides(args), args.max_length, via="flag")
    check_output_path(args.out, "--out", folder=True)
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UsageError(f"--out {out}: folder exists and is not empty (pass --force to replace it)")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        max_epochs=args.epochs if args.epochs is not None else TrainConfig.max_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        val_fraction=args.val_fraction,
        patience=args.patience,
        loss=args.loss,
        gamma=args.gamma,
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in (("top_k", args.top_k), ("n_layers", args.n_layers)) if v is not None}


def load_pair(args: argparse.Namespace):
    """(pair, weights [k]) from --table/--dataset/--edge-model/--cloud-model/--metrics/--weights."""
    from routet2i._errors import UsageError
    from routet2i.prs import normalize_weights
    from routet2i.training.tables import pair_data, read_table

    df = read_table(args.table)
    pair = pair_data(
        df, args.dataset, args.edge_model, args.cloud_model, parse_list(args.metrics, "--metrics")
    )
    try:
        weights = normalize_weights(parse_list(args.weights, "--weights", float), len(pair.metrics))
    except UsageError as exc:
        raise UsageError(f"--weights {args.weights!r}: {exc} (metrics: {', '.join(pair.metrics)})") from exc
    return pair, weights


def run(args: argparse.Namespace) -> int:
    from routet2i._errors import UsageError
    from routet2i.training.baselines import combined_quality
    from routet2i.training.calibration import calibration_table
    from routet2i.training.features import token_states
    from routet2i.training.model import save_router

    check_train_args(args)
    pair, weights = load_pair(args)
    if len(pair) < 2:
        raise UsageError(
            f"dataset {pair.dataset!r} has {len(pair)} prompt(s) for this pair; training needs >= 2"
        )
    cfg = _train_config(args)
    overrides = _overrides(args)
    if args.method == "multitask":
        if len(args.cloud_models) > 1:
            return _run_nmodel(args, pair, weights, cfg)
        return _run_multitask(args, pair, weights, cfg)
    feats = token_states(pair.prompts, args.backbone, args.max_length, cache_dir=args.cache_dir)
    _, _, sd = combined_quality(pair.q_edge, pair.q_cloud, weights)
    idx = np.arange(len(pair))
    module, mcfg, info = train_on(
        args.method, pair, feats, idx, weights, sd, cfg, args.seed, overrides, progress=True
    )
    calib_idx = info["val_idx"] if len(info["val_idx"]) else info["train_idx"]
    table = calibration_table(predict(module, feats, calib_idx))
    out = save_router(
        args.out,
        module,
        mcfg,
        args.backbone,
        method=args.method,
        metrics=list(pair.metrics),
        weights=[float(w) for w in weights],
        gamma=cfg.gamma,
        edge_model=pair.edge_model,
        cloud_model=pair.cloud_model,
        dataset=pair.dataset,
        calibration=table,
        extra={
            "train_config": asdict(cfg),
            "seed": args.seed,
            "n_train": len(info["train_idx"]),
            "n_calibration": len(calib_idx),
            "best_epoch": info["best_epoch"],
            "quality_sd": [float(x) for x in sd],
        },
    )
    print(
        f"trained {args.method} on {len(pair)} prompts of {pair.dataset} ({pair.edge_model} -> {pair.cloud_model}); "
        f"best epoch {info['best_epoch']}, wrote {out}"
    )
    return 0


def _run_multitask(args: argparse.Namespace, pair, weights: np.ndarray, cfg: TrainConfig) -> int:
    """The default router: fit on every prompt; calibrate on out-of-fold predictions of the whole file."""
    import time

    from routet2i.training.multitask import CALIBRATION_FOLDS, fit_and_calibrate

    t0 = time.perf_counter()
    x, mcfg = multitask_features_config(pair, weights, args, cfg)
    idx = np.arange(len(pair))
    # One thread: small matrices and MLP steps; more threads mostly add synchronization (several times
    # slower on a loaded 2-core machine), as in `routet2i eval`.
    from routet2i.training.evaluate import torch_threads
    from threadpoolctl import threadpool_limits

    with torch_threads(1), threadpool_limits(1):
        module, oof, n_folds = fit_and_calibrate(x, pair, idx, mcfg, args.seed, CALIBRATION_FOLDS)
    out = _save_multitask(args, module, pair, weights, cfg, oof, n_folds, t0)
    print(
        f"trained multitask on {len(pair)} prompts of {pair.dataset} ({pair.edge_model} -> {pair.cloud_model}), "
        f"{module.config.n_outputs} targets from {len(pair.all_models or [])} models, calibrated on "
        f"{n_folds}-fold out-of-fold predictions, {time.perf_counter() - t0:.0f} s; wrote {out}"
    )
    return 0


def _save_multitask(args, module, pair, weights, cfg: TrainConfig, oof, n_folds: int, t0: float, extra=None):
    """save_router for a multitask router (pair or N-model): calibration table from the out-of-fold
    predictions `oof`; `extra`: more metadata (the N-model keys)."""
    import time

    from routet2i.training.calibration import calibration_table
    from routet2i.training.model import save_router

    return save_router(
        args.out,
        module,
        module.config,
        args.backbone,
        method="multitask",
        metrics=list(pair.metrics),
        weights=[float(w) for w in weights],
        gamma=cfg.gamma,
        edge_model=pair.edge_model,
        cloud_model=pair.cloud_model,
        dataset=pair.dataset,
        calibration=calibration_table(oof),
        extra={
            "seed": args.seed,
            "n_train": len(pair),
            "n_calibration": len(pair),
            "calibration_source": f"out-of-fold predictions, {n_folds} folds by text",
            "auxiliary_models": list(pair.all_models or []),
            **(extra or {}),
            "train_seconds": round(time.perf_counter() - t0, 1),
        },
    )


def _run_nmodel(args: argparse.Namespace, pair, weights: np.ndarray, cfg: TrainConfig) -> int:
    """N-model router: the pair router of (edge, first cloud model) plus model_scores of every model."""
    import time

    from routet2i.training.evaluate import torch_threads
    from routet2i.training.multitask import CALIBRATION_FOLDS, fit_and_calibrate
    from routet2i.training.tables import nmodel_data, read_table
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    data = nmodel_data(
        read_table(args.table),
        args.dataset,
        args.edge_model,
        args.cloud_models,
        parse_list(args.metrics, "--metrics"),
    )
    pair = data.pair
    x, mcfg = nmodel_features_config(data, weights, args, cfg)
    idx = np.arange(len(pair))
    oof_scores: list[np.ndarray] = []
    with torch_threads(1), threadpool_limits(1):
        module, oof, n_folds = fit_and_calibrate(
            x, pair, idx, mcfg, args.seed, CALIBRATION_FOLDS, nmodel=data, oof_scores=oof_scores
        )
    nmodel_extra = {
        "models": list(data.models),
        "cloud_models": list(data.models[1:]),
        "model_metric_sd": [float(v) for v in data.metric_sd],
        # out-of-fold predicted model_scores of every training prompt: the budget table's source
        "oof_model_scores": [[float(v) for v in row] for row in oof_scores[0]],
    }
    out = _save_multitask(args, module, pair, weights, cfg, oof, n_folds, t0, nmodel_extra)
    print(
        f"trained an N-model multitask router on {len(pair)} prompts of {pair.dataset} "
        f"({', '.join(data.models)}), calibrated on {n_folds}-fold out-of-fold predictions, "
        f"{time.perf_counter() - t0:.0f} s; wrote {out}"
    )
    return 0


def multitask_features_config(pair, weights, args: argparse.Namespace, cfg: TrainConfig, **heads: Any):
    """(layer-mean pooled features [n, d], MultiTaskConfig) of ``pair``'s prompts for the multitask
    router; ``heads``: more MultiTaskConfig fields (the N-model heads)."""
    from routet2i.training.multitask import MultiTaskConfig, layer_mean, pooled_layer_states

    x = layer_mean(
        pooled_layer_states(pair.prompts, args.backbone, args.max_length, cache_dir=args.cache_dir)
    )
    mcfg = MultiTaskConfig(
        metrics=list(pair.metrics),
        weights=[float(w) for w in weights],
        backbone=args.backbone,
        hidden_size=int(x.shape[1]),
        max_length=args.max_length,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        **heads,
    )
    if getattr(args, "epochs", None) is not None:
        mcfg = replace(mcfg, epochs=args.epochs)
    return x, mcfg


def nmodel_features_config(data, weights, args: argparse.Namespace, cfg: TrainConfig):
    """(layer-mean pooled features [n, d], MultiTaskConfig with the N-model heads) of ``data``."""
    return multitask_features_config(
        data.pair, weights, args, cfg, models=list(data.models), model_columns=list(data.columns)
    )
