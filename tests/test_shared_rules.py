"""One rule each, used everywhere (issue 16 item 10): alpha from a cloud rate, atomic writes, the seed bound,
and library code that logs instead of printing."""

from __future__ import annotations

import pytest
from routet2i._errors import UsageError

TABLE = [{"rate": 0.1, "alpha": 0.2}, {"rate": 0.3, "alpha": 0.4}, {"rate": 0.5, "alpha": 0.5}]


def test_alpha_rule_is_the_row_at_or_below():
    from routet2i.alpha_table import alpha_at_rate, table_rows

    rates, alphas = table_rows(list(reversed(TABLE)))  # any order in routing.json
    assert (rates, alphas) == ([0.1, 0.3, 0.5], [0.2, 0.4, 0.5])
    assert alpha_at_rate(rates, alphas, 0.3) == (0.4, 1.0)
    assert alpha_at_rate(rates, alphas, 0.1 + 0.2) == (0.4, 1.0)  # 0.30000000000000004: float noise
    assert alpha_at_rate(rates, alphas, 0.29) == (0.2, 1.0)  # not interpolated towards 0.4
    assert alpha_at_rate(rates, alphas, 0.9) == (0.5, 1.0)
    assert alpha_at_rate(rates, alphas, 0.0) == (0.0, 1.0)
    assert alpha_at_rate(rates, alphas, 0.05) == (0.2, pytest.approx(0.5))
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(UsageError, match="rate"):
            alpha_at_rate(rates, alphas, bad)
    for bad_table in ([], [{"rate": 0.1}], "0.1"):
        with pytest.raises(UsageError, match="calibration"):
            table_rows(bad_table)


def test_training_export_and_device_agree_on_alpha():
    np = pytest.importorskip("numpy")
    from routet2i.export.router import pick_alpha
    from routet2i.policy import CalibrationTable
    from routet2i.training.calibration import alpha_from_table, calibration_table

    table = calibration_table(np.random.default_rng(0).uniform(0.1, 0.9, 300))
    device = CalibrationTable.from_routing({"calibration": table})
    for rate in [0.0, 0.005, 0.1, 0.254, 0.3, 0.31, 0.5, 0.777, 1.0]:
        a_dev, keep = device.alpha(rate)
        assert keep == 1.0
        assert pick_alpha(table, rate) == a_dev
        assert alpha_from_table(table, rate) == a_dev
    assert alpha_from_table(table, 0.254) == next(r["alpha"] for r in table if r["rate"] == 0.25)
