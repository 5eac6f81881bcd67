"""`/metrics`: Prometheus text from a registry of the middleware's own, scraped from a real server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware, RedisStore

from .conftest import ModelHooks, Outcomes, RedisServer, open_chat, read_until, wait_until


def _scrape(client: Any, **kwargs: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _app(chat_stream: Any, **kwargs: Any) -> ChatStreamMiddleware:
    return ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, metrics=True, **kwargs)


def test_chats_on_both_routes_count_outcomes_tokens_and_latencies(make_chat_stream: Any, serve: Any) -> None:
    server = serve(_app(make_chat_stream(), openai=True))
    with server.client() as client:
        chat = client.post("/chat_stream?format=sse", json={"user_input": "Hello", "max_new_tokens": 7})
        usage = json.loads(chat.text.split("event: done")[1].split("data: ", 1)[1].split("\r\n")[0])["usage"]
        hi = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
        v1 = client.post("/v1/chat/completions", json=hi)
        samples = _scrape(client)
    assert _metric(samples, "chatstream_requests_total", outcome="success") == 2
    assert _metric(samples, "chatstream_requests_total", outcome="unknown_error_occurred") == 0
    prompt_tokens = usage["prompt_tokens"] + v1.json()["usage"]["prompt_tokens"]
    assert _metric(samples, "chatstream_prompt_tokens_total") == prompt_tokens
    assert _metric(samples, "chatstream_generation_tokens_total") == 7 + 5
    for histogram in ("time_to_first_token", "queue_wait", "request_duration"):
        assert _metric(samples, f"chatstream_{histogram}_seconds_count") == 2
        assert _metric(samples, f"chatstream_{histogram}_seconds_bucket", le="600.0") == 2
        assert _metric(samples, f"chatstream_{histogram}_seconds_bucket", le="0.005") <= 2


def test_refusals_are_counted_by_their_error_code(make_chat_stream: Any, serve: Any, hooks: ModelHooks) -> None:
    chat_stream = make_chat_stream(num_of_concurrent_executions=1, max_queue_size=0)
    outcomes = Outcomes()
    server = serve(_app(chat_stream, openai=True, callback=outcomes))
    with server.client() as client:
        assert client.post("/chat_stream", content=b"{not json").status_code == 400
        assert client.post("/chat_stream", json={"user_input": "x", "temperature": 9}).status_code == 422
        assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        hooks.hold = threading.Event()
        sock = open_chat(server.url, "holds the only slot")
        assert wait_until(lambda: chat_stream.load()["processing"] == 1)
        assert client.post("/chat_stream", json={"user_input": "no room"}).status_code == 429
        samples = _scrape(client)
        hooks.hold.set()
        sock.close()
        outcomes.wait()
    assert _metric(samples, "chatstream_requests_rejected_total", code="invalid_json") == 1
    assert _metric(samples, "chatstream_requests_rejected_total", code="invalid_parameter") == 1
    assert _metric(samples, "chatstream_requests_rejected_total", code="invalid_request") == 1
    assert _metric(samples, "chatstream_requests_rejected_total", code="too_many_requests") == 1
    assert sum(v for (name, _), v in samples.items() if name == "chatstream_requests_total") == 0  # none ended yet


def test_gauges_show_what_runs_and_what_waits(make_chat_stream: Any, serve: Any, hooks: ModelHooks) -> None:
    chat_stream = make_chat_stream(num_of_concurrent_executions=1, max_queue_size=2)
    outcomes = Outcomes()
    server = serve(_app(chat_stream, callback=outcomes))
    with server.client() as client:
        idle = _scrape(client)
        hooks.hold = threading.Event()
        socks = [open_chat(server.url, f"q{i}") for i in range(3)]
        assert wait_until(lambda: (chat_stream.load()["processing"], chat_stream.load()["waiting"]) == (1, 2))
        busy = _scrape(client)
        hooks.hold.set()
        for sock in socks:
            read_until(sock, b"\r\n\r\n")
            sock.close()
        outcomes.wait(3)
    assert _metric(idle, "chatstream_requests_running") == 0 and _metric(idle, "chatstream_requests_waiting") == 0
    assert _metric(busy, "chatstream_requests_running") == 1 and _metric(busy, "chatstream_requests_waiting") == 2


def test_a_client_that_leaves_is_counted_under_its_outcome(make_chat_stream: Any, serve: Any) -> None:
    outcomes = Outcomes()
    server = serve(_app(make_chat_stream(max_new_tokens=200), callback=outcomes))
    sock = open_chat(server.url, "leave early")
    read_until(sock, b"\r\n\r\n")
    sock.close()
    [outcome] = outcomes.wait()
    with server.client() as client:
        samples = _scrape(client)
    assert outcome.startswith("client_disconnected")
    assert _metric(samples, "chatstream_requests_total", outcome=outcome) == 1
    assert _metric(samples, "chatstream_requests_total", outcome="success") == 0


def test_two_apps_in_one_process_keep_separate_counts(make_chat_stream: Any, serve: Any) -> None:
    chat_stream = make_chat_stream()
    first, second = serve(_app(chat_stream)), serve(_app(chat_stream))
    with first.client() as client:
        assert client.post("/chat_stream", json={"user_input": "one", "max_new_tokens": 2}).status_code == 200
        first_samples = _scrape(client)
    with second.client() as client:
        second_samples = _scrape(client)
    assert _metric(first_samples, "chatstream_requests_total", outcome="success") == 1
    assert _metric(second_samples, "chatstream_requests_total", outcome="success") == 0


def test_metrics_route_is_not_served_unless_switched_on(make_chat_stream: Any, serve: Any) -> None:
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(), serve=True))
    with server.client() as client:
        assert client.get("/metrics").status_code == 404


def test_a_process_without_metrics_never_imports_prometheus_client(model_dir: Any) -> None:
    probe = (
        "import sys; from starlette.applications import Starlette; "
        "from chatstream_asgi import ChatStream, ChatStreamMiddleware; "
        "from chatstream_asgi.engine import MockEngine; "
        "ChatStreamMiddleware(Starlette(), chat_stream=ChatStream(engine=MockEngine()), serve=True, openai=True); "
        "print('prometheus_client' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False"], result.stderr


def test_capacity_gauges_export_the_slots_and_the_queue_they_fill(make_chat_stream: Any, serve: Any) -> None:
    server = serve(_app(make_chat_stream(num_of_concurrent_executions=3, max_queue_size=7)))
    with server.client() as client:
        samples = _scrape(client)
    assert _metric(samples, "chatstream_slots") == 3
    assert _metric(samples, "chatstream_queue_size") == 7
    assert _metric(samples, "chatstream_draining") == 0


def test_a_turn_that_starts_from_its_cached_conversation_counts_as_a_cache_hit(
    make_chat_stream: Any, serve: Any
) -> None:
    server = serve(_app(make_chat_stream(max_new_tokens=4)))
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "first"})
        first = _scrape(client)
        client.post("/chat_stream", json={"user_input": "second"})  # the same conversation: its cache
        second = _scrape(client)
    assert _metric(first, "chatstream_conversation_cache_hits_total") == 0
    assert _metric(second, "chatstream_conversation_cache_hits_total") == 1
    assert _metric(second, "chatstream_cached_prompt_tokens_total") > 0


def test_session_store_calls_are_timed_and_failures_counted(
    make_chat_stream: Any, serve: Any, redis_prefix: str, own_redis: RedisServer
) -> None:
    store = RedisStore(own_redis.url, prefix=redis_prefix, timeout=0.5)
    server = serve(_app(make_chat_stream(max_new_tokens=2), session_store=store, secret_key="k"))
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "stored"})
        up = _scrape(client)
        own_redis.stop()
        client.post("/chat_stream", json={"user_input": "while Redis is down"})
        down = _scrape(client)
    assert _metric(up, "chatstream_session_store_seconds_count") >= 3  # load, lock, save, unlock
    assert _metric(up, "chatstream_session_store_errors_total") == 0
    assert _metric(down, "chatstream_session_store_errors_total") >= 1
