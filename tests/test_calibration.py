"""Online calibration (routet2i.policy): warm start from the table, tracking the device's own PRS^
distribution and the paced rate, determinism, persistence, the static switch and the config keys."""

from __future__ import annotations

import random

import pytest
from routet2i._errors import UsageError
from routet2i.config import ClientConfig, load_config
from routet2i.policy import WARMUP, DeviceState, QuotaInfo, RoutingPolicy, window_quantile

# a table computed on "training" prompts: PRS^ uniform on [0, 1] there
ROUTING = {
    "calibration": [{"rate": r / 20, "alpha": r / 20} for r in range(21)],
    "target_rate": 0.3,
    "alpha": 0.3,
    "router_version": "t-1",
}
NOW = 1_800_000_000.0


def _prs(rng: random.Random, lo: float, hi: float) -> float:
    """The device's own prompts: PRS^ in [lo, hi] (a triangular, not uniform, distribution)."""
    return rng.triangular(lo, hi, lo + 0.8 * (hi - lo))


def _stream(policy: RoutingPolicy, prs: list[float]) -> list[bool]:
    """Route each PRS^ (one a minute); True where the router wanted the cloud."""
    out = []
    for i, x in enumerate(prs):
        d = policy.route("a prompt", x, now=NOW + 60 * i)
        out.append(d.reason == "cloud_unavailable" or d.route == "cloud")
    return out


def test_window_quantile_puts_the_rate_below():
    v = [i / 10 for i in range(10)]  # 0.0 .. 0.9
    assert window_quantile(v, 0.3) == pytest.approx(0.25)  # 3 values below
    assert sum(x < window_quantile(v, 0.5) for x in v) == 5
    assert window_quantile(v, 0.0) == 0.0 and window_quantile(v, 1.0) > 0.9
    assert window_quantile([0.4], 0.3) == 0.4


