"""Two `routet2i-cloud serve` processes on one store, 8 client threads, 40 requests, quota 15: exactly 15
succeed, 25 are RESOURCE_EXHAUSTED with a QuotaFailure, `device show` says 15 used — SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import threading

import grpc
from _cloud_helpers import CLOUD_CLI, ServeProcess, auth, request, stub_for
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from routet2i.cloud_server import open_store


def test_two_servers_share_one_quota_exactly(store_url):
    with open_store(store_url) as store:
        token = store.add_device("shared-dev", quota=15, period="month")
    # 5 steps x 20 ms: requests overlap, so reservations race across both processes
    servers = [ServeProcess(store_url, "--pipeline", "noop", "--noop-step-delay", "0.02", "--default-steps", "5",
                            "--max-batch", "4") for _ in range(2)]  # fmt: skip
    try:
        outcomes: list[tuple[str, str]] = []
        lock = threading.Lock()
        barrier = threading.Barrier(8)

        def client(t: int) -> None:
            channel, stub = stub_for(servers[t % 2].address)
            barrier.wait()
            for k in range(5):
                try:
                    stub.Generate(request(request_id=f"c{t}-{k}", seed=k), metadata=auth(token), timeout=60)
                    outcome = ("OK", "")
                except grpc.RpcError as e:
                    subject = ""
                    status = rpc_status.from_call(e)
                    if status is not None and status.details:
                        failure = error_details_pb2.QuotaFailure()
                        if status.details[0].Unpack(failure):
                            subject = failure.violations[0].subject
                    outcome = (e.code().name, subject)
                with lock:
                    outcomes.append(outcome)
            channel.close()

        threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(outcomes) == 40
        assert outcomes.count(("OK", "")) == 15, outcomes
        assert outcomes.count(("RESOURCE_EXHAUSTED", "shared-dev")) == 25, outcomes
    finally:
        for s in servers:
            assert s.terminate() == 0
    shown = subprocess.run([*CLOUD_CLI, "device", "show", "--db", store_url, "--device-id", "shared-dev", "--json"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert (info["used"], info["reserved"], info["remaining"], info["limit"]) == (15, 0, 0, 15)
