"""Prometheus metrics of the service: requests and errors by route, latency histograms of each request and of
its encode, search and metadata steps (text exposition format, served at ``/metrics``)."""
from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds; spans a cached thumbnail (sub-millisecond) to a large model's first encode.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STEPS = ("encode", "search", "metadata")


class Metrics:
    """One registry per app, so that several services in one process (tests) keep their own counts."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("clipforge_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.errors = Counter("clipforge_http_errors", "HTTP responses with a 4xx or 5xx status, by route",
                              ["route", "status"], registry=self.registry)
        self.latency = Histogram("clipforge_http_request_seconds", "Time to answer an HTTP request, by route",
                                 ["route"], buckets=_BUCKETS, registry=self.registry)
        self.steps = {step: Histogram(f"clipforge_{step}_seconds", f"Time spent in the {step} step",
                                      buckets=_BUCKETS, registry=self.registry) for step in STEPS}

    @contextmanager
    def timed(self, step: str):
        """Time a block into the histogram of ``step`` (one of ``STEPS``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.steps[step].observe(time.perf_counter() - start)

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware counting every HTTP response, including those refused before any route ran."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.record(route, scope["method"], status[0], time.perf_counter() - start)
