"""N-model routing policy (routet2i.policy, issue 14 item 3): argmax of model_scores - lambda * cost, the
budget table's warm start, online lambda calibration holding the average spend within 5 % of the budget,
models= restriction, force names, quota pacing in units, determinism and persistence."""

from __future__ import annotations

import math
import random

import pytest
from routet2i._errors import UsageError
from routet2i.policy import (
    DeviceState,
    QuotaInfo,
    RoutingPolicy,
    choose,
    routing_models,
    window_lambda,
)

NOW = 1_800_000_000.0
MODELS = [
    {"name": "sd21", "where": "edge", "cost": 0},
    {"name": "sdxl", "where": "cloud", "cost": 1},
    {"name": "sd35", "where": "cloud", "cost": 3},
]
# a deliberately rough warm-start table (the device's traffic differs from the training prompts)
ROUTING = {
    "models": MODELS,
    "budget_table": [
        {"budget": 0.25, "lambda": 0.4},
        {"budget": 1.0, "lambda": 0.2},
        {"budget": 2.0, "lambda": 0.05},
    ],
    "default_budget": 1.0,
    "router_version": "n-1",
}


def _row(rng: random.Random) -> list[float]:
    """One prompt's predicted combined quality per model: the cloud tiers better on average, unevenly."""
    edge = rng.gauss(0.0, 1.0)
    return [edge, edge + rng.gauss(0.3, 0.4), edge + rng.gauss(0.6, 0.6)]


def _spend(policy: RoutingPolicy, rows: list[list[float]], **kw) -> list[float]:
    out = []
    for i, r in enumerate(rows):
        d = policy.route("a prompt", None, model_scores=r, now=NOW + 60 * i, **kw)
        assert d.reason == "router"
        out.append(d.cost)
    return out


def test_models_parsing_and_the_two_model_default():
    assert [(m.name, m.where, m.cost) for m in routing_models({"edge_model": "e", "cloud_model": "c"})] == [
        ("e", "edge", 0),
        ("c", "cloud", 1),
    ]
    assert [m.cost for m in routing_models(ROUTING)] == [0, 1, 3]
    for bad, msg in [
        ([{"name": "c", "where": "cloud", "cost": 1}, MODELS[0]], "where='cloud'"),
        ([MODELS[0], {"name": "c", "where": "cloud", "cost": 0}], "cost=0"),
        ([MODELS[0], {"name": "c", "where": "cloud", "cost": 1.5}], "cost=1.5"),
        ([MODELS[0], MODELS[1], MODELS[1]], "repeat"),
        ([MODELS[0]], "at least one cloud model"),
    ]:
        with pytest.raises(UsageError, match=msg):
            routing_models({"models": bad})
    with pytest.raises(UsageError, match="budget_table"):
        RoutingPolicy({"models": MODELS})


def test_choose_and_window_lambda():
    assert choose([0.0, 0.5, 1.0], [0, 1, 3], 0.0, [0, 1, 2]) == 2
    assert choose([0.0, 0.5, 1.0], [0, 1, 3], 0.3, [0, 1, 2]) == 1  # 0.2 > 0.1 > 0
    assert choose([0.0, 0.5, 1.0], [0, 1, 3], 0.6, [0, 1, 2]) == 0
    assert choose([0.0, 0.5, 1.0], [0, 1, 3], 0.0, [0, 1]) == 1  # restricted
    assert choose([0.0, 0.5, 1.0], [0, 1, 3], math.inf, [0, 1, 2]) == 0
    rng = random.Random(0)
    rows = [_row(rng) for _ in range(400)]
    for level in (0.3, 1.0, 2.0):
        lam = window_lambda(rows, [0, 1, 3], level)
        mean = sum([0, 1, 3][choose(r, [0, 1, 3], lam, [0, 1, 2])] for r in rows) / len(rows)
        assert mean <= level + 1e-9
        lower = lam * 0.97 - 1e-6  # just below: more than the level
        assert sum([0, 1, 3][choose(r, [0, 1, 3], lower, [0, 1, 2])] for r in rows) / len(rows) > level - 0.02


@pytest.mark.parametrize("budget", [0.5, 1.0, 1.5])
def test_online_spend_holds_the_budget(budget):
    rng = random.Random(7)
    rows = [_row(rng) for _ in range(1200)]
    p = RoutingPolicy(ROUTING, budget=budget, pacing=False)
    costs = _spend(p, rows, cloud_configured=True)
    late = costs[400:]
    assert abs(sum(late) / len(late) - budget) <= 0.05 * budget, sum(late) / len(late)
    assert {1.0, 3.0} <= set(late)  # both cloud tiers are used


