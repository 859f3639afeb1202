"""Dynamic batching in front of one pipeline: a bounded queue, compatible requests grouped per call.

The worker takes the oldest waiting request, then gathers up to `max_batch` waiting requests with the same
batch key (size, steps, guidance), waiting at most `window_s` for more to arrive. The pipeline runs in one
dedicated thread, so the event loop keeps answering RPCs. A full queue refuses at once (`Overloaded`).
Requests that were cancelled or whose deadline passed before their batch started are dropped without
being generated. Progress is reported per step; if every request of a running batch is gone, the pipeline
is asked to stop early.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from routet2i.cloud_server.errors import DeadlineExceeded, GenerationFailed, NotReady, Overloaded
from routet2i.cloud_server.metrics import Metrics
from routet2i.cloud_server.pipelines import GenParams, Pipeline

logger = logging.getLogger(__name__)


@dataclass
class Job:
    params: GenParams  # what to generate
    deadline: float | None  # time.monotonic() after which it must not start; None: no deadline
    future: asyncio.Future  # resolves to (image, queue_seconds, generate_seconds)
    on_progress: Callable[[int, int], None] | None = None  # called in the event loop per step
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the request's handler when it goes away

    def alive(self) -> bool:
        return not (self.cancelled or self.future.done())


class Batcher:
    def __init__(
        self, pipeline: Pipeline, max_batch: int, max_queue: int, window_s: float, metrics: Metrics
    ) -> None:
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError(
                f"max_batch={max_batch}, max_queue={max_queue} must be >= 1, window_s={window_s} >= 0"
            )
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.window_s = window_s
        self.metrics = metrics
        self._pending: deque[Job] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rt2i-pipeline")
        self._task: asyncio.Task | None = None
        self._closing = False
        self._abort = False
        self.running: list[Job] = []

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="rt2i-batcher")

    @property
    def depth(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        if self._closing:
            raise NotReady("the server is shutting down")
        self._drop_dead()
        if len(self._pending) >= self.max_queue:
            self.metrics.shed.inc()
            raise Overloaded(f"the generation queue is full ({self.max_queue} waiting); retry later")
        self._pending.append(job)
        self.metrics.queue_depth.set(len(self._pending))
        self._wakeup.set()

    def _drop_dead(self) -> None:
        now = time.monotonic()
        keep: deque[Job] = deque()
        for job in self._pending:
            if not job.alive():
                continue
            if job.deadline is not None and now >= job.deadline:
                job.future.set_exception(DeadlineExceeded("the deadline passed before generation started"))
                continue
            keep.append(job)
        self._pending = keep
        self.metrics.queue_depth.set(len(keep))

    async def _collect(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        self._drop_dead()
        if not self._pending:
            return []
        key = self._pending[0].params.batch_key()
        until = loop.time() + self.window_s
        while True:
            batch = [j for j in self._pending if j.params.batch_key() == key][: self.max_batch]
            remaining = until - loop.time()
            if len(batch) >= self.max_batch or remaining <= 0 or self._closing:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                pass
            self._drop_dead()
            if not self._pending:
                return []
        taken = {id(j) for j in batch}
        self._pending = deque(j for j in self._pending if id(j) not in taken)
        self.metrics.queue_depth.set(len(self._pending))
        batch = [j for j in batch if j.alive()]
        return batch

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            try:
                batch = await self._collect()
                if batch:
                    await self._execute(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the worker die: that would hang every later request
                logger.exception("batcher loop error")
                await asyncio.sleep(0.01)

    async def _execute(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        self.running = batch

        def progress(step: int, total: int) -> None:
            for job in batch:
                if job.on_progress is not None and job.alive():
                    job.on_progress(step, total)

        def on_step(step: int, total: int) -> bool:  # runs in the pipeline thread
            loop.call_soon_threadsafe(progress, step, total)
            return self._abort or all(j.cancelled for j in batch)

        started = time.monotonic()
        self.metrics.batch_size.observe(len(batch))
        try:
            images = await loop.run_in_executor(
                self._executor, self.pipeline.generate, [j.params for j in batch], on_step
            )
            if len(images) != len(batch):
                raise RuntimeError(f"pipeline returned {len(images)} images for {len(batch)} requests")
        except Exception:
            logger.exception("pipeline call failed batch=%d", len(batch))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(GenerationFailed("image generation failed"))
            return
        finally:
            self.running = []
        gen_s = time.monotonic() - started
        self.metrics.generation_seconds.observe(gen_s)
        for job, image in zip(batch, images, strict=True):
            if not job.future.done():
                if self._abort:
                    job.future.set_exception(NotReady("the server shut down before the image was ready"))
                else:
                    job.future.set_result((image, started - job.enqueued, gen_s))

    def begin_shutdown(self) -> None:
        """Refuse new work; queued and running requests continue (the grace period)."""
        self._closing = True
        self._wakeup.set()

    async def close(self) -> None:
        """Stop now: queued requests fail, a running batch is asked to stop at its next step."""
        self._closing = True
        self._abort = True
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(NotReady("the server shut down before the image was ready"))
        self._pending.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)


def encode_png(image: Any) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
