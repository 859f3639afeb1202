"""Cloud-rate budget -> PRS threshold alpha (ROUTET2I.md section 4).

A prompt goes to the cloud iff PRS^ < alpha. For a budget rho (fraction of prompts sent to the cloud):

    alpha(rho) = min(cap, the rho-quantile of PRS^ on a calibration set),   cap = 0.5

The cap keeps on the edge the prompts where the edge model is predicted better, so the realized cloud rate
can stay below rho. The router stores a table over a grid of rates so the device can change its budget
without retraining (it reads the largest tabulated rate <= its target: `routet2i.alpha_table`, the one
rule training, export and the device share).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from routet2i._errors import UsageError
from routet2i.alpha_table import alpha_at_rate, table_rows

logger = logging.getLogger(__name__)

__all__ = ["ALPHA_CAP", "DEFAULT_GRID", "alpha_for_rate", "calibration_table", "alpha_from_table"]

ALPHA_CAP = 0.5  # PRS^ >= 0.5 (edge predicted better) never goes to the cloud
DEFAULT_GRID = tuple(round(0.01 * i, 2) for i in range(101))  # cloud rates 0.00, 0.01, ..., 1.00


def _check_rate(rate: float) -> float:
    r = float(rate)
    if not (0.0 <= r <= 1.0):
        raise UsageError(f"cloud rate must be in [0, 1], got {rate!r}")
    return r


def alpha_for_rate(prs_hat: np.ndarray | Sequence[float], rate: float, cap: float = ALPHA_CAP) -> float:
    """alpha = min(cap, rate-quantile of ``prs_hat``); rate 0 gives alpha = min(prs_hat) (nothing below)."""
    x = np.asarray(prs_hat, dtype=np.float64).reshape(-1)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise UsageError("calibration needs at least one finite PRS^ value")
    return float(min(cap, np.quantile(x, _check_rate(rate))))


def calibration_table(
    prs_hat: np.ndarray | Sequence[float], rates: Sequence[float] = DEFAULT_GRID, cap: float = ALPHA_CAP
) -> list[dict[str, float]]:
    """[{"rate": r, "alpha": a}, ...] over ``rates`` (sorted ascending)."""
    return [{"rate": float(r), "alpha": alpha_for_rate(prs_hat, r, cap)} for r in sorted(rates)]


def alpha_from_table(table: Sequence[dict[str, float]], rate: float) -> float:
    """alpha for ``rate`` from a calibration table by the one rule of `routet2i.alpha_table` (the row of the
    largest tabulated rate <= ``rate``: never overspends the budget; rate 0: alpha 0)."""
    rates, alphas = table_rows(table)
    return alpha_at_rate(rates, alphas, _check_rate(rate))[0]
