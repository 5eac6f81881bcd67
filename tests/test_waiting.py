"""Waiting people can live with (DESIGN §5): deadlines, queue position and ETA, fair turns.

A running generation holds the only slot by a model stuck mid-step (`ModelHooks.hold`), so
every other request must wait; nothing here depends on timing but the deadlines under test.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware
from chatstream_asgi.waiting import queue_deadline

from .conftest import ModelHooks, Outcomes, open_chat, read_until, wait_until

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def busy_server(make_chat_stream: Any, serve: Any, hooks: ModelHooks) -> Iterator[Any]:
    """A server whose one slot is held by a generation stuck in prefill until the test ends."""
    release = threading.Event()
    sockets: list[Any] = []

    def start(**kwargs: Any) -> tuple[Any, Any, Outcomes]:
        kwargs.setdefault("num_of_concurrent_executions", 1)
        chat_stream = make_chat_stream(**kwargs)
        hooks.hold = release  # after the engine's warm-up, which runs the model too
        hooks.prefill_started.clear()
        outcomes = Outcomes()
        app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, openai=True, callback=outcomes)
        server = serve(app)
        sockets.append(open_chat(server.url, "I hold the slot"))
        assert hooks.prefill_started.wait(30)
        return server, chat_stream, outcomes

    yield start
    release.set()
    for sock in sockets:
        sock.close()


def test_request_waiting_past_max_queue_wait_gets_503_queue_timeout_and_retry_after(busy_server: Any) -> None:
    server, chat_stream, outcomes = busy_server(max_queue_wait=0.2)
    with server.client() as client:
        response = client.post("/chat_stream", json={"user_input": "waiting"})
    assert response.status_code == 503
    assert response.json()["error"] == "queue_timeout"
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["retry_after"] == int(response.headers["Retry-After"])
    assert chat_stream.load()["waiting"] == 0
    assert outcomes.calls == []  # a refusal, like a 429: no callback


def test_clients_deadline_header_ends_its_wait_with_queue_timeout(busy_server: Any) -> None:
    server, chat_stream, _ = busy_server()
    with server.client() as client:
        response = client.post("/chat_stream", json={"user_input": "w"}, headers={"X-ChatStream-Deadline": "0.1"})
        assert response.status_code == 503
        assert response.json()["error"] == "queue_timeout"
        # The session's turn lock went with the refusal: the next turn of the session is not `session_busy`.
        again = client.post("/chat_stream", json={"user_input": "w"}, headers={"X-ChatStream-Deadline": "0"})
        assert again.json()["error"] == "queue_timeout"
    assert chat_stream.load()["waiting"] == 0


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf", ""])
def test_malformed_deadline_header_is_400_naming_it_and_leaves_nothing_behind(busy_server: Any, value: str) -> None:
    server, chat_stream, _ = busy_server()
    with server.client() as client:
        response = client.post("/chat_stream", json={"user_input": "w"}, headers={"X-ChatStream-Deadline": value})
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_request"
        assert "X-ChatStream-Deadline" in response.json()["detail"]
        assert client.post("/chat_stream", json={"user_input": "w"}, headers={"X-ChatStream-Deadline": "0"}).json()[
            "error"
        ] == "queue_timeout"
    assert chat_stream.load() == {"processing": 1, "waiting": 0, "num_of_concurrent_executions": 1, "max_queue_size": 5}


def test_the_smaller_of_the_servers_and_the_clients_deadline_wins() -> None:
    def scope(value: str | None) -> dict[str, Any]:
        headers = [] if value is None else [(b"x-chatstream-deadline", value.encode())]
        return {"type": "http", "headers": headers}

    assert queue_deadline(scope("3"), 10.0) == 3.0
    assert queue_deadline(scope("30"), 10.0) == 10.0
    assert queue_deadline(scope("2.5"), None) == 2.5
    assert queue_deadline(scope(None), 10.0) == 10.0
    assert queue_deadline(scope(None), None) is None


def test_v1_request_past_its_deadline_gets_503_queue_timeout_in_openais_shape(busy_server: Any) -> None:
    server, _, outcomes = busy_server(max_queue_wait=0.1)
    with server.client() as client:
        response = client.post("/v1/chat/completions", json={"messages": HI, "stream": True})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "queue_timeout"
    assert response.json()["error"]["type"] == "server_error"
    assert int(response.headers["Retry-After"]) >= 1
    assert outcomes.calls == []


def test_max_queue_wait_must_be_positive(make_chat_stream: Any) -> None:
    with pytest.raises(ValueError, match="max_queue_wait"):
        make_chat_stream(max_queue_wait=0)


def test_waiter_served_before_its_deadline_streams_normally(busy_server: Any, hooks: ModelHooks) -> None:
    server, chat_stream, outcomes = busy_server(max_queue_wait=60)
    waiter = open_chat(server.url, "patient")
    assert wait_until(lambda: chat_stream.load()["waiting"] == 1)
    assert hooks.hold is not None
    hooks.hold.set()
    assert read_until(waiter, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    read_until(waiter, b"0\r\n\r\n")
    waiter.close()
    assert "success" in outcomes.wait(1)
