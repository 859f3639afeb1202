"""What the SDK adds around a generation, and what a dead cloud costs with and without the circuit breaker.

1. Overhead: `EdgeClient.generate(force="edge")` (router + policy + state file + decision log + edge) vs the
   bare `EdgePipeline` call with the same arguments and vs the router decision alone, interleaved, on the
   tiny demo bundles (medians, ratio). The tiny pipeline is fast, so the relative overhead is an upper bound;
   the router's share of a full-size generation is in bench_router_latency.py.
2. A hung cloud (a gRPC server that accepts calls and never answers): N requests routed to the cloud with
   the circuit breaker (default: opens after one failed call) vs without (``breaker_failures`` = N + 1).
   Prints the seconds spent waiting on the cloud (``timings["network"]``) per request and in total, and the
   ratio. Both clients fall back to the edge; only the waiting differs.

    .venv/bin/python bench/bench_sdk.py [--n 30] [--hung 5] [--deadline 1.0]

Uses the demo bundles (`routet2i.training.demo.build_demo`, built once and cached; needs the full install).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path


def _hung_server():
    """A CloudGeneration server whose Generate never answers (until the client's deadline)."""
    import grpc
    from routet2i.cloud.v1 import cloud_pb2_grpc

    release = threading.Event()

    class Hung(cloud_pb2_grpc.CloudGenerationServicer):
        def Generate(self, request, context):  # noqa: N802
            release.wait(60)
            context.abort(grpc.StatusCode.UNAVAILABLE, "released")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    cloud_pb2_grpc.add_CloudGenerationServicer_to_server(Hung(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}", release


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=30, help="generations per side for the overhead part")
    p.add_argument("--hung", type=int, default=5, help="requests sent to the hung cloud per client")
    p.add_argument("--deadline", type=float, default=1.0, help="cloud deadline (s) of each request")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()

    from routet2i import EdgeClient
    from routet2i.edge_pipeline import EdgePipeline
    from routet2i.training.demo import build_demo

    built = build_demo()
    work = Path(tempfile.mkdtemp(prefix="bench-sdk-"))
    kw = dict(seed=0, num_inference_steps=args.steps)

    # 1. overhead
    client = EdgeClient(router=built["router"], edge=built["edge"], state_file=str(work / "s.json"),
                        decision_log=str(work / "d.jsonl"))  # fmt: skip
    bare = EdgePipeline(built["edge"])
    for _ in range(3):  # warm both
        client.generate("warm up", force="edge", **kw)
        bare("warm up", **kw)
    sdk_t, bare_t, router_t = [], [], []
    for i in range(args.n):
        prompt = f"a red fox in the snow, number {i}"
        order = [(0, 1, 2), (1, 2, 0), (2, 0, 1)][i % 3]  # rotate so each sees the same load
        for which in order:
            t0 = time.perf_counter()
            if which == 0:
                client.generate(prompt, force="edge", **kw)
                sdk_t.append(time.perf_counter() - t0)
            elif which == 1:
                bare(prompt, **kw)
                bare_t.append(time.perf_counter() - t0)
            else:
                client.router.predict_one(prompt)
                router_t.append(time.perf_counter() - t0)
    m_sdk, m_bare, m_router = (statistics.median(x) for x in (sdk_t, bare_t, router_t))
    print(f"edge generation ({args.steps} steps, tiny demo bundle), median of {args.n}, interleaved:")
    print(f"  EdgeClient.generate(force='edge'): {m_sdk * 1000:8.2f} ms")
    print(f"  bare EdgePipeline call:            {m_bare * 1000:8.2f} ms")
    print(f"  router decision alone (predict_one): {m_router * 1000:6.2f} ms")
    print(
        f"  ratio SDK / bare: {m_sdk / m_bare:.3f}x; overhead {1000 * (m_sdk - m_bare):+.2f} ms, of which the "
        f"router {1000 * m_router:.2f} ms, bookkeeping (policy, state file, log) {1000 * (m_sdk - m_bare - m_router):+.2f} ms"
    )

    # 2. hung cloud
    server, address, release = _hung_server()
    try:
        totals = {}
        for label, failures in (("with breaker", 1), ("without breaker", args.hung + 1)):
            c = EdgeClient(router=built["router"], edge=built["edge"], cloud=address, token="bench",
                           deadline_s=args.deadline, retries=0, breaker_failures=failures, breaker_reset_s=600,
                           state_file="", decision_log="")  # fmt: skip
            waits = []
            for i in range(args.hung):
                r = c.generate(f"a lighthouse {i}", force="cloud", **kw)
                assert r.route == "edge" and r.reason == "cloud_unavailable", (r.route, r.reason)
                waits.append(r.timings["network"])
            c.close()
            totals[label] = sum(waits)
            print(f"hung cloud, deadline {args.deadline:.1f} s, {label}: per request "
                  + " ".join(f"{w:.2f}" for w in waits) + f" s; total {sum(waits):.2f} s")  # fmt: skip
        ratio = totals["without breaker"] / max(totals["with breaker"], 1e-9)
        print(f"  time lost to the dead cloud, without / with breaker: {ratio:.1f}x")
    finally:
        release.set()
        server.stop(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
