"""A turn is saved and its conversation free before the reply's last byte leaves: whatever a
client sends the instant a reply ends (on the same keep-alive connection, as a browser does)
sees the finished turn and never gets 409, behind the middleware (memory and Redis) and
without it (fastsession), in every stream format that has an end of its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastsession import FastSessionMiddleware
from fastsession import MemoryStore as FastSessionStore
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware, MemoryStore, RedisStore

from .conftest import HANG_GUARD, LiveServer

TURNS = 50


@pytest.fixture(params=["middleware-memory", "middleware-redis", "fastsession"])
def chat_server(request: pytest.FixtureRequest, make_chat_stream: Any, serve: Any, redis_url: str) -> LiveServer:
    chat_stream = make_chat_stream(max_new_tokens=3)
    if request.param == "fastsession":
        app = FastAPI()
        app.add_middleware(FastSessionMiddleware, secret_key="k", store=FastSessionStore(), secure=False)
        chat_stream.append_apis(app, {"include": ["chat_stream", "get_history", "clear_context"]})
        server: LiveServer = serve(app)
        return server
    store: Any = MemoryStore() if request.param == "middleware-memory" else RedisStore(redis_url, prefix="turnend:")
    app = ChatStreamMiddleware(
        Starlette(), chat_stream=chat_stream, serve=True, session_store=store, secret_key="k", apis={"all": True}
    )
    server = serve(app)
    return server


def _turn(client: httpx.Client, text: str, query: str = "") -> str:
    """One chat turn, read to its very end; the reply text (delta) or the raw SSE."""
    with client.stream("POST", f"/chat_stream{query}", json={"user_input": text}) as response:
        assert response.status_code == 200, response.read()
        return "".join(response.iter_text())


def _history_inputs(client: httpx.Client) -> list[str]:
    response = client.get("/get_history")
    assert response.status_code == 200, response.text
    messages = response.json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)  # every reply saved
    return [m["content"] for m in messages if m["role"] == "user"]


@pytest.mark.parametrize("query", ["", "?format=sse", "?format=chatstream"])
def test_what_a_client_sends_the_instant_a_reply_ends_sees_the_finished_turn(
    chat_server: LiveServer, query: str
) -> None:
    follow_ups: list[Callable[[httpx.Client, list[str]], None]] = []

    def read_history(client: httpx.Client, sent: list[str]) -> None:
        assert _history_inputs(client) == sent

    def clear(client: httpx.Client, sent: list[str]) -> None:
        response = client.post("/clear_context")
        assert response.status_code == 200, response.text
        sent.clear()

    def next_turn(client: httpx.Client, sent: list[str]) -> None:
        text = f"at once after {len(sent)}"
        _turn(client, text, query)
        sent.append(text)

    follow_ups += [read_history, clear, next_turn]
    with httpx.Client(base_url=chat_server.url, timeout=HANG_GUARD) as client:
        sent: list[str] = []
        for index in range(TURNS):
            text = f"turn {index}"
            _turn(client, text, query)
            sent.append(text)
            follow_ups[index % len(follow_ups)](client, sent)
        assert _history_inputs(client) == sent
