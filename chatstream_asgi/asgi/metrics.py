"""Prometheus metrics of one middleware (`metrics=True`, `GET /metrics`).

Every `ChatMetrics` owns its `CollectorRegistry`, so two apps in one process never clash over a
name, and nothing lands in prometheus-client's global registry. This module is imported only
when metrics are switched on: a process that never asks for them never imports
prometheus-client. The running and waiting gauges read the admission limiter when scraped, so
they can never disagree with it; so do the capacity gauges beside them, so that "waiting ÷ queue"
is one PromQL division. Histogram buckets run from 5 ms (a refusal, a first token on a
GPU) to 10 minutes (a long generation on a CPU behind a long queue).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from chatstream_asgi.outcomes import OUTCOMES
from chatstream_asgi.runtime.admission import Load

#: Seconds; LLM latencies span milliseconds (a refusal, a first token) to minutes (a long reply).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Seconds; a session store answers in well under a millisecond to a few (its timeout is 2 s).
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
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
        # The capacity the two above are measured against, so a dashboard can divide by it.
        slots = Gauge("chatstream_slots", "Generation slots (generations at once)", registry=registry)
        slots.set_function(lambda: load().num_of_concurrent_executions)
        queue_size = Gauge("chatstream_queue_size", "Requests that may wait for a slot", registry=registry)
        queue_size.set_function(lambda: load().max_queue_size)
        self.draining = Gauge(
            "chatstream_draining", "1 while the server is stopping: it takes no new chats", registry=registry
        )
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
        self.conversation_cache_hits = Counter(
            "chatstream_conversation_cache_hits_total",
            "Generations that started from a cached earlier turn of their conversation",
            registry=registry,
        )
        self.cached_prompt_tokens = Counter(
            "chatstream_cached_prompt_tokens_total",
            "Prompt tokens whose keys and values came from the conversation cache (not prefilled)",
            registry=registry,
        )
        self.store_latency = Histogram(
            "chatstream_session_store_seconds",
            "Time each call to the session store took, answered or not",
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "chatstream_session_store_errors_total",
            "Calls to the session store that failed or timed out (each a 503 session_store_unavailable)",
            registry=registry,
        )
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

    def finished(
        self, outcome: str, duration: float, prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int = 0
    ) -> None:
        """Count one outcome and what its generation used."""
        self.requests.labels(outcome).inc()
        self.request_duration.observe(duration)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if cached_prompt_tokens:
            self.conversation_cache_hits.inc()
            self.cached_prompt_tokens.inc(cached_prompt_tokens)

    def store_call(self, seconds: float, failed: bool) -> None:
        """Time one call to the session store (see `SessionStore.observer`)."""
        self.store_latency.observe(seconds)
        if failed:
            self.store_errors.inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
