"""EdgeClient end to end on loopback: tiny SD2.1 edge bundle (ONNX, torch-free path), tiny SD3 cloud server
over real gRPC with a SQLite quota store, the real router bundle where routing matters."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from routet2i.decision_log import read_decisions

STEPS = 2
SIZE = 64


@pytest.fixture(scope="session")
def edge_bundle(tiny_models) -> Path:
    """`routet2i export edge` of the tiny SD2.1 (shared with the device-runtime tests)."""
    from _device_bundles import edge_bundle_for

    return edge_bundle_for(tiny_models["edge-sd21"])


@pytest.fixture(scope="session")
def router_bundle(tmp_path_factory) -> Path:
    """A router bundle with the contract's graph signature and calibration table (shared helper)."""
    from _device_bundles import handmade_router_bundle

    return handmade_router_bundle(tmp_path_factory.mktemp("router") / "bundle")[0]


@pytest.fixture
def cloud(tiny_models, tmp_path):
    """(BackgroundServer, store, token-for(quota)) on a fresh SQLite store with the tiny SD3."""
    from routet2i.cloud_server.servicer import BackgroundServer
    from routet2i.cloud_server.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'quota.db'}")
    server = BackgroundServer(store, str(tiny_models["cloud-sd3"]))
    yield server, store
    server.stop(grace=0.5)
    store.close()


def _client(edge_bundle, address, token, tmp_path, **kw):
    from routet2i import EdgeClient

    kw.setdefault("deadline_s", 60.0)
    kw.setdefault("backoff_initial_s", 0.05)
    kw.setdefault("backoff_max_s", 0.2)
    return EdgeClient(
        edge=edge_bundle, cloud=address, token=token, state_file=str(tmp_path / "state.json"),
        decision_log=str(tmp_path / "decisions.jsonl"), width=SIZE, height=SIZE, num_inference_steps=STEPS, **kw,
    )  # fmt: skip


def test_quota_two_then_quota_exhausted(edge_bundle, cloud, tmp_path):
    server, store = cloud
    token = store.add_device("dev-q2", 2, "day")
    events = []
    with _client(edge_bundle, server.address, token, tmp_path) as client:
        results = [
            client.generate("a red fox", seed=i, force="cloud", progress=events.append) for i in range(3)
        ]
    assert [(r.route, r.reason) for r in results] == [("cloud", "forced"), ("cloud", "forced"),
                                                      ("edge", "quota_exhausted")]  # fmt: skip
    assert results[0].quota["remaining"] == 1 and results[1].quota["remaining"] == 0
    assert results[2].quota["remaining"] == 0
    assert store.quota("dev-q2").used == 2
    for r in results:
        assert r.image.size == (SIZE, SIZE) and r.timings["total"] > 0
    assert results[0].timings["generate"] > 0 and results[0].model != results[2].model
    assert {e.route for e in events} == {"cloud", "edge"}
    assert events[-1].step == events[-1].total_steps == STEPS
    log = read_decisions(tmp_path / "decisions.jsonl")
    assert [d["reason"] for d in log] == ["forced", "forced", "quota_exhausted"]
    assert all("prompt" not in d for d in log)
    # the exhaustion is remembered across restarts: a new client does not ask the cloud again
    with _client(edge_bundle, server.address, token, tmp_path) as again:
        r = again.generate("a red fox", seed=5, force="cloud")
        assert (r.route, r.reason, r.cloud_attempts) == ("edge", "quota_exhausted", 0)
    # a device that does not know yet learns it from the QuotaFailure detail, then remembers it
    with _client(edge_bundle, server.address, token, tmp_path / "fresh") as fresh:
        r = fresh.generate("a red fox", seed=6, force="cloud")
        assert (r.route, r.reason, r.cloud_attempts) == ("edge", "quota_exhausted", 1)
        assert "dev-q2" in r.cloud_error and r.quota["remaining"] == 0
        assert fresh.state.exhausted_until == r.quota["period_end_unix"]
        assert fresh.generate("a red fox", seed=7, force="cloud").cloud_attempts == 0
    assert store.quota("dev-q2").used == 2