def test_static_uses_the_table_and_misses():
    rng = random.Random(7)
    rows = [_row(rng) for _ in range(600)]
    p = RoutingPolicy(ROUTING, budget=1.0, pacing=False, calibration="static")
    costs = _spend(p, rows)
    d = p.decide("x", None, model_scores=rows[0], now=NOW)
    assert (d.lambda_, d.calibration) == (0.2, "static")
    assert abs(sum(costs[400:]) / 200 - 1.0) > 0.05  # the rough table alone is off: calibration matters


def test_restriction_force_and_precedence():
    p = RoutingPolicy(ROUTING, budget=3.0, pacing=False)  # lambda 0.05: quality rules
    row = [0.0, 0.5, 1.0]
    assert p.decide("x", None, model_scores=row, now=NOW).model == "sd35"
    d = p.decide("x", None, model_scores=row, allowed=["sdxl"], now=NOW)
    assert (d.route, d.model, d.cost) == ("cloud", "sdxl", 1.0)
    d = p.decide("x", None, model_scores=row, allowed=[], now=NOW)
    assert (d.route, d.reason, d.model) == ("edge", "forced", "sd21")
    with pytest.raises(UsageError, match=r"unknown model\(s\) \['sd4'\]; this router knows sd21, sdxl, sd35"):
        p.decide("x", None, model_scores=row, allowed=["sd4"], now=NOW)
    d = p.decide("x", None, model_scores=[0.0, 0.5, 0.4], force="cloud", now=NOW)
    assert (d.route, d.reason, d.model) == ("cloud", "forced", "sdxl")
    assert p.decide("x", None, model_scores=row, force="sd35", allowed=["sdxl"], now=NOW).model == "sd35"
    assert p.decide("x", None, model_scores=row, force="sd21", now=NOW).route == "edge"
    with pytest.raises(UsageError, match="force='sd4': must be 'edge', 'cloud', a model name"):
        p.decide("x", None, model_scores=row, force="sd4", now=NOW)
    d = p.decide("x", None, model_scores=row, local_only=True, now=NOW)
    assert (d.route, d.reason) == ("edge", "local_only")
    d = p.decide("x", None, model_scores=row, cloud_open=False, now=NOW)
    assert (d.route, d.reason, d.details["wanted_model"]) == ("edge", "cloud_unavailable", "sd35")
    assert (
        RoutingPolicy(ROUTING, budget=0.0).decide("x", None, model_scores=[0, 9, 9], now=NOW).route == "edge"
    )
    with pytest.raises(UsageError, match=r"budget=4: must be in \[0, 3\]"):
        RoutingPolicy(ROUTING, budget=4)
    assert RoutingPolicy(ROUTING).target_rate == 1.0  # default_budget
    assert RoutingPolicy(ROUTING, 0.4).target_rate == 0.4  # target_cloud_rate alone: a budget in units


def test_two_model_budget_is_the_rate_times_the_cost():
    pair = {"calibration": [{"rate": 0.5, "alpha": 0.5}], "edge_model": "e", "cloud_model": "c"}
    assert RoutingPolicy(pair, budget=0.4).target_rate == 0.4
    costly = {
        **pair,
        "models": [{"name": "e", "where": "edge", "cost": 0}, {"name": "c", "where": "cloud", "cost": 2}],
    }
    assert RoutingPolicy(costly, budget=0.5).target_rate == 0.25
    with pytest.raises(UsageError, match=r"budget=3: must be in \[0, 2\]"):
        RoutingPolicy(costly, budget=3)


def test_pacing_in_units():
    state = DeviceState(None)
    p = RoutingPolicy(ROUTING, budget=1.5, state=state, pacing_min_span_s=3600.0)
    for i in range(10):
        state.record_request(NOW - 3600 + i * 360)  # 10 requests an hour
    state.set_quota(QuotaInfo(100, 80, 20, "day", int(NOW + 4 * 3600)), now=NOW)
    budget_t, m = p.paced_rate(NOW)
    assert m == pytest.approx(40.0, rel=0.05)
    assert budget_t == pytest.approx(20 / m)  # 20 units over ~40 prompts: 0.5 units per prompt


def test_deterministic_and_persisted(tmp_path):
    rng = random.Random(3)
    rows = [_row(rng) for _ in range(300)]
    a = RoutingPolicy(ROUTING, budget=1.0, pacing=False, state=DeviceState(tmp_path / "a.json"))
    b = RoutingPolicy(ROUTING, budget=1.0, pacing=False, state=DeviceState(None))
    assert _spend(a, rows[:250]) == _spend(b, rows[:250])
    # a restart: the window and the error come back from the file, the next decisions are the same
    a2 = RoutingPolicy(ROUTING, budget=1.0, pacing=False, state=DeviceState(tmp_path / "a.json"))
    assert a2.state.model_window(a2.router_key) == b.state.model_window(b.router_key)
    assert _spend(a2, rows[250:]) == _spend(b, rows[250:])
    assert "prompt" not in (tmp_path / "a.json").read_text()
