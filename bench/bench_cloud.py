"""Cloud endpoint benchmarks: batching throughput, per-request overhead, quota store operations/s.

1. Throughput at concurrency 8 (8 client threads, each sending requests back to back) on the tiny
   random-weight SD3, dynamic batching (--max-batch 8) vs --max-batch 1 (the anchor), images/s median of
   --repeats passes, and the ratio. With --full-size the same on an SD3-medium-shaped transformer (24 MMDiT
   blocks, 24 heads x 64, random weights; the tiny text encoders and VAE) — a GPU job: on a CPU of a few
   cores one full-size step takes minutes, so it is off by default.
2. Per-request overhead (auth + quota reserve/commit/snapshot + gRPC + PNG of a 64x64 image) with the no-op
   pipeline: sequential Generate latency p50/p99, against the anchor of a bare gRPC health Check on the same
   server and channel.
3. Quota store operations/s: reserve+commit cycles (each two atomic statements) on SQLite and PostgreSQL,
   1 thread and 8 threads.

    .venv/bin/python bench/bench_cloud.py [--requests 32] [--repeats 3] [--pg-url URL] [--only a,b,c]
                                          [--full-size] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import grpc
from routet2i.cloud.v1 import cloud_pb2, cloud_pb2_grpc
from routet2i.cloud_server import BackgroundServer, NoOpPipeline, ServerConfig, open_store


def _auth(token: str):
    return (("authorization", f"Bearer {token}"),)


def _throughput(
    pipeline, store, token: str, max_batch: int, n_requests: int, steps: int, concurrency: int = 8
) -> float:
    cfg = ServerConfig(default_steps=steps, max_batch=max_batch, batch_window_s=0.02 if max_batch > 1 else 0.0,
                       max_queue=256)  # fmt: skip
    with BackgroundServer(store, pipeline, config=cfg) as srv:
        channel = grpc.insecure_channel(srv.address)
        stub = cloud_pb2_grpc.CloudGenerationStub(channel)
        stub.Generate(cloud_pb2.GenerateRequest(prompt="warm up", seed=0), metadata=_auth(token), timeout=600)
        per_thread = n_requests // concurrency
        barrier = threading.Barrier(concurrency + 1)

        def client(t: int) -> None:
            barrier.wait()
            for k in range(per_thread):
                stub.Generate(cloud_pb2.GenerateRequest(prompt=f"prompt {t} {k}", seed=t * 1000 + k),
                              metadata=_auth(token), timeout=600)  # fmt: skip

        threads = [threading.Thread(target=client, args=(t,)) for t in range(concurrency)]
        for th in threads:
            th.start()
        barrier.wait()
        t0 = time.perf_counter()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - t0
        channel.close()
    return per_thread * concurrency / elapsed


def bench_throughput(args, tmp: Path, pipeline_factory, label: str, steps: int) -> dict:
    store = open_store(f"sqlite:///{tmp / f'tp-{label}.db'}")
    token = store.add_device("bench", quota=10**9, period="total")
    pipe = pipeline_factory()
    out = {}
    for mb in (1, 8):
        rates = [_throughput(pipe, store, token, mb, args.requests, steps) for _ in range(args.repeats)]
        out[f"max_batch_{mb}"] = statistics.median(rates)
        print(f"  {label}: concurrency 8, --max-batch {mb}: {statistics.median(rates):.2f} images/s "
              f"(passes: {', '.join(f'{r:.2f}' for r in rates)})", flush=True)  # fmt: skip
    out["ratio"] = out["max_batch_8"] / out["max_batch_1"]
    print(f"  {label}: batching speed-up (max-batch 8 / max-batch 1): {out['ratio']:.2f}x", flush=True)
    store.close()
    return out


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def bench_overhead(args, tmp: Path) -> dict:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    store = open_store(f"sqlite:///{tmp / 'overhead.db'}")
    token = store.add_device("bench", quota=10**9, period="total")
    cfg = ServerConfig(default_steps=1, max_batch=1, batch_window_s=0.0)
    out = {}
    with BackgroundServer(store, NoOpPipeline(), config=cfg) as srv:
        channel = grpc.insecure_channel(srv.address)
        stub = cloud_pb2_grpc.CloudGenerationStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def timed(fn, n):
            for _ in range(20):
                fn()
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1000)
            return ts

        n = args.overhead_requests
        anchor = timed(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10), n)
        quota = timed(
            lambda: stub.GetQuota(cloud_pb2.GetQuotaRequest(), metadata=_auth(token), timeout=10), n
        )
        gen = timed(lambda: stub.Generate(cloud_pb2.GenerateRequest(prompt="x", width=64, height=64),
                                          metadata=_auth(token), timeout=10), n)  # fmt: skip
        channel.close()
    for name, ts in (("health_check_anchor", anchor), ("get_quota", quota), ("generate_noop", gen)):
        out[name] = {"p50_ms": statistics.median(ts), "p99_ms": _percentile(ts, 0.99)}
        print(
            f"  {name}: p50 {out[name]['p50_ms']:.2f} ms, p99 {out[name]['p99_ms']:.2f} ms ({n} sequential calls)"
        )
    ratio = out["generate_noop"]["p50_ms"] / out["health_check_anchor"]["p50_ms"]
    print(f"  Generate (no-op) p50 / bare gRPC call p50: {ratio:.1f}x; overhead over the bare call: "
          f"{out['generate_noop']['p50_ms'] - out['health_check_anchor']['p50_ms']:.2f} ms", flush=True)  # fmt: skip
    out["ratio_p50"] = ratio
    store.close()
    return out


def _quota_ops(url: str, threads: int, seconds: float) -> float:
    store = open_store(url)
    dev_id = f"q{uuid.uuid4().hex[:8]}"
    store.add_device(dev_id, quota=10**9, period="month")
    dev = store.get_device(dev_id)
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def worker(t: int) -> None:
        k = 0
        while time.perf_counter() < stop:
            store.commit(store.reserve(dev, f"{t}-{k}", seed=k, ttl_s=60))
            k += 1
        counts[t] = k

    ths = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    used = store.quota(dev).used
    store.close()
    assert used == sum(counts), (used, counts)
    return sum(counts) / seconds


def bench_quota(args, tmp: Path) -> dict:
    out = {}
    urls = {"sqlite": f"sqlite:///{tmp / 'ops.db'}"}
    schema = None
    try:
        import psycopg

        admin = psycopg.connect(args.pg_url, autocommit=True, connect_timeout=3)
        schema = f"rt2i_bench_{os.getpid()}"
        admin.execute(f'CREATE SCHEMA "{schema}"')
        sep = "&" if "?" in args.pg_url else "?"
        urls["postgresql"] = f"{args.pg_url}{sep}options={quote(f'-csearch_path={schema}')}"
    except Exception as e:  # noqa: BLE001 - report and go on with SQLite
        print(
            f"  postgresql: skipped ({str(e).splitlines()[0]}); run scripts/ensure_postgres.sh or pass --pg-url"
        )
    try:
        for name, url in urls.items():
            for threads in (1, 8):
                rate = _quota_ops(url, threads, args.quota_seconds)
                out[f"{name}_threads_{threads}"] = rate
                print(f"  {name}, {threads} thread(s): {rate:.0f} reserve+commit cycles/s", flush=True)
    finally:
        if schema is not None:
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            admin.close()
    return out


def _full_size_factory(tiny_sd3: Path, layers: int, px: int):
    def make():
        import torch
        from diffusers import SD3Transformer2DModel
        from routet2i.cloud_server.pipelines import SD3Pipeline

        pipe = SD3Pipeline(str(tiny_sd3))
        small = pipe.pipe.transformer.config
        torch.manual_seed(0)
        big = SD3Transformer2DModel(  # SD3-medium's transformer body; text dims follow the tiny encoders
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
            attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536,
            joint_attention_dim=small.joint_attention_dim, pooled_projection_dim=small.pooled_projection_dim,
            pos_embed_max_size=192,
        ).to(pipe.device, dtype=pipe.pipe.transformer.dtype)  # fmt: skip
        pipe.pipe.transformer = big
        pipe.default_size = px
        pipe.max_size = 1536
        n = sum(p.numel() for p in big.parameters()) / 1e9
        print(
            f"  full-size transformer: {layers} blocks, {n:.2f} B parameters, {px}x{px} px on {pipe.device}"
        )
        return pipe

    return make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32, help="requests per throughput pass (8 threads)")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps per tiny-SD3 request")
    ap.add_argument("--repeats", type=int, default=3, help="throughput passes per mode (median reported)")
    ap.add_argument("--overhead-requests", type=int, default=300)
    ap.add_argument("--quota-seconds", type=float, default=3.0, help="seconds per quota-ops measurement")
    ap.add_argument(
        "--pg-url",
        default=os.environ.get("ROUTET2I_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    ap.add_argument("--only", default="throughput,overhead,quota", help="comma list of parts to run")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--full-size", action="store_true", help="also the SD3-medium-shaped transformer (GPU)")
    ap.add_argument("--full-size-layers", type=int, default=24)
    ap.add_argument("--full-size-px", type=int, default=1024)
    ap.add_argument("--json", type=Path, help="write the numbers here too")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    results: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "throughput" in parts:
            from routet2i.cloud_server.pipelines import SD3Pipeline
            from routet2i.training.tiny_models import build_tiny_models

            tiny = build_tiny_models(tmp / "tiny")["cloud-sd3"]
            print("== throughput, tiny SD3 (random weights)", flush=True)
            results["throughput_tiny_sd3"] = bench_throughput(
                args,
                tmp,
                lambda: SD3Pipeline(str(tiny), torch_threads=args.torch_threads),
                "tiny-sd3",
                args.steps,
            )
            if args.full_size:
                print("== throughput, SD3-medium-shaped transformer (random weights)", flush=True)
                results["throughput_full_size"] = bench_throughput(
                    args, tmp, _full_size_factory(tiny, args.full_size_layers, args.full_size_px), "full-size",
                    args.steps,
                )  # fmt: skip
            else:
                print("  full-size SD3-medium transformer: not run (pass --full-size; needs a GPU: on a few CPU "
                      "cores one 1024 px step takes minutes)")  # fmt: skip
        if "overhead" in parts:
            print("== per-request overhead, no-op pipeline", flush=True)
            results["overhead"] = bench_overhead(args, tmp)
        if "quota" in parts:
            print("== quota store operations", flush=True)
            results["quota_ops_per_s"] = bench_quota(args, tmp)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
