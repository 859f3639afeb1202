"""Pooled multi-layer features and the heads measured against RouteT2I on EvalMi-50K (issue 15).

Features: the frozen backbone's hidden states of every layer (embeddings included), each masked-mean
pooled over the prompt's tokens -> [N, L+1, d]; ``layer_mean`` averages them over the layers. Computed once
per (backbone, max_length, prompt list) and cached (``$ROUTET2I_CACHE/pooled``, default
~/.cache/routet2i/pooled).

Variants (``fit_predict_variant``; each returns a routing score, lower = cloud):

- ``ridge_last``: ridge regression of the pair's combined gap Q_c - Q_e on the last layer's mean.
- ``ridge_layers``: the same on the mean over all layers.
- ``krr``: RBF kernel ridge of the gap on the mean over all layers.
- ``mt_mlp``: an MLP predicting every model's per-metric score (all models of the dataset, standardized)
  plus the pair's per-metric gaps; the routing score is its predicted combined gap.
- ``ens``: the mean of the z-scored predictions of ``ridge_layers``, ``krr`` and ``mt_mlp``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

__all__ = ["pooled_layer_states", "layer_mean", "VARIANTS", "fit_predict_variant", "multitask_targets"]

_MEMORY: dict[str, np.ndarray] = {}
CALIBRATION_FOLDS = 5  # out-of-fold predictions for the calibration table (`routet2i train`)
ALPHAS = tuple(10.0**e for e in np.arange(-2, 5.01, 0.5))


def _cache_dir(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir) / "pooled"
    root = os.environ.get("ROUTET2I_CACHE") or Path.home() / ".cache" / "routet2i"
    return Path(root) / "pooled"


@torch.no_grad()
def pooled_layer_states(
    prompts: list[str],
    backbone: str = "",
    max_length: int = 128,
    batch_size: int = 64,
    use_disk: bool = True,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """[N, L+1, d] float32: masked mean of every layer's hidden states (cached; see the module docstring)."""
    from routet2i.training.features import _cache_key
    from routet2i.training.model import load_backbone

    key = hashlib.sha256(("pooled|" + _cache_key(backbone, max_length, prompts)).encode()).hexdigest()
    if key in _MEMORY:
        return _MEMORY[key]
    path = _cache_dir(cache_dir) / f"{key}.npy"
    if use_disk and path.is_file():
        out = np.load(path)
        _MEMORY[key] = out
        return out
    encoder, tokenizer = load_backbone(backbone)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(
            prompts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hs = encoder(**enc, output_hidden_states=True).hidden_states  # L+1 x [B, n, d]
        m = enc["attention_mask"].to(torch.float32)[..., None]
        pooled = torch.stack([(h * m).sum(1) / m.sum(1).clamp_min(1.0) for h in hs], dim=1)
        chunks.append(pooled.float().numpy())
    out = np.concatenate(chunks).astype(np.float32)
    if use_disk:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, out)
        tmp.replace(path)
    _MEMORY[key] = out
    return out


def layer_mean(feats: np.ndarray) -> np.ndarray:
    return feats.mean(axis=1)


# ------------------------------------------------------------------------------------------ the router


