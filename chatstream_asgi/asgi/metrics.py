"""Prometheus metrics of one middleware (`metrics=True`, `GET /metrics`).

Every `ChatMetrics` owns its `CollectorRegistry`, so two apps in one process never clash over a
name, and nothing lands in prometheus-client's global registry. This module is imported only
when metrics are switched on: a process that never asks for them never imports
prometheus-client. The running and waiting gauges read the admission limiter when scraped, so
they can never disagree with it. Histogram buckets run from 5 ms (a refusal, a first token on a
GPU) to 10 minutes (a long generation on a CPU behind a long queue).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from chatstream_asgi.outcomes import OUTCOMES
from chatstream_asgi.runtime.admission import Load

#: Seconds; LLM latencies span milliseconds (a refusal, a first token) to minutes (a long reply).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ChatMetrics:
    """The instruments of DESIGN §7 on a registry of their own."""

    def __init__(self, load: Callable[[], Load]) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        running = Gauge("chatstream_requests_running", "Generations holding a slot now", registry=registry)
        running.set_function(lambda: load().processing)
        waiting = Gauge("chatstream_requests_waiting", "Requests waiting in the admission queue", registry=registry)
        waiting.set_function(lambda: load().waiting)
        self.requests = Counter(
            "chatstream_requests_total", "Admitted requests, by outcome", ["outcome"], registry=registry
        )
        for outcome in OUTCOMES:  # every outcome is on the dashboard from the start, at 0
            self.requests.labels(outcome)
        self._rejected = Counter(
            "chatstream_requests_rejected_total", "Refused requests, by error code", ["code"], registry=registry
        )
        self.prompt_tokens = Counter(
            "chatstream_prompt_tokens_total", "Prompt tokens of admitted requests", registry=registry
        )
        self.generation_tokens = Counter("chatstream_generation_tokens_total", "Tokens generated", registry=registry)
        self.time_to_first_token = Histogram(
            "chatstream_time_to_first_token_seconds",
            "From the request's arrival to its first generated text",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "chatstream_queue_wait_seconds",
            "Time waited for a generation slot",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            "chatstream_request_duration_seconds",
            "From the request's arrival to its outcome",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def rejected(self, code: str) -> None:
        """Count one refusal under its error code."""
        self._rejected.labels(code).inc()

    def finished(self, outcome: str, duration: float, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one outcome and what its generation used."""
        self.requests.labels(outcome).inc()
        self.request_duration.observe(duration)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