def test_first_prompts_behave_as_the_table_then_blend_in():
    p = RoutingPolicy(ROUTING, 0.3, pacing=False)
    d = p.route("a fox", 0.9, now=NOW, cloud_configured=False)
    assert (d.alpha, d.calibration, d.observed) == (0.3, "static", 0)  # the table's alpha
    rng = random.Random(1)
    for i in range(WARMUP // 2 - 1):
        p.route("a fox", _prs(rng, 0.6, 1.0), now=NOW + i, cloud_configured=False)
    half = p.decide("a fox", 0.5, now=NOW)
    assert half.calibration == "online" and half.observed == WARMUP // 2
    prs, _ = p.state.calibration_window(p.router_key)
    window_alpha = window_quantile(sorted(prs), 0.3)
    assert 0.3 < half.alpha < window_alpha  # halfway: between the table and the window
    assert half.alpha == pytest.approx((0.3 + window_alpha) / 2, abs=0.03)


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_online_holds_the_target_on_two_shifted_streams_static_does_not(target):
    rng = random.Random(7)
    first = [_prs(rng, 0.5, 1.0) for _ in range(1200)]  # the table would send almost nothing
    second = [_prs(rng, 0.0, 0.5) for _ in range(1200)]  # ... or far too much
    online = RoutingPolicy(ROUTING, target, pacing=False)
    static = RoutingPolicy(ROUTING, target, pacing=False, calibration="static")
    for stream in (first, second):
        on = _stream(online, stream)[400:]
        st = _stream(static, stream)[400:]
        assert sum(on) / len(on) == pytest.approx(target, abs=0.03)
        assert abs(sum(st) / len(st) - target) > 0.04  # the table, computed on other prompts, is off


def test_online_calibration_is_deterministic_and_persisted(tmp_path):
    rng = random.Random(3)
    prs = [_prs(rng, 0.2, 0.9) for _ in range(300)]
    a = RoutingPolicy(ROUTING, 0.3, pacing=False, state=DeviceState(tmp_path / "a.json"))
    b = RoutingPolicy(ROUTING, 0.3, pacing=False, state=DeviceState(None))
    alphas_a = [a.route("p", x, now=NOW + i, cloud_configured=False).alpha for i, x in enumerate(prs)]
    alphas_b = [b.route("p", x, now=NOW + i, cloud_configured=False).alpha for i, x in enumerate(prs)]
    assert alphas_a == alphas_b  # the same prompts, the same thresholds
    # a restart: the window and the rate error come back from the file
    again = RoutingPolicy(ROUTING, 0.3, pacing=False, state=DeviceState(tmp_path / "a.json"))
    assert again.decide("p", 0.5, now=NOW).alpha == a.decide("p", 0.5, now=NOW).alpha
    assert again.decide("p", 0.5, now=NOW).observed == 300
    # only numbers are stored, never the prompt
    assert "p" not in (tmp_path / "a.json").read_text().replace('"prs"', "")
    # another router (another routing.json) starts from its own table
    other = RoutingPolicy({**ROUTING, "router_version": "t-2"}, 0.3, state=DeviceState(tmp_path / "a.json"))
    d = other.decide("p", 0.5, now=NOW)
    assert (d.alpha, d.observed) == (0.3, 0)


def test_window_is_bounded_and_static_mode_uses_the_table_only():
    p = RoutingPolicy(ROUTING, 0.3, pacing=False, calibration_window=50)
    for i in range(120):
        p.route("p", 0.9 - i / 1000, now=NOW + i, cloud_configured=False)
    assert len(p.state.calibration_window(p.router_key)[0]) == 50
    s = RoutingPolicy(ROUTING, 0.3, pacing=False, calibration="static", state=p.state)
    assert {s.route("p", 0.9, now=NOW, cloud_configured=False).alpha for _ in range(20)} == {0.3}
    with pytest.raises(UsageError, match="calibration='dynamic'"):
        RoutingPolicy(ROUTING, 0.3, calibration="dynamic")


def test_online_alpha_tracks_the_paced_rate():
    rng = random.Random(5)
    state = DeviceState(None)
    for i in range(700):  # a week at 100 requests a day
        state.record_request(NOW - 7 * 86400 + i * 864)
    p = RoutingPolicy(ROUTING, 0.5, state=state)
    stream = [_prs(rng, 0.3, 0.8) for _ in range(600)]
    for i, x in enumerate(stream[:300]):  # the last five hours
        p.route("p", x, now=NOW - (300 - i) * 60, cloud_configured=False)
    # the quota runs short: 10 units for the about 70 requests left in the day (1,000 a week)
    state.set_quota(QuotaInfo(100, 90, 10, "day", int(NOW + 86400 / 2)), now=NOW)
    wanted = []
    for x in stream[300:]:
        d = p.decide("p", x, now=NOW)
        assert d.paced_rate == pytest.approx(10 / d.expected_requests) and d.paced_rate < 0.15
        wanted.append(d.wanted_cloud)
        p.observe(d)
    assert sum(wanted) / len(wanted) == pytest.approx(d.paced_rate, abs=0.04)


def test_config_calibration_and_budget(tmp_path):
    cfg = tmp_path / "routet2i.toml"
    cfg.write_text('[policy]\ncalibration = "static"\nbudget = 0.4\ncalibration_window = 300\n')
    c = load_config(cfg, environ={})
    assert (c.calibration, c.target_cloud_rate, c.budget, c.calibration_window) == ("static", 0.4, 0.4, 300)
    assert load_config(None, environ={}).calibration == "online"  # the default
    assert load_config(None, environ={"ROUTET2I_CALIBRATION": "static"}).calibration == "static"
    for kwargs, match in [
        ({"calibration": "adaptive"}, "calibration='adaptive': must be 'online' or 'static'"),
        ({"budget": 0.3, "target_cloud_rate": 0.5}, "budget is its alias"),
        ({"budget": -1}, r"budget=-1: must be a finite number >= 0"),
        ({"budget": float("inf")}, r"budget=inf: must be a finite number >= 0"),
        ({"calibration_window": 0}, "calibration_window=0"),
    ]:
        with pytest.raises(UsageError, match=match):
            ClientConfig(**kwargs)
    assert ClientConfig(budget=0.3, target_cloud_rate=0.3).target_cloud_rate == 0.3
    # units: above 1 for an N-model router (a 2-model router's policy refuses more than its cloud cost)
    assert ClientConfig(budget=2).budget == 2
    with pytest.raises(UsageError, match=r"budget=2: must be in \[0, 1\]"):
        RoutingPolicy(ROUTING, budget=2)
