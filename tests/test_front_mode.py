"""Front mode (`OpenAIEngine`) as its clients see it: an upstream that is busy, one that fails while
a client waits in the queue, one that is down.

The upstream here is a small real OpenAI-compatible server (Starlette under uvicorn) whose chat
completions answer as each test scripts them, so a 429 or a 500 comes exactly when wanted.
`chatstream-asgi serve --upstream` itself is tested in `test_cli.py`.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.engine import OpenAIEngine

from .conftest import Outcomes, open_chat, wait_until

HI = [{"role": "user", "content": "hi"}]


class ScriptedUpstream:
    """An OpenAI-compatible upstream whose chat completions answer, in order, as `answers` says:
    `("busy", headers)` a 429, `("broken",)` a 500, `("reply", text, gate)` the text streamed as
    one chunk once `gate` is set. With the script spent, every completion is a 429."""

    def __init__(self) -> None:
        self.answers: list[tuple[Any, ...]] = []
        self.gates: list[threading.Event] = []

    def reply_after(self, text: str) -> threading.Event:
        """Script a reply that streams once the returned gate is set."""
        gate = threading.Event()
        self.gates.append(gate)
        self.answers.append(("reply", text, gate))
        return gate

    def app(self) -> Starlette:
        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

        async def completions(request: Request) -> Response:
            answer = self.answers.pop(0) if self.answers else ("busy", {})
            if answer[0] == "busy":
                error = {"message": "busy", "type": "rate_limit_error", "param": None, "code": "too_many_requests"}
                return JSONResponse({"error": error}, status_code=429, headers=answer[1])
            if answer[0] == "broken":
                return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
            _, text, gate = answer

            async def chunks() -> AsyncIterator[bytes]:
                await anyio.to_thread.run_sync(gate.wait)
                chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}]}
                yield f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()

            return StreamingResponse(chunks(), media_type="text/event-stream")

        return Starlette(
            routes=[Route("/v1/models", models), Route("/v1/chat/completions", completions, methods=["POST"])]
        )


@pytest.fixture
def scripted(serve: Any) -> Iterator[tuple[ScriptedUpstream, str]]:
    upstream = ScriptedUpstream()
    yield upstream, f"{serve(upstream.app()).url}/v1"
    for gate in upstream.gates:  # a reply the test never let through must not hold the server's thread
        gate.set()


def _front(serve: Any, url: str, **kwargs: Any) -> tuple[Any, ChatStream, Outcomes]:
    chat_stream = ChatStream(engine=OpenAIEngine(url, model="scripted", timeout=30), name="scripted", **kwargs)
    outcomes = Outcomes()
    app = ChatStreamMiddleware(
        Starlette(), chat_stream=chat_stream, serve=True, openai=True, health=True, callback=outcomes
    )
    return serve(app), chat_stream, outcomes


def _ask_every_route(front: Any) -> list[Any]:
    """One chat on each route and format that answers before its head: the text formats, SSE, /v1."""
    with front.client() as client:
        return [
            client.post("/chat_stream", json={"user_input": "hi"}),
            client.post("/chat_stream?format=sse", json={"user_input": "hi"}),
            client.post("/chat_stream?format=chatstream", json={"user_input": "hi"}),
            client.post("/v1/chat/completions", json={"messages": HI, "stream": True}),
            client.post("/v1/chat/completions", json={"messages": HI}),
        ]


def test_a_busy_upstream_is_a_429_too_many_requests_with_retry_after_on_every_route(
    scripted: tuple[ScriptedUpstream, str], serve: Any
) -> None:
    upstream, url = scripted
    upstream.answers = [("busy", {})] * 5  # a 429 without Retry-After: the front says 1 s
    front, _, outcomes = _front(serve, url)
    answers = _ask_every_route(front)
    assert [answer.status_code for answer in answers] == [429] * 5
    assert [answer.headers.get("retry-after") for answer in answers] == ["1"] * 5
    assert [answer.json()["error"] for answer in answers[:3]] == ["too_many_requests"] * 3
    assert [answer.json()["error"]["code"] for answer in answers[3:]] == ["too_many_requests"] * 2
    assert [answer.json()["error"]["type"] for answer in answers[3:]] == ["rate_limit_error"] * 2
    assert outcomes.wait(5) == ["unknown_error_occurred"] * 5  # it was admitted here: it has its outcome


def test_a_busy_upstreams_retry_after_is_passed_on(scripted: tuple[ScriptedUpstream, str], serve: Any) -> None:
    upstream, url = scripted
    upstream.answers = [("busy", {"Retry-After": "7"})] * 5
    front, _, _ = _front(serve, url)
    assert [answer.headers.get("retry-after") for answer in _ask_every_route(front)] == ["7"] * 5


def test_a_retry_after_given_as_a_date_in_the_past_is_passed_on_as_1_second(
    scripted: tuple[ScriptedUpstream, str], serve: Any
) -> None:
    upstream, url = scripted
    upstream.answers = [("busy", {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})]
    front, _, _ = _front(serve, url)
    with front.client() as client:
        answer = client.post("/chat_stream", json={"user_input": "hi"})
    assert answer.status_code == 429 and answer.headers["retry-after"] == "1"


def _open_post(url: str, path: str, body: dict[str, Any]) -> socket.socket:
    """A raw HTTP/1.1 POST, so the test reads the frames as they come."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        assert chunk, f"server closed the connection after {data!r}"
        data += chunk
    return data


