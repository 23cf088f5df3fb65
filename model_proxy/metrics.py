"""Prometheus metrics of one proxy server (``GET /metrics``, text exposition format).

Each server owns its own ``CollectorRegistry`` (no process-global state: several
servers in one process, e.g. tests, do not collide). Names:

- ``model_proxy_requests_total{route, status}``: HTTP requests answered.
- ``model_proxy_errors_total{type, code}``: OpenAI-style errors by ``error.type`` / ``error.code``.
- ``model_proxy_prompt_tokens_total`` / ``model_proxy_completion_tokens_total``: tokens
  in / out of sampled turns.
- ``model_proxy_request_latency_seconds{stream}``: chat request arrival -> response ready
  (non-streaming) or last event written (streaming).
- ``model_proxy_queue_seconds`` / ``model_proxy_generate_seconds``: the two parts of a
  sampled turn (see ``profiling.py``).
- ``model_proxy_ttft_seconds``: time to the first content event of a streamed answer.
- ``model_proxy_active_sessions``: sessions open now.
- ``model_proxy_disconnects_total``: chat requests whose client went away before its
  body arrived (not an error of the proxy's, so not in ``errors_total``).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds; covers an instant backend (sub-ms) up to multi-minute generations.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ProxyMetrics:
    """The metric objects of one server.

    Args:
        active_sessions: called at scrape time for the ``active_sessions`` gauge.
    """

    def __init__(self, active_sessions: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("model_proxy_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.errors = Counter("model_proxy_errors", "OpenAI-style errors answered", ["type", "code"], registry=r)
        self.prompt_tokens = Counter("model_proxy_prompt_tokens", "Prompt tokens of sampled turns", registry=r)
        self.completion_tokens = Counter(
            "model_proxy_completion_tokens", "Completion tokens of sampled turns", registry=r
        )
        self.latency = Histogram(
            "model_proxy_request_latency_seconds",
            "Chat request arrival to response finished",
            ["stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "model_proxy_queue_seconds", "Request arrival to backend call", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.generate = Histogram(
            "model_proxy_generate_seconds", "Time inside backend.generate", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "model_proxy_ttft_seconds", "Time to first streamed content event", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.disconnects = Counter(
            "model_proxy_disconnects", "Chat requests abandoned by their client mid-body", registry=r
        )
        active = Gauge("model_proxy_active_sessions", "Open sessions", registry=r)
        active.set_function(lambda: float(active_sessions()))

    def error(self, type_: str, code: str | None) -> None:
        self.errors.labels(type=type_, code=code or "none").inc()

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
