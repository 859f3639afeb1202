"""Routing policy, quota-aware pacing, state file, decision log and config loading (no models needed)."""

from __future__ import annotations

import json
import random

import pytest
from routet2i._errors import UsageError
from routet2i.config import load_config
from routet2i.decision_log import DecisionLog, read_decisions
from routet2i.policy import CalibrationTable, DeviceState, LocalOnlyRules, QuotaInfo, RoutingPolicy

ROUTING = {
    "calibration": [{"rate": 0.1, "alpha": 0.2}, {"rate": 0.3, "alpha": 0.4}, {"rate": 0.5, "alpha": 0.5}],
    "target_rate": 0.3,
    "alpha": 0.4,
}


def test_calibration_steps_down_and_thins_below_first_row():
    t = CalibrationTable.from_routing(ROUTING)
    assert t.alpha(0.3) == (0.4, 1.0)
    assert t.alpha(0.29) == (0.2, 1.0)  # largest tabulated rate <= 0.29 is 0.1: never overspend
    assert t.alpha(0.9) == (0.5, 1.0)
    assert t.alpha(0.0) == (0.0, 1.0)
    alpha, keep = t.alpha(0.05)
    assert alpha == 0.2 and keep == pytest.approx(0.5)
    with pytest.raises(UsageError, match="rate"):
        t.alpha(1.5)


def test_router_decision_and_overrides():
    p = RoutingPolicy(
        ROUTING,
        0.3,
        pacing=False,
        calibration="static",
        local_only=LocalOnlyRules([r"\d{3}-\d{4}"], ["passport"]),
    )
    assert p.decide("a fox", 0.39).route == "cloud"
    d = p.decide("a fox", 0.41)
    assert (d.route, d.reason, d.alpha) == ("edge", "router", 0.4)
    assert p.decide("a fox", 0.1, force="edge").reason == "forced"
    assert (p.decide("a fox", 0.9, force="cloud").route, p.decide("a fox", 0.9, force="cloud").reason) == (
        "cloud",
        "forced",
    )
    d = p.decide("my PASSPORT photo", 0.1, force="cloud")
    assert (d.route, d.reason) == ("edge", "local_only")
    assert p.decide("call 555-1234", 0.1).reason == "local_only"
    assert p.decide("passports", 0.1).reason == "router"  # whole words only
    assert p.decide("a fox", 0.1, local_only=True).reason == "local_only"
    d = p.decide("a fox", 0.1, cloud_open=False)
    assert (d.route, d.reason) == ("edge", "cloud_unavailable")
    with pytest.raises(UsageError, match="force"):
        p.decide("a fox", 0.1, force="gpu")


DAY = 86400.0
NOW = 1_800_000_000.0


def _quota(remaining, seconds_left, limit=100, period="day"):
    return QuotaInfo(
        limit=limit,
        used=limit - remaining,
        remaining=remaining,
        period=period,
        period_end_unix=int(NOW + seconds_left),
    )


def _history(state, per_day, days, end=NOW):
    """``per_day`` evenly spaced requests a day over the ``days`` before ``end`` (a simulated clock)."""
    n = int(per_day * days)
    for i in range(n):
        state.record_request(end - days * DAY + (i + 0.5) * days * DAY / n)


def test_pacing_targets_remaining_over_expected_at_the_long_run_rate(tmp_path):
    state = DeviceState(tmp_path / "s.json")
    _history(state, 100, 8)  # a week and a day at 100 requests a day: 100 a day in the 7-day window
    state.set_quota(_quota(20, DAY / 2))
    p = RoutingPolicy(ROUTING, 0.3, state=state, calibration="static")
    rho, m = p.paced_rate(NOW)
    assert m == pytest.approx(50.0, rel=0.02)  # 100 a day for half a day
    assert rho == pytest.approx(0.3)  # 20/50 = 0.4 covers the target
    greedy = RoutingPolicy(ROUTING, 0.9, state=state, calibration="static")
    assert greedy.paced_rate(NOW)[0] == pytest.approx(0.4, rel=0.02)  # the quota really runs short
    state.set_quota(_quota(10, DAY / 2))
    d = p.decide("a fox", 0.31, now=NOW)  # paced 0.2 -> table row 0.1 (alpha 0.2): 0.31 stays on the edge
    assert (d.route, d.alpha, d.paced_rate) == ("edge", 0.2, pytest.approx(0.2, rel=0.02))
    assert (
        RoutingPolicy(ROUTING, 0.3, state=state, pacing=False).decide("a fox", 0.31, now=NOW).route == "cloud"
    )
    again = DeviceState(tmp_path / "s.json")  # the state survives a restart
    assert again.requests_total == 800 and again.quota.remaining == 10
    assert again.request_rate(NOW, 7 * DAY, 5) == pytest.approx(state.request_rate(NOW, 7 * DAY, 5))