def _read_response(sock: socket.socket, data: bytes = b"") -> tuple[bytes, bytes]:
    """The head and the de-chunked body of a chunked response (`data`: what was read of it so far),
    read until its last chunk."""
    while not data.endswith(b"\r\n0\r\n\r\n"):
        chunk = sock.recv(4096)
        assert chunk, f"server closed the connection after {data!r}"
        data += chunk
    head, _, chunked = data.partition(b"\r\n\r\n")
    body = b""
    while True:
        size_line, _, rest = chunked.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return head, body
        body, chunked = body + rest[:size], rest[size + 2 :]


@pytest.mark.parametrize(
    ("failure", "code"),
    [(("broken",), "generation_failed"), (("busy", {"Retry-After": "3"}), "too_many_requests")],
    ids=["upstream-error", "upstream-busy"],
)
def test_a_queued_sse_chat_whose_upstream_fails_ends_with_an_sse_error_event(
    scripted: tuple[ScriptedUpstream, str], serve: Any, failure: tuple[Any, ...], code: str
) -> None:
    upstream, url = scripted
    gate = upstream.reply_after("first reply")
    upstream.answers.append(failure)
    front, chat_stream, outcomes = _front(serve, url, num_of_concurrent_executions=1, max_queue_size=1)
    first = open_chat(front.url, "first")  # holds the only slot until the gate opens
    assert wait_until(lambda: chat_stream.load()["processing"] == 1)
    waiter = _open_post(front.url, "/chat_stream?format=sse", {"user_input": "second"})
    waited = _read_until(waiter, b"event: queue")
    gate.set()
    _, first_body = _read_response(first)
    assert first_body == b"first reply"
    head, body = _read_response(waiter, waited)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    *queue_frames, error_frame, last = body.split(b"\r\n\r\n")
    assert last == b""
    assert queue_frames and all(frame.startswith(b"event: queue\r\ndata: ") for frame in queue_frames)
    event, data = error_frame.split(b"\r\n")
    assert event == b"event: error"
    assert json.loads(data.removeprefix(b"data: "))["error"] == code
    assert outcomes.wait(2) == ["success", "unknown_error_occurred"]
    first.close()
    waiter.close()


def test_a_queued_v1_stream_whose_upstream_fails_ends_with_an_error_event_in_openais_shape(
    scripted: tuple[ScriptedUpstream, str], serve: Any
) -> None:
    upstream, url = scripted
    gate = upstream.reply_after("first reply")
    upstream.answers.append(("broken",))
    front, chat_stream, outcomes = _front(serve, url, num_of_concurrent_executions=1, max_queue_size=1)
    first = open_chat(front.url, "first")
    assert wait_until(lambda: chat_stream.load()["processing"] == 1)
    body = {"messages": HI, "stream": True, "stream_options": {"include_queue_status": True}}
    waiter = _open_post(front.url, "/v1/chat/completions", body)
    waited = _read_until(waiter, b'"queue": {')
    gate.set()
    _read_response(first)
    head, stream = _read_response(waiter, waited)
    assert head.startswith(b"HTTP/1.1 200")
    frames = [frame for frame in stream.split(b"\n\n") if frame]
    assert all(frame.startswith(b"data: ") for frame in frames)  # SSE events only: no JSON body after them
    events = [json.loads(frame.removeprefix(b"data: ")) for frame in frames]
    assert "queue" in events[0]
    assert events[-1]["error"]["code"] == "generation_failed"
    assert outcomes.wait(2) == ["success", "unknown_error_occurred"]
    first.close()
    waiter.close()


def test_ready_says_upstream_unavailable_while_the_upstream_does_not_answer(serve: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    front, _, _ = _front(serve, nobody)
    with front.client() as client:
        ready = client.get("/ready")
        health = client.get("/health")
    assert ready.status_code == 503 and ready.json()["status"] == "upstream_unavailable"
    assert health.status_code == 200  # alive: only its upstream is not
