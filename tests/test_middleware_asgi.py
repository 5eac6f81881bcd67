"""The middleware as an ASGI state machine, on every anyio backend: scripted `receive`,
recording `send`, an `anyio.Event` for the client leaving."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from starlette.types import Message

from chatstream_asgi import ChatStreamMiddleware

from .conftest import ModelHooks, Outcomes

pytestmark = pytest.mark.anyio


class ScriptedClient:
    """Sends one body, then reports `http.disconnect` when `leave` is set."""

    def __init__(self, body: bytes) -> None:
        self._messages = [{"type": "http.request", "body": body, "more_body": False}]
        self.leave = anyio.Event()
        self.sent: list[Message] = []
        self.first_text = anyio.Event()

    async def receive(self) -> Message:
        if self._messages:
            return self._messages.pop(0)
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            self.first_text.set()

    @property
    def status(self) -> int:
        status: int = self.sent[0]["status"]
        return status

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def _scope(path: str = "/chat_stream", method: str = "POST") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }


async def _never_called(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("serve mode must not reach the app")


async def test_chat_streams_to_the_end_on_this_backend(make_chat_stream: Any, anyio_backend: str) -> None:
    outcomes = Outcomes()
    app = ChatStreamMiddleware(_never_called, chat_stream=make_chat_stream(), serve=True, callback=outcomes)
    client = ScriptedClient(json.dumps({"user_input": "hi", "max_new_tokens": 6}).encode())
    with anyio.fail_after(30):
        await app(_scope(), client.receive, client.send)
    assert client.status == 200 and client.body
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert outcomes.outcomes == ["success"]


async def test_client_leaving_mid_stream_on_this_backend(
    make_chat_stream: Any, hooks: ModelHooks, anyio_backend: str
) -> None:
    hooks.step_delay = 0.01
    outcomes = Outcomes()
    chat_stream = make_chat_stream(max_new_tokens=500)
    app = ChatStreamMiddleware(_never_called, chat_stream=chat_stream, serve=True, callback=outcomes)
    client = ScriptedClient(json.dumps({"user_input": "hi"}).encode())
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, _scope(), client.receive, client.send)
            await client.first_text.wait()
            client.leave.set()
    assert outcomes.outcomes == ["client_disconnected_while_streaming"]
    stats = outcomes.calls[0][0].state.chat_generation
    assert stats.steps_after_cancel <= 1 and stats.completion_tokens < 500
    assert chat_stream.load()["processing"] == 0


async def test_websocket_passes_through_untouched_and_lifespan_keeps_its_send(
    make_chat_stream: Any, anyio_backend: str
) -> None:
    seen: list[tuple[str, Any, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["type"], receive, send))

    app = ChatStreamMiddleware(inner, chat_stream=make_chat_stream(), serve=True)
    for scope in ({"type": "websocket", "path": "/chat_stream"}, {"type": "lifespan"}):
        client = ScriptedClient(b"")
        await app(scope, client.receive, client.send)
    (websocket, ws_receive, ws_send), (lifespan, _, lifespan_send) = seen
    assert (websocket, ws_receive.__func__, ws_send.__func__) == (
        "websocket",
        ScriptedClient.receive,
        ScriptedClient.send,
    )
    # The lifespan's receive is wrapped: it holds `lifespan.shutdown` until cut-short chats have finished.
    assert (lifespan, lifespan_send.__func__) == ("lifespan", ScriptedClient.send)
    assert "chatstream_asgi.exchange" not in seen[0]


async def test_other_paths_get_the_servers_own_receive_and_an_unopened_session(
    make_chat_stream: Any, anyio_backend: str
) -> None:
    calls: list[tuple[Any, Any, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        calls.append((scope, receive, send))

    app = ChatStreamMiddleware(inner, chat_stream=make_chat_stream())
    client = ScriptedClient(b"{}")
    scope = _scope("/elsewhere")
    await app(scope, client.receive, client.send)
    ((passed_scope, receive, _),) = calls
    assert passed_scope is scope and set(scope) == set(_scope("/elsewhere")) | {"state"}
    assert receive == client.receive  # the body is never read or copied
    assert scope["state"]["session"].opened is None  # nothing is loaded until a route reads it


async def test_root_path_is_respected_when_matching_the_chat_path(make_chat_stream: Any, anyio_backend: str) -> None:
    outcomes = Outcomes()
    app = ChatStreamMiddleware(_never_called, chat_stream=make_chat_stream(), serve=True, callback=outcomes)
    scope = {**_scope("/api/chat_stream"), "root_path": "/api"}
    client = ScriptedClient(json.dumps({"user_input": "hi", "max_new_tokens": 2}).encode())
    with anyio.fail_after(30):
        await app(scope, client.receive, client.send)
    assert client.status == 200 and outcomes.outcomes == ["success"]
