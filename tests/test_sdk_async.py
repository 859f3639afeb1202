"""Async that cancels: a cancelled `AsyncEdgeClient.generate` task stops the edge run at the next denoising
step and frees the device; `aclose()` does not block the event loop; `AsyncEdgeClient.quota()`; one
`ProgressEvent` callback for EdgeClient and EdgePipeline; the SDK's error types exported from `routet2i`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image


class SlowEdge:
    """An edge callable with EdgePipeline's signature: ``delay`` seconds per denoising step."""

    def __init__(self, delay: float = 0.05):
        self.delay = delay
        self.steps_run: list[int] = []  # steps done, per call
        self.lock = threading.Lock()

    def __call__(self, prompt, num_inference_steps=25, callback=None, **kwargs):
        with self.lock:
            self.steps_run.append(0)
            k = len(self.steps_run) - 1
        for i in range(num_inference_steps):
            time.sleep(self.delay)
            self.steps_run[k] = i + 1
            if callback is not None:
                callback(i + 1, num_inference_steps, i, None)
        return Image.new("RGB", (8, 8))


def _async_client(edge, **kw):
    from routet2i import AsyncEdgeClient

    return AsyncEdgeClient(edge=edge, state_file="", decision_log="", **kw)


def test_cancelling_the_task_stops_the_edge_run_and_frees_the_device():
    edge = SlowEdge(delay=0.05)

    async def main():
        async with _async_client(edge) as client:
            started = asyncio.Event()
            events = []

            def progress(ev):
                events.append(ev)
                if ev.step >= 2:
                    started.set()

            task = asyncio.create_task(
                client.generate("a fox", force="edge", num_inference_steps=100, progress=progress)
            )
            await asyncio.wait_for(started.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            t0 = time.perf_counter()
            second = await client.generate("a cat", force="edge", num_inference_steps=2)
            return events, second, time.perf_counter() - t0

    events, second, waited = asyncio.run(main())
    assert events[0].route == "edge" and events[0].total_steps == 100
    assert edge.steps_run[0] < 20  # stopped at the next step, not after 100 (5 s)
    assert edge.steps_run[1] == 2 and second.route == "edge"
    assert second.timings["queue"] < 1.0 and waited < 2.0  # the device was free at once


def test_aclose_does_not_block_the_event_loop():
    edge = SlowEdge(delay=0.05)

    async def main():
        client = _async_client(edge)
        task = asyncio.create_task(client.generate("a fox", force="edge", num_inference_steps=20))  # ~1 s
        await asyncio.sleep(0.1)
        gaps = []

        async def ticker():
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        t0 = time.perf_counter()
        await client.aclose()  # waits for the running generation, in a thread
        closed_after = time.perf_counter() - t0
        tick.cancel()
        result = await task
        return gaps, closed_after, result

    gaps, closed_after, result = asyncio.run(main())
    assert closed_after > 0.5  # it did wait for the generation...
    assert len(gaps) >= 10 and max(gaps) < 0.3  # ...while the loop kept running
    assert result.route == "edge"


def test_async_quota_exists():
    from routet2i.policy import QuotaInfo

    async def main():
        async with _async_client(SlowEdge()) as client:
            before = await client.quota()
            q = QuotaInfo(
                limit=10, used=3, remaining=7, period="day", period_end_unix=int(time.time()) + 3600
            )
            client.client.state.set_quota(q)
            return before, await client.quota()

    before, after = asyncio.run(main())
    assert before is None and after.remaining == 7


def test_sync_cancel_event_stops_at_the_next_step():
    from routet2i import EdgeClient, GenerationCancelled

    edge = SlowEdge(delay=0.0)
    cancel = threading.Event()
    seen = []

    def progress(ev):
        seen.append(ev.step)
        if ev.step == 3:
            cancel.set()

    with EdgeClient(edge=edge, state_file="", decision_log="") as client:
        with pytest.raises(GenerationCancelled):
            client.generate("a fox", force="edge", num_inference_steps=50, progress=progress, cancel=cancel)
    assert seen == [1, 2, 3] and edge.steps_run == [3]
    with EdgeClient(edge=edge, state_file="", decision_log="") as client:
        with pytest.raises(ValueError, match="cancel="):
            client.generate("a fox", force="edge", cancel=True)


def test_one_progress_signature_for_client_and_pipeline(tiny_models):
    """EdgePipeline(progress=...) takes the same `ProgressEvent` callback as EdgeClient.generate, and a
    cancel through EdgeClient stops a real ONNX pipeline at the step it was asked."""
    from _device_bundles import edge_bundle_for
    from routet2i import EdgeClient, GenerationCancelled, ProgressEvent
    from routet2i.edge_pipeline import EdgePipeline

    bundle = edge_bundle_for(tiny_models["edge-sd21"])
    pipe = EdgePipeline(bundle)
    events: list[ProgressEvent] = []
    pipe("a fox", num_inference_steps=3, seed=0, width=64, height=64, progress=events.append)
    assert [(e.route, e.step, e.total_steps) for e in events] == [
        ("edge", 1, 3),
        ("edge", 2, 3),
        ("edge", 3, 3),
    ]

    cancel = threading.Event()
    client_events: list[ProgressEvent] = []

    def progress(ev: ProgressEvent) -> None:
        client_events.append(ev)
        if ev.step == 2:
            cancel.set()

    with EdgeClient(edge=pipe, state_file="", decision_log="") as client:
        with pytest.raises(GenerationCancelled):
            client.generate("a fox", force="edge", num_inference_steps=10, width=64, height=64,
                            progress=progress, cancel=cancel)  # fmt: skip
        assert [e.step for e in client_events] == [1, 2]
        assert client._edge_lock.acquire(blocking=False)  # the device is free
        client._edge_lock.release()


def test_error_types_and_progress_event_exported_without_heavy_imports():
    code = (
        "import json, sys, routet2i\n"
        "from routet2i import (UsageError, ProgressEvent, CloudError, CloudUnavailable, CloudRejected,\n"
        "    QuotaExhausted, BundleError, BundleFileMissing, GenerationCancelled)\n"
        "ok = issubclass(CloudUnavailable, CloudError) and issubclass(CloudError, ConnectionError)\n"
        "ok = ok and issubclass(UsageError, ValueError) and issubclass(QuotaExhausted, CloudError)\n"
        "heavy = sorted({'grpc', 'onnxruntime', 'PIL', 'numpy'} & set(sys.modules))\n"
        "print(json.dumps({'ok': ok, 'heavy': heavy, 'all': routet2i.__all__}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] and out["heavy"] == []
    assert {"UsageError", "ProgressEvent", "CloudError", "GenerationCancelled"} <= set(out["all"])

    import routet2i
    import routet2i.cloud_client as cc

    assert routet2i.CloudError is cc.CloudError and routet2i.QuotaExhausted is cc.QuotaExhausted
