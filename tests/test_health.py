"""/health and /ready: cheap, never queued, honest about readiness."""

from __future__ import annotations

import threading
from typing import Any

from starlette.applications import Starlette

from chatstream_asgi import ChatStream, ChatStreamMiddleware

from .conftest import ModelHooks, Outcomes, open_chat, read_until, wait_until


def test_health_answers_while_every_slot_is_generating_and_the_queue_is_full(
    make_chat_stream: Any, serve: Any, hooks: ModelHooks
) -> None:
    hooks.step_delay = 0.05
    chat_stream = make_chat_stream(num_of_concurrent_executions=2, max_queue_size=1, max_new_tokens=100)
    outcomes = Outcomes()
    server = serve(
        ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, health=True, callback=outcomes)
    )
    socks = [open_chat(server.url, f"q{i}") for i in range(3)]
    assert wait_until(lambda: chat_stream.load()["processing"] == 2 and chat_stream.load()["waiting"] == 1)
    with server.client() as client:
        for _ in range(20):
            response = client.get("/health")
            assert response.status_code == 200 and response.json() == {"status": "ok"}
        ready = client.get("/ready").json()
    assert ready["load"] == {"processing": 2, "waiting": 1, "num_of_concurrent_executions": 2, "max_queue_size": 1}
    assert outcomes.calls == []  # every generation was still running while health answered
    for sock in socks:
        sock.close()
    assert len(outcomes.wait(3)) == 3


def test_ready_is_503_until_the_engine_has_warmed_up(model: Any, tokenizer: Any, serve: Any, hooks: ModelHooks) -> None:
    hooks.hold = threading.Event()
    chat_stream = ChatStream(model=model, tokenizer=tokenizer, device="cpu", num_of_concurrent_executions=1)
    try:
        server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, health=True))
        with server.client() as client:
            loading = client.get("/ready")
            assert loading.status_code == 503 and loading.json()["status"] == "loading"
            assert client.get("/health").status_code == 200  # alive, just not ready
            hooks.hold.set()
            assert wait_until(lambda: client.get("/ready").status_code == 200)
    finally:
        chat_stream.close()


def test_ready_is_503_shutting_down_once_the_server_drains(make_chat_stream: Any, serve: Any) -> None:
    app = ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(), serve=True, health=True)
    server = serve(app)
    with server.client() as client:
        assert client.get("/ready").json()["status"] == "ready"
        app.begin_shutdown()
        draining = client.get("/ready")
        alive = client.get("/health")
    assert draining.status_code == 503 and draining.json()["status"] == "shutting_down"
    assert alive.status_code == 200  # draining, not dead: nothing should restart it


def test_health_routes_are_off_unless_asked_for(make_chat_stream: Any, serve: Any) -> None:
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(), serve=True))
    with server.client() as client:
        assert client.get("/health").status_code == 404
        assert client.get("/ready").status_code == 404


def test_health_gets_no_session_cookie(make_chat_stream: Any, serve: Any) -> None:
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(), serve=True, health=True))
    with server.client() as client:
        assert "set-cookie" not in client.get("/health").headers


def test_server_stays_responsive_while_a_slow_model_streams(
    make_chat_stream: Any, serve: Any, hooks: ModelHooks
) -> None:
    hooks.step_delay = 0.05
    chat_stream = make_chat_stream(num_of_concurrent_executions=1, max_new_tokens=50)
    outcomes = Outcomes()
    server = serve(
        ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, health=True, callback=outcomes)
    )
    sock = open_chat(server.url, "slow")
    read_until(sock, b"\r\n\r\n")
    with server.client() as client:
        assert client.get("/health").status_code == 200
    assert outcomes.calls == []
    sock.close()
    outcomes.wait()
