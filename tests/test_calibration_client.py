"""`EdgeClient.route()` on a real router bundle with no edge and no cloud (the CONTRACTS.md section 6
construction): the decision's fields, online calibration through the client, overrides, ``models=``, the
async twin and the decision log."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from routet2i._errors import UsageError
from routet2i.decision_log import read_decisions

WORDS = ["a red fox", "two cats", "a city at night", "an astronaut", "a bowl of fruit", "a castle"]
STYLES = ["", "oil painting", "photo, 35mm", "in the snow, highly detailed", "watercolor, trending"]


def _prompts(n: int) -> list[str]:
    combos = [f"{w} {s} {k}".strip() for k, (w, s) in enumerate(itertools.product(WORDS * 40, STYLES))]
    return combos[:n]


@pytest.fixture(scope="module")
def router_bundle(tmp_path_factory):
    from _device_bundles import handmade_router_bundle

    return handmade_router_bundle(tmp_path_factory.mktemp("router") / "bundle")[0]


def test_route_without_edge_or_cloud_holds_the_target(router_bundle, tmp_path):
    from routet2i import EdgeClient

    state = tmp_path / "state.json"
    client = EdgeClient(router=router_bundle, target_cloud_rate=0.3, state_file=str(state), decision_log="")
    decisions = [client.route(p) for p in _prompts(700)]
    first = decisions[0]
    assert (first.target_rate, first.paced_rate, first.calibration, first.alpha) == (0.3, 0.3, "static", 0.4)
    assert all(d.route == "edge" and d.reason in ("router", "cloud_unavailable") for d in decisions)
    assert all(d.model == "sd21" for d in decisions)  # the edge generates: no cloud configured
    wanted = [d.reason == "cloud_unavailable" for d in decisions]
    assert all(w == (d.prs < d.alpha) for w, d in zip(wanted, decisions, strict=True))
    assert sum(wanted[300:]) / 400 == pytest.approx(0.3, abs=0.05)
    assert decisions[-1].calibration == "online" and decisions[-1].observed == 500
    doc = json.loads(state.read_text())
    assert doc["requests_total"] == 700
    assert not (tmp_path / "decisions.jsonl").exists()
    d = decisions[-1].to_dict()
    assert {"route", "reason", "model", "prs", "alpha", "target_rate", "paced_rate"} <= set(d)
    json.dumps(d, allow_nan=False)


def test_static_calibration_keeps_the_table_alpha(router_bundle, tmp_path):
    from routet2i import EdgeClient

    client = EdgeClient(router=router_bundle, target_cloud_rate=0.3, state_file="", decision_log="",
                        calibration="static")  # fmt: skip
    assert {client.route(p).alpha for p in _prompts(60)} == {0.4}


def test_route_overrides_models_and_log(router_bundle, tmp_path):
    from routet2i import EdgeClient

    log = tmp_path / "d.jsonl"
    client = EdgeClient(router=router_bundle, budget=0.5, state_file="", decision_log=str(log))
    assert client.policy.target_rate == 0.5  # budget: target_cloud_rate's alias
    d = client.route("a fox", force="cloud")
    assert (d.route, d.reason, d.cause) == ("edge", "cloud_unavailable", "no cloud endpoint configured")
    assert client.route("a fox", force="edge").reason == "forced"
    assert client.route("a fox", local_only=True).reason == "local_only"
    assert client.route("a fox", force="cloud", models=["sd21"]).reason == "forced"  # cloud left out
    assert client.route("a fox", force="cloud", models=["sd3", "sd21"]).reason == "cloud_unavailable"
    with pytest.raises(UsageError, match=r"unknown model\(s\) \['dalle'\]; this router knows sd21, sd3"):
        client.route("a fox", models=["dalle"])
    for bad in ("sd3", [], [3]):
        with pytest.raises(UsageError, match="models="):
            client.route("a fox", models=bad)
    with pytest.raises(UsageError, match="force='gpu'"):
        client.route("a fox", force="gpu")
    with pytest.raises(UsageError, match="prompt"):
        client.route("  ")
    recs = read_decisions(log)
    assert len(recs) == 5 and all(r["decided_only"] for r in recs)
    assert all("prompt" not in r and r["prompt_chars"] == 5 for r in recs)


def test_async_route(router_bundle):
    from routet2i import AsyncEdgeClient

    async def main():
        async with AsyncEdgeClient(router=router_bundle, state_file="", decision_log="") as client:
            return await asyncio.gather(*(client.route(p) for p in _prompts(8)))

    out = asyncio.run(main())
    assert len(out) == 8 and all(d.route == "edge" and d.prs is not None for d in out)
