"""Pareto Relative Superiority (PRS): the RouteT2I soft labels, in plain numpy (the labels of
the RouteT2I paper; README, section Router: train and evaluate).

For per-prompt metric vectors of the edge image ``q_e`` and the cloud image ``q_c`` and the dataset means
``mu_i(e)``, ``mu_i(c)`` of each metric for each model:

    D_i = sigmoid( (q_e,i - q_c,i) / (gamma * |mu_i(e) - mu_i(c)| + eps) )
    PRS = sum_i w_i * D_i,   sum_i w_i = 1

PRS > 0.5: the edge image is better; PRS < 0.5: the cloud image is better. Every metric must be
higher-is-better. Defaults (ours; the paper does not publish them): ``gamma = 1.0``, ``eps = 1e-6``,
uniform weights, ``mu`` = the column means of the arrays passed in (the dataset the labels are made for).

Torch-free: the device side may import this module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from routet2i._errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_GAMMA",
    "metric_distances",
    "normalize_weights",
    "prs",
    "prs_from_distances",
]

DEFAULT_GAMMA = 1.0  # scale of the gap between the model means that maps to sigmoid(1)
DEFAULT_EPS = 1e-6  # keeps D_i finite when both models have the same mean on metric i


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Numerically stable for large |x| (no overflow warnings).
    out = np.empty_like(x, dtype=np.float64)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def _as_matrix(name: str, value: object) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise UsageError(f"{name} must be a 2-D array [n_prompts, n_metrics], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UsageError(f"{name} must have at least one prompt and one metric, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise UsageError(f"{name} has a non-finite value at [{bad[0]}, {bad[1]}]: {arr[bad[0], bad[1]]}")
    return arr


def _as_means(name: str, value: object, k: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.shape != (k,):
        raise UsageError(f"{name} must have one mean per metric ({k}), got shape {np.shape(value)}")
    if not np.all(np.isfinite(arr)):
        raise UsageError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def metric_distances(
    q_edge: np.ndarray | Sequence[Sequence[float]],
    q_cloud: np.ndarray | Sequence[Sequence[float]],
    gamma: float = DEFAULT_GAMMA,
    eps: float = DEFAULT_EPS,
    mu_edge: np.ndarray | Sequence[float] | None = None,
    mu_cloud: np.ndarray | Sequence[float] | None = None,
) -> np.ndarray:
    """D [n, k] in (0, 1): per-metric relative superiority of the edge image over the cloud image.

    ``q_edge``, ``q_cloud``: [n, k] metric values (higher is better) of the same n prompts.
    ``mu_edge``, ``mu_cloud``: [k] dataset means per metric; default the column means of the inputs.
    """
    qe = _as_matrix("q_edge", q_edge)
    qc = _as_matrix("q_cloud", q_cloud)
    if qe.shape != qc.shape:
        raise UsageError(f"q_edge and q_cloud must have the same shape, got {qe.shape} and {qc.shape}")
    if not (np.isfinite(gamma) and gamma > 0):
        raise UsageError(f"gamma must be a finite number > 0, got {gamma!r}")
    if not (np.isfinite(eps) and eps > 0):
        raise UsageError(f"eps must be a finite number > 0, got {eps!r}")
    k = qe.shape[1]
    me = qe.mean(axis=0) if mu_edge is None else _as_means("mu_edge", mu_edge, k)
    mc = qc.mean(axis=0) if mu_cloud is None else _as_means("mu_cloud", mu_cloud, k)
    scale = gamma * np.abs(me - mc) + eps
    return _sigmoid((qe - qc) / scale[None, :])


def normalize_weights(weights: np.ndarray | Sequence[float] | None, k: int) -> np.ndarray:
    """[k] non-negative weights summing to 1 (uniform when ``weights`` is None)."""
    if weights is None:
        return np.full(k, 1.0 / k)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (k,):
        raise UsageError(f"weights must have one value per metric ({k}), got {np.shape(weights)}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise UsageError(f"weights must be finite, >= 0 and not all zero, got {w.tolist()}")
    return w / w.sum()


def prs_from_distances(
    D: np.ndarray | Sequence[Sequence[float]], weights: np.ndarray | Sequence[float] | None = None
) -> np.ndarray:
    """PRS [n] = D @ w with w normalized to sum 1 (uniform by default)."""
    d = _as_matrix("D", D)
    if np.any((d < 0) | (d > 1)):
        raise UsageError("D must lie in [0, 1] (it is a matrix of sigmoids)")
    return d @ normalize_weights(weights, d.shape[1])


def prs(
    q_edge: np.ndarray | Sequence[Sequence[float]],
    q_cloud: np.ndarray | Sequence[Sequence[float]],
    weights: np.ndarray | Sequence[float] | None = None,
    gamma: float = DEFAULT_GAMMA,
    eps: float = DEFAULT_EPS,
    mu_edge: np.ndarray | Sequence[float] | None = None,
    mu_cloud: np.ndarray | Sequence[float] | None = None,
) -> np.ndarray:
    """PRS [n] of the edge image over the cloud image (> 0.5: edge better)."""
    D = metric_distances(q_edge, q_cloud, gamma=gamma, eps=eps, mu_edge=mu_edge, mu_cloud=mu_cloud)
    return prs_from_distances(D, weights)
