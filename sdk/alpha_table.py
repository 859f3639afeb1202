"""The one rule for alpha from a cloud rate, shared by training, `routet2i export router` and the device.

A router bundle's calibration table (``routing.json`` ``calibration``: ``[{rate, alpha}]``, made by
`routet2i.training.calibration.calibration_table` on a grid of rates) maps a cloud rate to the PRS^
threshold alpha: a prompt goes to the cloud iff PRS^ < alpha. For a target rate:

- the alpha of the **largest tabulated rate <= the target** (no interpolation: each row is a quantile
  of PRS^ measured on the calibration prompts, and the row at or below never spends more than the target
  on them; the default grid is 0.01 wide, so the step costs at most 0.01 of rate);
- rate 0: alpha 0, so nothing goes to the cloud (PRS^ is never negative);
- below the first row (a table that does not start at 0): the first row's alpha, with ``keep`` = rate /
  first rate: the device keeps only that share of the cloud decisions so the expected rate still matches,
  and ``routet2i export router --target-rate`` refuses such a rate (a bundle's default alpha has no
  ``keep``).

Torch-free; `routet2i.policy.CalibrationTable`, `routet2i.training.calibration.alpha_from_table` and
`routet2i.export.router.pick_alpha` all call `alpha_at_rate`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

from routet2i._errors import UsageError

__all__ = ["alpha_at_rate", "table_rows"]

_EPS = 1e-12  # float noise in a rate read from JSON or computed (0.1 + 0.2)


def table_rows(table: Sequence[Any]) -> tuple[list[float], list[float]]:
    """``[{rate, alpha}, ...]`` -> (rates ascending, their alphas); UsageError for an empty or bad table."""
    if isinstance(table, (str, bytes)) or not isinstance(table, Sequence) or not table:
        raise UsageError("calibration table: must be a non-empty list of {rate, alpha} rows")
    pairs = []
    for row in table:
        try:
            pairs.append((float(row["rate"]), float(row["alpha"])))
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"calibration row {row!r}: needs numeric 'rate' and 'alpha'") from None
    pairs.sort()
    return [p[0] for p in pairs], [p[1] for p in pairs]


def alpha_at_rate(rates: Sequence[float], alphas: Sequence[float], rate: float) -> tuple[float, float]:
    """(alpha, keep) for a cloud ``rate`` in [0, 1] from ``rates`` (ascending) and their ``alphas``.

    The module docstring has the rule; ``keep`` is 1 except below the first row.
    """
    try:
        value = float(rate) if not isinstance(rate, (bool, str)) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise UsageError(f"cloud rate={rate!r}: must be a number in [0, 1]")
    rate = value
    if rate <= 0.0:
        return 0.0, 1.0
    if rate < rates[0] - _EPS:
        return float(alphas[0]), rate / rates[0]
    return float(alphas[bisect.bisect_right(rates, rate + _EPS) - 1]), 1.0