def test_a_burst_does_not_cut_the_paced_rate():
    # the case: a fresh device, 50 quick requests, a 0.9 target and a daily quota of 100
    fresh = DeviceState(None)
    for i in range(50):
        fresh.record_request(NOW - 60 + i)
    fresh.set_quota(_quota(100, 20 * 3600))
    p = RoutingPolicy(ROUTING, 0.9, state=fresh)
    rho, m = p.paced_rate(NOW)
    assert rho == 0.9 and m == pytest.approx(50 * 20 / 24)  # 50 a day (the period), not 50 a minute
    # a device with a history of 20 a day and a burst of 50 on top: 60 units cover the rest of the day
    old = DeviceState(None)
    _history(old, 20, 7, end=NOW - 120)
    for i in range(50):
        old.record_request(NOW - 60 + i)
    old.set_quota(_quota(60, DAY / 2))
    assert RoutingPolicy(ROUTING, 0.9, state=old).paced_rate(NOW)[0] == 0.9
    # ... but a quota that cannot cover the long-run rate is paced
    old.set_quota(_quota(5, DAY / 2))
    rho, m = RoutingPolicy(ROUTING, 0.9, state=old).paced_rate(NOW)
    assert m == pytest.approx(190 / 7 / 2, rel=0.05) and rho == pytest.approx(5 / m)


def test_idle_days_and_period_ends():
    state = DeviceState(None)
    _history(state, 100, 4, end=NOW - 3 * DAY)  # four busy days, then three idle ones
    state.set_quota(_quota(10, DAY / 2))
    p = RoutingPolicy(ROUTING, 0.9, state=state)
    assert state.request_rate(NOW, 7 * DAY, 5) * DAY == pytest.approx(400 / 7, rel=0.02)
    assert p.paced_rate(NOW)[1] == pytest.approx(400 / 7 / 2, rel=0.02)
    # eight idle days: nothing left in the window, nothing to pace against
    later = NOW + 8 * DAY
    state.set_quota(QuotaInfo(100, 90, 10, "day", int(later + DAY / 2)), now=later)
    assert p.paced_rate(later) == (0.9, None)
    # a passed period end: the quota is stale, the target rate holds until the cloud reports again
    state.quota = _quota(1, DAY / 2)
    assert p.paced_rate(NOW + DAY) == (0.9, None)
    # the last minutes of a period with units to spare: no cut
    assert p.paced_rate(NOW + DAY / 2 - 60)[0] == 0.9
    # too few requests seen: no pacing
    fresh = RoutingPolicy(ROUTING, 0.3, state=DeviceState(None))
    fresh.state.set_quota(_quota(1, 10000))
    assert fresh.paced_rate(NOW) == (0.3, None)


