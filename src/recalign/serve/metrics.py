"""Prometheus metrics of one server (its own registry, so several apps in one process do not mix):
request counts by endpoint / answering model / status, request latency, micro-batch sizes (rows and
requests per forward pass) and batch latency, and routing decisions."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no `_created` timestamp series next to every counter and histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ENDPOINTS = {"/recommend", "/score", "/health", "/models", "/metrics"}


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("recalign_requests_total", "HTTP requests", ["endpoint", "model", "status"], registry=r)
        self.latency = Histogram("recalign_request_seconds", "request latency", ["endpoint", "model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("recalign_batch_rows", "rows (prompts) per model call", ["model"],
                                    buckets=SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("recalign_batch_requests", "requests merged into one model call", ["model"],
                                        buckets=SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("recalign_batch_seconds", "time of one model call", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.routes = Counter("recalign_route_total", "routing decisions", ["model"], registry=r)

    def request(self, path: str, model: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"  # unknown paths share one label (bounded cardinality)
        self.requests.labels(endpoint, model, str(status)).inc()
        self.latency.labels(endpoint, model).observe(seconds)

    def batch(self, model: str, rows: int, requests: int, seconds: float) -> None:
        self.batch_rows.labels(model).observe(rows)
        self.batch_requests.labels(model).observe(requests)
        self.batch_seconds.labels(model).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
