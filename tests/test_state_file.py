"""One device, several processes: the state file (request counts, calibration window, quota) merged under a
file lock and written atomically; the decision log's torn lines."""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading

import pytest
from routet2i.decision_log import DecisionLog, read_decisions
from routet2i.policy import DeviceState, QuotaInfo

ROUTING = {
    "calibration": [{"rate": 0.3, "alpha": 0.4}, {"rate": 0.5, "alpha": 0.5}],
    "target_rate": 0.3,
    "alpha": 0.4,
    "edge_model": "edge-m",
    "cloud_model": "cloud-m",
}


class LengthRouter:
    """A duck-typed router: PRS^ from the prompt's length (no model needed)."""

    routing = ROUTING

    def predict_one(self, prompt: str) -> tuple[float, list[float]]:
        return (len(prompt) * 37 % 100) / 100, [0.0]


def _client(state: str, log: str):
    from routet2i.client import EdgeClient

    return EdgeClient(router=LengthRouter(), target_cloud_rate=0.3, state_file=state, decision_log=log)


def _worker(state: str, log: str, barrier, i: int) -> None:
    client = _client(state, log)
    barrier.wait(timeout=60)  # all eight start routing at once
    for j in range(5):
        client.route(f"process {i} prompt {'x' * j}")


def test_eight_processes_share_one_state_file(tmp_path):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    ctx = multiprocessing.get_context("fork")
    state, log = tmp_path / "state.json", tmp_path / "decisions.jsonl"
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=_worker, args=(str(state), str(log), barrier, i)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 8
    doc = json.loads(state.read_text())
    assert doc["requests_total"] == 40 and sum(doc["request_counts"].values()) == 40  # none lost
    (window,) = doc["calibration"].values()
    assert len(window["prs"]) == 40  # every routed PRS^ in the calibration window
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decisions.jsonl", "state.json", "state.json.lock"]
    assert len(read_decisions(log)) == 40
    # a client started afterwards sees all of it
    assert _client(str(state), "").state.requests_total == 40


def test_threads_of_one_client_and_a_second_client_in_the_same_process(tmp_path):
    state = str(tmp_path / "state.json")
    a, b = _client(state, ""), _client(state, "")
    threads = [
        threading.Thread(target=lambda c=c: [c.route(f"p {i}") for i in range(25)]) for c in (a, a, b, b)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert DeviceState(state).requests_total == 100
    assert a.state.requests_total == 100 or b.state.requests_total == 100  # the last writer saw everything


def test_merge_keeps_the_newest_quota_and_the_other_accounts(tmp_path):
    path = tmp_path / "s.json"
    a1, a2 = DeviceState(path, cloud_key="a"), DeviceState(path, cloud_key="a")
    a1.set_quota(QuotaInfo(10, 3, 7, "day", 2_000_000_000), now=100.0)
    a2.record_request(50.0)  # a2 had not seen the quota: recording merges, does not erase it
    assert DeviceState(path, cloud_key="a").quota.remaining == 7
    a2.set_quota(QuotaInfo(10, 9, 1, "day", 2_000_000_000), now=90.0)  # older than a1's: ignored
    assert DeviceState(path, cloud_key="a").quota.remaining == 7
    b = DeviceState(path, cloud_key="b")
    b.record_request(60.0)
    assert b.quota is None and DeviceState(path, cloud_key="a").quota.remaining == 7
    assert DeviceState(path).requests_total == 2


def test_version_1_state_file_is_read(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"version": 1, "request_times": [3600.0, 3601.0, 7300.0], "quota": None}))
    s = DeviceState(path)
    assert (s.requests_total, s.first_request_unix, s.request_counts) == (3, 3600.0, {1: 2, 2: 1})


def test_torn_decision_log_line(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    log = DecisionLog(path)
    log.append({"route": "edge"})
    with open(path, "a") as f:
        f.write('{"route": "clo')  # a writer died mid-line
    with caplog.at_level(logging.WARNING, logger="routet2i.decision_log"):
        assert [r["route"] for r in read_decisions(path)] == ["edge"]
    assert "line 2: torn record skipped" in caplog.text
    log.append({"route": "cloud"})  # the next record starts on a new line
    lines = path.read_text().splitlines()
    assert lines[1] == '{"route": "clo' and json.loads(lines[2])["route"] == "cloud"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="routet2i.decision_log"):
        assert [r["route"] for r in read_decisions(path)] == ["edge", "cloud"]
    assert "torn record skipped" in caplog.text
    path.write_text('{"route": "edge"}\n{"route": "edge"}{"route": "cloud"}\n{"route": "edge"}\n')
    with pytest.raises(ValueError, match="line 2: not a JSON object"):  # damage, not a torn write
        read_decisions(path)