def test_cloud_stopped_gives_cloud_unavailable_then_breaker_fails_fast(edge_bundle, cloud, tmp_path):
    server, store = cloud
    token = store.add_device("dev-down", 10, "day")
    deadline = 2.0
    with _client(
        edge_bundle, server.address, token, tmp_path, deadline_s=deadline, breaker_reset_s=60
    ) as client:
        assert client.generate("a fox", seed=0, force="cloud").route == "cloud"
        server.stop(grace=0)
        r = client.generate("a fox", seed=1, force="cloud")
        cloud_seconds = r.timings["network"]
        assert (r.route, r.reason) == ("edge", "cloud_unavailable")
        assert cloud_seconds <= deadline + 0.5, r.timings
        assert r.cloud_attempts >= 1 and r.cloud_error
        r2 = client.generate("a fox", seed=2, force="cloud")
        assert (r2.route, r2.reason) == ("edge", "cloud_unavailable")
        assert r2.cloud_attempts == 0 and r2.cloud_error == "circuit breaker open"  # no call at all
        assert r2.timings["network"] == 0.0
    assert store.quota("dev-down").used == 1


class DropFirstResponse(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Lets the first Generate reach the server (which generates and charges), then loses its response."""

    def __init__(self):
        self.dropped = 0
        self.request_ids = []

    def _intercept(self, continuation, details, request):
        if "Generate" in details.method:
            self.request_ids.append(request.request_id)
        outcome = continuation(details, request)
        if "Generate" in details.method and self.dropped == 0:
            self.dropped += 1
            if details.method.endswith("GenerateStream"):
                list(outcome)  # the server finished (and charged)
            else:
                outcome.result()
            raise _Unavailable()
        return outcome

    def intercept_unary_unary(self, continuation, details, request):
        return self._intercept(continuation, details, request)

    def intercept_unary_stream(self, continuation, details, request):
        return self._intercept(continuation, details, request)


class _Unavailable(grpc.RpcError, grpc.Call):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "response lost (test)"

    def trailing_metadata(self):
        return ()

    def initial_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


@pytest.mark.parametrize("stream", [False, True])
def test_retry_after_dropped_response_not_charged_twice(edge_bundle, cloud, tmp_path, stream):
    server, store = cloud
    token = store.add_device("dev-drop", 5, "day")
    drop = DropFirstResponse()
    progress = (lambda e: None) if stream else None
    with _client(edge_bundle, server.address, token, tmp_path, cloud_interceptors=(drop,)) as client:
        r = client.generate("a lighthouse", seed=3, force="cloud", progress=progress)
    assert (r.route, r.reason, r.cloud_attempts) == ("cloud", "forced", 2)
    assert (
        drop.dropped == 1
        and len(drop.request_ids) == 2
        and drop.request_ids[0] == drop.request_ids[1] == r.request_id
    )
    assert store.quota("dev-drop").used == 1
    assert r.quota["used"] == 1


def test_router_bundle_routes_and_logs(edge_bundle, router_bundle, cloud, tmp_path):
    server, store = cloud
    token = store.add_device("dev-router", 50, "day")
    with _client(edge_bundle, server.address, token, tmp_path, router=router_bundle, target_cloud_rate=1.0,
                 local_only_keywords=["passport"], log_prompts=True) as client:  # fmt: skip
        r = client.generate("three astronauts playing chess on the moon", seed=0)
        assert r.reason == "router" and r.prs is not None and r.alpha is not None
        assert r.route == ("cloud" if r.prs < r.alpha else "edge")
        d = client.generate("my passport photo", seed=0)
        assert (d.route, d.reason) == ("edge", "local_only")
        none = client.generate("a cat", seed=1)
    with _client(
        edge_bundle, server.address, token, tmp_path / "b", router=router_bundle, target_cloud_rate=0.0
    ) as client:
        z = client.generate("a cat", seed=1)
        assert (z.route, z.reason, z.alpha) == ("edge", "router", 0.0)
    assert none.prs == pytest.approx(z.prs, abs=1e-6)  # same prompt, same router, same PRS^
    log = read_decisions(tmp_path / "decisions.jsonl")
    assert [d["prompt"] for d in log] == [
        "three astronauts playing chess on the moon",
        "my passport photo",
        "a cat",
    ]
    json.dumps(r.to_dict(), allow_nan=False)


def test_async_client_progress_on_loop(edge_bundle, cloud, tmp_path):
    from routet2i import AsyncEdgeClient

    server, store = cloud
    token = store.add_device("dev-async", 5, "day")

    async def main():
        import threading

        loop_thread = threading.get_ident()
        threads = set()
        client = AsyncEdgeClient(client=_client(edge_bundle, server.address, token, tmp_path))
        async with client:
            results = await asyncio.gather(
                client.generate("a cup of coffee", seed=0, force="cloud", progress=lambda e: threads.add(threading.get_ident())),
                client.generate("a cup of tea", seed=1, force="edge", progress=lambda e: threads.add(threading.get_ident())),
            )  # fmt: skip
        return results, threads, loop_thread

    results, threads, loop_thread = asyncio.run(main())
    assert [r.route for r in results] == ["cloud", "edge"]
    assert threads == {loop_thread}


_TORCH_FREE = r"""
import importlib.abc, json, sys

BLOCKED = ("torch", "transformers", "diffusers", "optimum", "accelerate", "safetensors", "routet2i.training",
           "routet2i.export", "routet2i.cloud_server")


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked: the device side must not import it")
        return None


sys.meta_path.insert(0, Block())
import routet2i
assert not [m for m in ("grpc", "onnxruntime", "PIL", "numpy") if m in sys.modules], "import routet2i is not light"
from routet2i import AsyncEdgeClient, EdgeClient, GenerateResult  # noqa: F401
import routet2i.cli, routet2i.cloud_client, routet2i.config, routet2i.decision_log, routet2i.policy  # noqa: F401

args = json.loads(sys.argv[1])
with EdgeClient(**args) as client:
    out = [client.generate("a red fox in the snow", seed=0).to_dict(),
           client.generate("a red fox in the snow", seed=0, force="cloud").to_dict(),
           client.generate("a red fox in the snow", seed=0, force="edge").to_dict()]
sys.exit(routet2i.cli.main(["a cat", "-o", args["state_file"] + ".png", "--json", "--force", "edge",
                            "--no-progress"]) or print(json.dumps(out)))
"""


def test_whole_client_is_torch_free(edge_bundle, router_bundle, cloud, tmp_path):
    """The device path (router, policy, cloud client, edge pipeline, CLI) with torch & co. unimportable."""
    import os
    import subprocess
    import sys

    server, store = cloud
    token = store.add_device("dev-free", 5, "day")
    args = {"router": str(router_bundle), "edge": str(edge_bundle), "cloud": server.address, "token": token,
            "state_file": str(tmp_path / "state.json"), "decision_log": str(tmp_path / "d.jsonl"),
            "width": SIZE, "height": SIZE, "num_inference_steps": STEPS}  # fmt: skip
    env = {**os.environ, "ROUTET2I_ROUTER": str(router_bundle), "ROUTET2I_EDGE": str(edge_bundle),
           "ROUTET2I_CLOUD": server.address, "ROUTET2I_TOKEN": token, "ROUTET2I_WIDTH": str(SIZE),
           "ROUTET2I_HEIGHT": str(SIZE), "ROUTET2I_NUM_INFERENCE_STEPS": str(STEPS),
           "ROUTET2I_STATE_FILE": "", "ROUTET2I_DECISION_LOG": ""}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    cli_out, results = json.loads(lines[0]), json.loads(lines[1])
    assert [r["route"] for r in results[1:]] == ["cloud", "edge"]
    assert results[0]["reason"] == "router" and 0.0 <= results[0]["prs"] <= 1.0
    assert cli_out["route"] == "edge" and cli_out["reason"] == "forced"
    assert Path(cli_out["output"]).is_file()