def test_a_quota_that_really_runs_out_lasts_the_period():
    """Simulated day: 100 requests a day, 10 units left for the last half day, target 0.9. Pacing spends
    them over the half day instead of in the first dozen requests."""
    rng = random.Random(0)
    state = DeviceState(None)
    _history(state, 100, 7)
    remaining, end = 10, NOW + DAY / 2
    state.set_quota(QuotaInfo(100, 90, remaining, "day", int(end)), now=NOW)
    p = RoutingPolicy(ROUTING, 0.9, state=state, rng=rng)
    spent_at = []
    t = NOW
    while t < end:
        d = p.route("a fox", rng.random(), now=t)
        if d.route == "cloud":
            remaining -= 1
            spent_at.append(t)
            state.set_quota(QuotaInfo(100, 100 - remaining, remaining, "day", int(end)), now=t)
        t += DAY / 100
    assert 6 <= len(spent_at) <= 10
    assert spent_at[-1] > NOW + 0.35 * DAY  # units still spent late in the period
    unpaced = RoutingPolicy(ROUTING, 0.9, state=DeviceState(None), pacing=False, rng=random.Random(0))
    wanted = [unpaced.decide("a fox", random.Random(i).random(), now=NOW).route for i in range(30)]
    assert wanted.count("cloud") >= 10  # unpaced, the 10 units would be gone within the first 30 of 50


def test_exhausted_quota_is_remembered_until_period_end(tmp_path):
    now = 1_000_000.0
    state = DeviceState(tmp_path / "s.json")
    state.set_quota(
        QuotaInfo(limit=2, used=2, remaining=0, period="day", period_end_unix=int(now) + 50), now=now
    )
    p = RoutingPolicy(ROUTING, 0.3, state=state)
    d = p.decide("a fox", 0.1, force="cloud", now=now + 10)
    assert (d.route, d.reason) == ("edge", "quota_exhausted")
    assert p.decide("a fox", 0.1, now=now + 10).reason == "quota_exhausted"
    assert p.decide("a fox", 0.45, now=now + 10).reason == "router"  # would not have gone to the cloud
    assert DeviceState(tmp_path / "s.json").is_exhausted(now + 10)
    assert p.decide("a fox", 0.1, force="cloud", now=now + 60).route == "cloud"


def test_remembered_quota_belongs_to_one_cloud_account(tmp_path):
    # a state file shared by clients of different endpoints/tokens (the default path is per user): the
    # exhaustion seen with one token must not send another token's requests to the edge
    now = 1_000_000.0
    path = tmp_path / "s.json"
    a = DeviceState(path, cloud_key="account-a")
    a.record_request(now - 5)
    a.set_quota(QuotaInfo(limit=2, used=2, remaining=0, period="day", period_end_unix=int(now) + 50), now=now)
    assert DeviceState(path, cloud_key="account-a").is_exhausted(now + 10)
    b = DeviceState(path, cloud_key="account-b")
    assert not b.is_exhausted(now + 10) and b.quota is None
    assert b.requests_total == 1 and b.first_request_unix == now - 5  # the device's own rate is kept
    b.record_request(now)  # ... and recording it keeps account a's quota in the file
    assert DeviceState(path, cloud_key="account-a").is_exhausted(now + 10)


def test_edge_client_keys_its_state_by_endpoint_and_token(tmp_path):
    from routet2i.client import EdgeClient

    keys = []
    for cloud, token in [
        ("127.0.0.1:1", "t1"),
        ("127.0.0.1:1", "t2"),
        ("127.0.0.1:2", "t1"),
        ("127.0.0.1:1", "t1"),
    ]:
        with EdgeClient(cloud=cloud, token=token, state_file=str(tmp_path / "s.json")) as c:
            keys.append(c.state.cloud_key)
    assert keys[0] == keys[3] and len(set(keys)) == 3 and all(keys)
    assert "t1" not in json.dumps(keys)


def test_thinning_keeps_expected_rate():
    p = RoutingPolicy(
        {"calibration": [{"rate": 0.2, "alpha": 0.3}]}, 0.05, pacing=False, rng=random.Random(0)
    )
    n = sum(p.decide("x", 0.1).route == "cloud" for _ in range(4000))
    assert 0.2 < n / 4000 < 0.3  # keep = 0.05 / 0.2 = 0.25 of the prompts under alpha