@dataclass
class MultiTaskConfig:
    """The default router: heads on the layer-mean pooled frozen backbone, stored in router.pt."""

    metrics: list[str] = field(default_factory=lambda: ["prs"])  # the pair's k metrics (metric_scores order)
    weights: list[float] | None = None  # metric weights of the combined gap (normalized); None = uniform
    backbone: str = ""  # HF id or folder of the token encoder; "" = the packaged all-MiniLM-L6-v2
    hidden_size: int = 384  # d: width of the backbone states
    max_length: int = 128  # tokenizer truncation length
    n_outputs: int = 1  # T: multi-task outputs (every model's per-metric score, then the pair's k gaps)
    hidden: int = 512  # MLP hidden width
    n_mlp: int = 5  # MLPs trained from different seeds, averaged
    n_kernel: int = 0  # training prompts kept as kernel-ridge centres (0: no kernel ridge)
    components: list[str] = field(default_factory=lambda: ["ridge", "krr", "mlp"])  # averaged gaps
    epochs: int = 20  # MLP epochs (short training is the main regularizer here)
    lr: float = 1e-3  # MLP AdamW learning rate
    weight_decay: float = 1e-2  # MLP AdamW weight decay
    dropout: float = 0.5  # MLP hidden dropout (0.1 on the input)
    auxiliary: bool = True  # MLP targets include every model's scores (False: the pair's k gaps only)
    # N-model router (empty: a pair router): the routed models (edge first, then the cloud models) and
    # each one's index among the MLP's auxiliary models; model_scores = their predicted combined quality.
    models: list[str] = field(default_factory=list)
    model_columns: list[int] = field(default_factory=list)

    @property
    def score_names(self) -> list[str]:
        return list(self.metrics)


