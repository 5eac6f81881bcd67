"""Without ChatStreamMiddleware the handler watches the client itself, in every window, and
classifies outcomes exactly as the middleware does (real uvicorn, raw sockets)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastsession import FastSessionMiddleware, MemoryStore

from ..conftest import ModelHooks, Outcomes, open_chat, read_first_text, read_until, wait_until


@pytest.fixture
def start_app(make_chat_stream: Any, serve: Any) -> Any:
    def start(setup: str, **kwargs: Any) -> tuple[Any, Any, Outcomes]:
        chat_stream = make_chat_stream(**kwargs)
        outcomes = Outcomes()
        app = FastAPI()
        if setup == "fastsession":
            app.add_middleware(FastSessionMiddleware, secret_key="k", store=MemoryStore(), secure=False)

        @app.post("/chat_stream")
        async def stream_api(request: Request) -> Any:
            return await chat_stream.handle_chat_stream_request(request, callback=outcomes)

        return serve(app), chat_stream, outcomes

    return start


@pytest.mark.parametrize("setup", ["no_middleware", "fastsession"])
def test_client_leaving_mid_stream_without_our_middleware_stops_generation(
    start_app: Any, hooks: ModelHooks, setup: str
) -> None:
    hooks.step_delay = 0.02
    server, chat_stream, outcomes = start_app(setup, max_new_tokens=200)
    sock = open_chat(server.url, "tell me a long story")
    read_first_text(sock)
    sock.close()
    assert outcomes.wait() == ["client_disconnected_while_streaming"]
    stats = outcomes.calls[0][0].state.chat_generation
    assert stats.finish_reason == "cancelled" and stats.steps_after_cancel <= 1
    assert wait_until(lambda: chat_stream.load()["processing"] == 0)


@pytest.mark.parametrize("setup", ["no_middleware", "fastsession"])
def test_client_leaving_the_queue_without_our_middleware_never_starts(
    start_app: Any, hooks: ModelHooks, setup: str
) -> None:
    hooks.step_delay = 0.02
    server, chat_stream, outcomes = start_app(setup, num_of_concurrent_executions=1, max_new_tokens=60)
    running = open_chat(server.url, "first")
    read_first_text(running)
    leaving = open_chat(server.url, "second")
    assert wait_until(lambda: chat_stream.load()["waiting"] == 1)
    leaving.close()
    assert outcomes.wait(1) == ["client_disconnected_before_streaming"]
    assert chat_stream.load()["waiting"] == 0
    read_until(running, b"0\r\n\r\n")
    running.close()
    assert outcomes.wait(2) == ["client_disconnected_before_streaming", "success"]
    assert hooks.prefills == 1  # the request that left never reached the model


def test_client_leaving_during_prefill_without_our_middleware_is_classified_before_streaming(
    start_app: Any, hooks: ModelHooks
) -> None:
    hooks.prefill_delay = 1.0
    server, _, outcomes = start_app("fastsession", max_new_tokens=50)
    sock = open_chat(server.url, "hello")
    assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    assert hooks.prefill_started.wait(30)
    sock.close()
    assert outcomes.wait() == ["client_disconnected_before_streaming"]
    assert outcomes.calls[0][0].state.chat_generation.steps_after_cancel == 1
    prompt = outcomes.calls[0][0].state.session.get_session()["chat_prompt"]
    assert prompt.is_empty()  # a reply the client never saw is not history, as behind the middleware


def test_second_turn_of_an_attached_session_while_one_runs_gets_409(start_app: Any, hooks: ModelHooks) -> None:
    hooks.step_delay = 0.2  # (a step may write several drafted tokens: the first turn must still run)
    server, _, outcomes = start_app("fastsession", max_new_tokens=100)
    with server.client() as client:
        with client.stream("POST", "/chat_stream", json={"user_input": "long"}) as first:
            next(first.iter_bytes())
            second = client.post("/chat_stream", json={"user_input": "again"})
            assert second.status_code == 409 and second.json()["error"] == "session_busy"
    assert outcomes.wait() == ["client_disconnected_while_streaming"]


def test_waiting_sse_client_without_our_middleware_sees_its_position_and_is_watched(
    start_app: Any, hooks: ModelHooks
) -> None:
    hooks.step_delay = 0.02
    server, chat_stream, outcomes = start_app("no_middleware", num_of_concurrent_executions=1, max_new_tokens=60)
    running = open_chat(server.url, "first")
    read_first_text(running)
    waiter = socket.create_connection(running.getpeername(), timeout=30)
    body = b'{"user_input": "second"}'
    waiter.sendall(
        b"POST /chat_stream?format=sse HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    head = read_until(waiter, b'event: queue\r\ndata: {"position": 1')
    assert head.startswith(b"HTTP/1.1 200")
    assert b"set-cookie: chatstream_session=" in head.lower()
    waiter.close()
    assert outcomes.wait(1) == ["client_disconnected_before_streaming"]
    assert chat_stream.load()["waiting"] == 0
    running.close()