def test_state_file_is_written_atomically_and_corrupt_file_tolerated(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("{not json")
    s = DeviceState(path)
    assert s.requests_total == 0
    s.record_request(5.0)
    assert json.loads(path.read_text())["request_counts"] == {"0": 1}
    # no temp file left behind (the lock file stays: removing it would race with other processes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.lock"]


def test_decision_log_omits_prompt_unless_enabled(tmp_path):
    log = DecisionLog(tmp_path / "d.jsonl")
    log.append({"route": "edge", "alpha": float("nan")}, prompt="secret fox")
    DecisionLog(tmp_path / "d.jsonl", log_prompts=True).append({"route": "cloud"}, prompt="open fox")
    recs = read_decisions(tmp_path / "d.jsonl")
    assert "prompt" not in recs[0] and recs[0]["prompt_chars"] == 10 and recs[0]["alpha"] is None
    assert recs[1]["prompt"] == "open fox"
    assert "secret" not in (tmp_path / "d.jsonl").read_text()


def test_config_file_env_and_token(tmp_path):
    cfg = tmp_path / "routet2i.toml"
    cfg.write_text(
        'router = "b/router"\nedge = "/abs/edge"\n[cloud]\nendpoint = "h:1"\ndeadline_s = 9\n'
        '[policy]\ntarget_cloud_rate = 0.4\nlocal_only_keywords = ["medical"]\n'
    )
    env = {"ROUTET2I_TOKEN": "t0k", "ROUTET2I_CLOUD": "env:2", "ROUTET2I_TLS": "true"}
    c = load_config(cfg, environ=env)
    assert c.router == str(tmp_path / "b" / "router") and c.edge == "/abs/edge"
    assert (c.cloud, c.tls, c.deadline_s, c.token) == ("env:2", True, 9, "t0k")
    assert c.target_cloud_rate == 0.4 and c.local_only_keywords == ["medical"]
    assert load_config(cfg, environ=env, target_cloud_rate=0.1).target_cloud_rate == 0.1
    assert load_config(cfg, environ={}).token is None


@pytest.mark.parametrize(
    "text, match",
    [
        ('[cloud]\ntoken = "abc"\n', "never read from a file"),
        ('token = "abc"\n', "never read from a file"),
        ("[cloud]\ndeadline = 3\n", "unknown key"),
        ('routerr = "x"\n', "unknown top-level key"),
        ("[policy]\ntarget_cloud_rate = 2\n", "target_cloud_rate=2"),
        ("router = \n", "not valid TOML"),
    ],
)
def test_config_errors(tmp_path, text, match):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(UsageError, match=match):
        load_config(cfg, environ={})


def test_config_env_bad_value():
    with pytest.raises(UsageError, match="ROUTET2I_DEADLINE_S"):
        load_config(None, environ={"ROUTET2I_DEADLINE_S": "soon"})
    with pytest.raises(UsageError, match="does not exist"):
        load_config("/nonexistent/routet2i.toml", environ={})


def test_config_path_that_is_a_folder_or_not_text(tmp_path):
    with pytest.raises(UsageError, match="is a folder"):
        load_config(tmp_path, environ={})
    junk = tmp_path / "junk.toml"
    junk.write_bytes(b"router = '\xbd\xff'\n")
    with pytest.raises(UsageError, match=r"junk\.toml is not UTF-8 text"):
        load_config(junk, environ={})


def test_config_env_empty_string_turns_files_off():
    c = load_config(
        None, environ={"ROUTET2I_STATE_FILE": "", "ROUTET2I_DECISION_LOG": "", "ROUTET2I_STEPS": "x"}
    )
    assert c.resolved_state_file() is None and c.resolved_decision_log() is None
    c = load_config(
        None, environ={"ROUTET2I_NUM_INFERENCE_STEPS": "4", "ROUTET2I_PROVIDERS": "CPUExecutionProvider"}
    )
    assert c.num_inference_steps == 4 and c.providers == ["CPUExecutionProvider"]


def test_config_provider_options(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('providers = [["TensorrtExecutionProvider", {trt_fp16_enable = true}], "cpu"]\n')
    c = load_config(cfg, environ={})
    assert c.providers == [("TensorrtExecutionProvider", {"trt_fp16_enable": True}), "cpu"]
    cfg.write_text("providers = [3]\n")
    with pytest.raises(UsageError, match="providers"):
        load_config(cfg, environ={})
