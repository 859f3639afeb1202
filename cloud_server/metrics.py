"""Prometheus metrics of one server, in their own registry (several servers can live in one process)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "routet2i_cloud_requests",
            "RPCs answered, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "routet2i_cloud_queue_depth", "requests waiting for a pipeline (every model)", registry=r
        )
        self.batch_size = Histogram(
            "routet2i_cloud_batch_size", "requests per pipeline call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )  # fmt: skip
        self.generation_seconds = Histogram(
            "routet2i_cloud_generation_seconds", "wall seconds of one pipeline call", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80),
        )  # fmt: skip
        self.request_seconds = Histogram(
            "routet2i_cloud_request_seconds", "wall seconds of one Generate/GenerateStream", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80),
        )  # fmt: skip
        self.quota_denials = Counter(
            "routet2i_cloud_quota_denials", "requests refused for lack of quota", registry=r
        )
        self.shed = Counter("routet2i_cloud_shed", "requests refused because the queue was full", registry=r)
        self.ready = Gauge("routet2i_cloud_ready", "1 once the pipeline is loaded and serving", registry=r)

    def serve_http(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose /metrics on `port` (a daemon thread)."""
        start_http_server(port, addr=addr, registry=self.registry)
        logger.info("metrics on http://%s:%d/metrics", addr, port)