class MultiTaskRouter(nn.Module):
    """Every layer's hidden states -> layer-mean pooled x -> ridge / kernel ridge / multi-task MLP gaps.

    Each component predicts the pair's combined gap Q_c - Q_e (per-metric gaps over their pooled sd,
    weighted); the router averages the components' gaps g and outputs prs = sigmoid(-g / gap_scale), so
    prs < 0.5 exactly when the cloud is predicted better (the calibration cap keeps its meaning).
    metric_scores [B, k] = sigmoid(-(the MLP's per-metric gap) / sd): each metric's predicted edge advantage.
    """

    uses_all_layers = True

    def __init__(self, config: MultiTaskConfig) -> None:
        super().__init__()
        self.config = config
        d, k, t, h = config.hidden_size, len(config.metrics), config.n_outputs, config.hidden
        self.register_buffer("x_mean", torch.zeros(d))
        self.register_buffer("x_std", torch.ones(d))
        self.register_buffer("metric_sd", torch.ones(k))  # pooled sd of each metric (gap units)
        self.register_buffer("weights", torch.full((k,), 1.0 / k))
        self.register_buffer("gap_scale", torch.ones(()))
        self.register_buffer("ridge_w", torch.zeros(d))
        self.register_buffer("ridge_b", torch.zeros(()))
        n = max(config.n_kernel, 1)
        self.register_buffer("krr_x", torch.zeros(n, d))
        self.register_buffer("krr_coef", torch.zeros(n))
        self.register_buffer("krr_gamma", torch.ones(()))
        self.register_buffer("krr_b", torch.zeros(()))
        self.register_buffer("y_mean", torch.zeros(t))
        self.register_buffer("y_std", torch.ones(t))
        m = config.n_mlp
        self.w1 = nn.Parameter(torch.zeros(m, d, h))
        self.b1 = nn.Parameter(torch.zeros(m, 1, h))
        self.w2 = nn.Parameter(torch.zeros(m, h, t))
        self.b2 = nn.Parameter(torch.zeros(m, 1, t))
        n_models = len(config.models)
        if n_models:  # N-model heads: combined quality of each routed model (ridge, kernel ridge, MLP)
            self.register_buffer("nm_sd", torch.ones(k))  # pooled sd of each metric (quality units)
            self.register_buffer("nm_ridge_w", torch.zeros(d, n_models))
            self.register_buffer("nm_ridge_b", torch.zeros(n_models))
            self.register_buffer("nm_krr_coef", torch.zeros(n, n_models))
            self.register_buffer("nm_krr_gamma", torch.ones(()))
            self.register_buffer("nm_krr_b", torch.zeros(n_models))

    def pooled(self, hidden_states, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.to(torch.float32)[..., None]
        denom = m.sum(dim=1).clamp_min(1.0)
        layers = [(h * m).sum(dim=1) / denom for h in hidden_states]
        return torch.stack(layers, dim=0).mean(dim=0)

    def mlp_outputs(self, z: torch.Tensor) -> torch.Tensor:
        """[B, T] raw-unit multi-task outputs: the mean of the n_mlp MLPs."""
        hid = F.gelu(torch.einsum("bd,mdh->mbh", z, self.w1) + self.b1)
        out = torch.einsum("mbh,mht->mbt", hid, self.w2) + self.b2
        return out.mean(dim=0) * self.y_std + self.y_mean

    def gaps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(combined gap [B] averaged over the components, the MLP's per-metric gaps [B, k])."""
        z = (x - self.x_mean) / self.x_std
        k = self.metric_sd.shape[0]
        mt = self.mlp_outputs(z)
        metric_gaps = mt[:, -k:]
        parts = []
        for name in self.config.components:
            if name == "ridge":
                parts.append(z @ self.ridge_w + self.ridge_b)
            elif name == "krr":
                d2 = (z * z).sum(-1, keepdim=True) - 2 * z @ self.krr_x.T + (self.krr_x * self.krr_x).sum(-1)
                parts.append(torch.exp(-self.krr_gamma * d2.clamp_min(0.0)) @ self.krr_coef + self.krr_b)
            elif name == "mlp":
                parts.append((metric_gaps / self.metric_sd) @ self.weights)
        return torch.stack(parts, dim=0).mean(dim=0), metric_gaps

    def model_scores(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n_models] predicted combined quality of each routed model (mean of the components)."""
        z = (x - self.x_mean) / self.x_std
        k = self.metric_sd.shape[0]
        parts = []
        for name in self.config.components:
            if name == "ridge":
                parts.append(z @ self.nm_ridge_w + self.nm_ridge_b)
            elif name == "krr":
                d2 = (z * z).sum(-1, keepdim=True) - 2 * z @ self.krr_x.T + (self.krr_x * self.krr_x).sum(-1)
                parts.append(
                    torch.exp(-self.nm_krr_gamma * d2.clamp_min(0.0)) @ self.nm_krr_coef + self.nm_krr_b
                )
            elif name == "mlp":
                mt = self.mlp_outputs(z)
                cols = [c * k + j for c in self.config.model_columns for j in range(k)]
                per = mt[:, cols].reshape(-1, len(self.config.model_columns), k)
                parts.append((per / self.nm_sd).mean(dim=-1))
        return torch.stack(parts, dim=0).mean(dim=0)

    def forward_layers(self, hidden_states, attention_mask: torch.Tensor):
        x = self.pooled(hidden_states, attention_mask)
        gap, metric_gaps = self.gaps(x)
        out = (torch.sigmoid(-gap / self.gap_scale), torch.sigmoid(-metric_gaps / self.metric_sd))
        if self.config.models:
            return (*out, self.model_scores(x))
        return out

    def forward_states(self, states: torch.Tensor, attention_mask: torch.Tensor):
        """Last layer only (not how it is trained): kept so generic helpers can call it."""
        return self.forward_layers((states,), attention_mask)


def pair_sd_weights(pair, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """(pooled sd [k] of each metric over both models, normalized weights [k]): the units of the gap."""
    from routet2i.training.baselines import combined_quality

    k = len(pair.metrics)
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    _, _, sd = combined_quality(pair.q_edge, pair.q_cloud, w)
    return sd, w


def multitask_targets(pair, idx: np.ndarray) -> np.ndarray:
    """[len(idx), T] raw targets: every model's per-metric score (all models of the dataset), then the
    pair's k per-metric gaps Q_c - Q_e. Without ``q_all`` only the gaps."""
    gaps = pair.q_cloud[idx] - pair.q_edge[idx]
    if pair.q_all is None:
        return gaps
    return np.concatenate([pair.q_all[idx].reshape(len(idx), -1), gaps], axis=1)


def _fit_ridge(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import RidgeCV

    model = RidgeCV(alphas=ALPHAS).fit(z, y)
    return model.coef_.astype(np.float32), float(model.intercept_)


def _fit_krr(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(dual coefficients [n], gamma, intercept) of an RBF kernel ridge; alpha and gamma by 3-fold CV."""
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.model_selection import GridSearchCV

    d = z.shape[1]
    b = float(y.mean())
    cv = min(3, len(y))
    grid = GridSearchCV(
        KernelRidge(kernel="rbf"),
        {"alpha": [0.3, 1.0, 3.0], "gamma": [0.25 / d, 0.5 / d, 1.0 / d]},
        cv=cv,
        scoring="neg_mean_squared_error",
    ).fit(z, y - b)
    best = grid.best_estimator_
    return best.dual_coef_.astype(np.float32).reshape(-1), float(best.gamma), b


def _fit_krr_multi(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Multi-output RBF kernel ridge: (dual coefficients [n, M], gamma, intercepts [M]); 3-fold CV."""
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.model_selection import GridSearchCV

    d = z.shape[1]
    b = y.mean(axis=0)
    grid = GridSearchCV(
        KernelRidge(kernel="rbf"),
        {"alpha": [0.3, 1.0, 3.0], "gamma": [0.25 / d, 0.5 / d, 1.0 / d]},
        cv=min(3, len(y)),
        scoring="neg_mean_squared_error",
    ).fit(z, y - b)
    best = grid.best_estimator_
    return best.dual_coef_.astype(np.float32).reshape(len(y), -1), float(best.gamma), b.astype(np.float32)


def _fit_mlps(z: np.ndarray, y: np.ndarray, cfg, seed: int) -> dict[str, torch.Tensor]:
    """n_mlp MLPs (seeds seed..seed+n_mlp-1) on standardized targets; stacked weights."""
    yt = torch.tensor(y, dtype=torch.float32)
    xt = torch.tensor(z, dtype=torch.float32)
    stacks: dict[str, list[torch.Tensor]] = {"w1": [], "b1": [], "w2": [], "b2": []}
    for j in range(cfg.n_mlp):
        g = torch.Generator().manual_seed(seed * 1000 + j)
        torch.manual_seed(seed * 1000 + j)
        net = nn.Sequential(
            nn.Dropout(0.1),
            nn.Linear(xt.shape[1], cfg.hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, yt.shape[1]),
        )
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        net.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(len(xt), generator=g)
            for s in range(0, len(order), 64):
                b = order[s : s + 64]
                loss = F.mse_loss(net(xt[b]), yt[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        stacks["w1"].append(net[1].weight.detach().T)
        stacks["b1"].append(net[1].bias.detach()[None])
        stacks["w2"].append(net[4].weight.detach().T)
        stacks["b2"].append(net[4].bias.detach()[None])
    return {k: torch.stack(v) for k, v in stacks.items()}


def fit_multitask(
    x: np.ndarray, pair, idx: np.ndarray, cfg: MultiTaskConfig, seed: int, nmodel=None
) -> MultiTaskRouter:
    """The router fitted on the prompts ``idx`` (x: their layer-mean pooled features, all prompts' rows).

    ``nmodel`` (``tables.NModelData``, with ``cfg.models`` set): also fit the N-model heads."""
    sd, w = pair_sd_weights(pair, cfg.weights)
    xs = x[idx].astype(np.float64)
    mu, xsd = xs.mean(0), xs.std(0) + 1e-6
    z = (xs - mu) / xsd
    gap = ((pair.q_cloud[idx] - pair.q_edge[idx]) / sd) @ w
    y = multitask_targets(pair, idx) if cfg.auxiliary else pair.q_cloud[idx] - pair.q_edge[idx]
    y_mean, y_std = np.nanmean(y, 0), np.nanstd(y, 0) + 1e-9
    y_z = np.nan_to_num((y - y_mean) / y_std)
    cfg = replace(cfg, n_outputs=y.shape[1], n_kernel=len(idx) if "krr" in cfg.components else 0)
    module = MultiTaskRouter(cfg)
    state = {
        "x_mean": torch.tensor(mu, dtype=torch.float32),
        "x_std": torch.tensor(xsd, dtype=torch.float32),
        "metric_sd": torch.tensor(sd, dtype=torch.float32),
        "weights": torch.tensor(w, dtype=torch.float32),
        "gap_scale": torch.tensor(float(np.std(gap)) or 1.0),
        "y_mean": torch.tensor(y_mean, dtype=torch.float32),
        "y_std": torch.tensor(y_std, dtype=torch.float32),
    }
    if "ridge" in cfg.components:
        rw, rb = _fit_ridge(z, gap)
        state.update(ridge_w=torch.tensor(rw), ridge_b=torch.tensor(rb))
    if "krr" in cfg.components:
        coef, gamma, b = _fit_krr(z, gap)
        state.update(
            krr_x=torch.tensor(z, dtype=torch.float32),
            krr_coef=torch.tensor(coef),
            krr_gamma=torch.tensor(gamma),
            krr_b=torch.tensor(b),
        )
    state.update(_fit_mlps(z, y_z, cfg, seed))
    if cfg.models:
        if nmodel is None or not cfg.auxiliary or pair.q_all is None:
            raise ValueError("an N-model router needs nmodel data and the auxiliary targets")
        q = nmodel.quality[idx]
        state["nm_sd"] = torch.tensor(nmodel.metric_sd, dtype=torch.float32)
        if "ridge" in cfg.components:
            from sklearn.linear_model import RidgeCV

            r = RidgeCV(alphas=ALPHAS, alpha_per_target=True).fit(z, q)
            state.update(nm_ridge_w=torch.tensor(r.coef_.T.copy()), nm_ridge_b=torch.tensor(r.intercept_))
        if "krr" in cfg.components:
            coef, gamma, b = _fit_krr_multi(z, q)
            state.update(
                nm_krr_coef=torch.tensor(coef), nm_krr_gamma=torch.tensor(gamma), nm_krr_b=torch.tensor(b)
            )
            if "krr_x" not in state:
                state["krr_x"] = torch.tensor(z, dtype=torch.float32)
    with torch.no_grad():
        for name, value in state.items():
            getattr(module, name).copy_(value.to(torch.float32))
    return module.eval()


@torch.no_grad()
def predict_model_scores(module: MultiTaskRouter, x: np.ndarray) -> np.ndarray:
    """model_scores [N, n_models] of an N-model router from layer-mean pooled features."""
    return module.model_scores(torch.tensor(x, dtype=torch.float32)).numpy().astype(np.float64)


@torch.no_grad()
def predict_multitask(module: MultiTaskRouter, x: np.ndarray) -> np.ndarray:
    """prs [N] from layer-mean pooled features."""
    gap, _ = module.gaps(torch.tensor(x, dtype=torch.float32))
    return torch.sigmoid(-gap / module.gap_scale).numpy()


def fit_predict(
    x: np.ndarray,
    pair,
    weights,
    train: np.ndarray,
    test: np.ndarray,
    seed: int,
    train_cfg=None,
    overrides=None,
) -> np.ndarray:
    """prs of ``test`` from the default-configured router fitted on ``train`` (one fold of `routet2i eval`).

    ``overrides``: MultiTaskConfig fields (eval --set); lr/weight_decay come from ``train_cfg``."""
    cfg = MultiTaskConfig(
        metrics=list(pair.metrics), weights=[float(w) for w in weights], hidden_size=int(x.shape[1])
    )
    if train_cfg is not None:
        cfg = replace(cfg, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    known = {f.name for f in fields(cfg)}
    cfg = replace(cfg, **{k: v for k, v in (overrides or {}).items() if k in known})
    return predict_multitask(fit_multitask(x, pair, train, cfg, seed), x[test])


def fit_and_calibrate(
    x: np.ndarray,
    pair,
    idx: np.ndarray,
    cfg: MultiTaskConfig,
    seed: int,
    folds: int = CALIBRATION_FOLDS,
    nmodel=None,
    oof_scores: list | None = None,
) -> tuple[MultiTaskRouter, np.ndarray, int]:
    """(router fitted on ``idx``, out-of-fold prs [len(idx)], folds used): what `routet2i train` does.

    The out-of-fold prs of every training prompt (``folds`` folds split by text, each fitted on the
    others) stand in for the final router's prs on prompts it never saw; the calibration table is their
    quantiles. With fewer than 2 distinct texts the in-sample prs are used. N-model router (``nmodel``):
    the out-of-fold model_scores [len(idx), n_models] are appended to ``oof_scores``."""
    from routet2i.training.evaluate import folds_by_text

    prompts = [pair.prompts[i] for i in idx]
    k = min(folds, len(set(prompts)))
    oof = np.zeros(len(idx))
    scores = np.zeros((len(idx), len(cfg.models)))
    if k >= 2:
        fold_id = folds_by_text(prompts, k, seed)
        for f in range(k):
            test, train = idx[fold_id == f], idx[fold_id != f]
            fitted = fit_multitask(x, pair, train, cfg, seed + 1 + f, nmodel)
            oof[fold_id == f] = predict_multitask(fitted, x[test])
            if cfg.models:
                scores[fold_id == f] = predict_model_scores(fitted, x[test])
    module = fit_multitask(x, pair, idx, cfg, seed, nmodel)
    if k < 2:
        oof = predict_multitask(module, x[idx])
        if cfg.models:
            scores = predict_model_scores(module, x[idx])
    if oof_scores is not None:
        oof_scores.append(scores)
    return module, oof, max(k, 1)


# Experiment variants: name -> MultiTaskConfig overrides ("ridge_last": ridge on the last layer's mean).
_OLD_MLP = {"components": ["mlp"], "n_mlp": 1, "hidden": 256, "dropout": 0.2}
_NEW_MLP = {"components": ["mlp"], "epochs": 20, "hidden": 512, "dropout": 0.5}
VARIANTS: dict[str, dict[str, Any]] = {
    "ridge_last": {"components": ["ridge"], "n_mlp": 1, "epochs": 1},
    "ridge_layers": {"components": ["ridge"], "n_mlp": 1, "epochs": 1},
    "ridge_concat": {"components": ["ridge"], "n_mlp": 1, "epochs": 1},
    "krr": {"components": ["krr"], "n_mlp": 1, "epochs": 1},
    "ridge+krr": {"components": ["ridge", "krr"], "n_mlp": 1, "epochs": 1},
    "mt_mlp_e120_h256_do2": {**_OLD_MLP, "epochs": 120},
    "mt_mlp_e20_h256_do2": {**_OLD_MLP, "epochs": 20},
    "mt_mlp_e40_h256_do2": {**_OLD_MLP, "epochs": 40},
    "mt_mlp_e40_h256_do2_wd1": {**_OLD_MLP, "epochs": 40, "weight_decay": 1.0},
    "mt_mlp_e20_h512_do5": {**_NEW_MLP, "n_mlp": 1},
    "mt_mlp_e20_h512_do5_wd1": {**_NEW_MLP, "n_mlp": 1, "weight_decay": 1.0},
    "mt_mlp5_e20_h512_do5": {**_NEW_MLP, "n_mlp": 5},
    "ridge+krr+mlp5_e20_h512_do5": {**_NEW_MLP, "components": ["ridge", "krr", "mlp"], "n_mlp": 5},
    "mt_mlp5_e20_h512_do5_no_aux": {**_NEW_MLP, "n_mlp": 5, "auxiliary": False},
    "default": {},  # MultiTaskConfig's defaults: what `routet2i train` fits
}


def fit_predict_variant(variant: str, pair, feats: np.ndarray, train, test, seed: int) -> np.ndarray:
    """Routing score (prs) of ``test`` from ``variant`` fitted on ``train`` only."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    if variant == "ridge_last":
        x = feats[:, -1]
    elif variant == "ridge_concat":
        x = feats.reshape(len(feats), -1)  # every layer's mean side by side
    else:
        x = layer_mean(feats)
    cfg = replace(MultiTaskConfig(metrics=list(pair.metrics), hidden_size=x.shape[1]), **VARIANTS[variant])
    module = fit_multitask(x, pair, train, cfg, seed)
    return predict_multitask(module, x[test])
