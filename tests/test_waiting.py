"""Waiting people can live with (DESIGN §5): deadlines, queue position and ETA, fair turns.

A running generation holds the only slot by a model stuck mid-step (`ModelHooks.hold`), so
every other request must wait; nothing here depends on timing but the deadlines under test.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware
from chatstream_asgi.asgi.waiting import API_KEY_SCOPE_KEY, client_identity, queue_deadline

from .conftest import ModelHooks, Outcomes, open_chat, read_until, wait_until

HI = [{"role": "user", "content": "Hi"}]
QUEUE_EVENT = re.compile(rb"event: queue\r\ndata: (\{.*?\})\r\n\r\n")
V1_QUEUE_CHUNK = re.compile(rb'data: (\{[^\n]*"queue": \{[^\n]*\})\n\n')


RequestHeaders = dict[str, str] | list[tuple[str, str]]


def open_stream(url: str, path: str, body: dict[str, Any], headers: RequestHeaders | None = None) -> socket.socket:
    """A raw HTTP/1.1 POST, so the test reads frames as they come and decides when to leave
    (`headers` as pairs when a name repeats)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    payload = json.dumps(body).encode()
    pairs = headers.items() if isinstance(headers, dict) else headers or []
    extra = "".join(f"{name}: {value}\r\n" for name, value in pairs)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{extra}"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


class Frames:
    """What a raw socket has received so far, read on demand until a pattern shows up."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    def until(self, pattern: re.Pattern[bytes] | bytes, count: int = 1) -> list[Any]:
        """Read until `pattern` has matched `count` times; the JSON (or bytes) of every match."""
        while True:
            found = (
                [json.loads(m) for m in pattern.findall(self.data)]
                if isinstance(pattern, re.Pattern)
                else [pattern] * self.data.count(pattern)
            )
            if len(found) >= count:
                return found
            chunk = self.sock.recv(4096)
            assert chunk, f"server closed the connection after {self.data!r}"
            self.data += chunk


@pytest.fixture
def busy_server(make_chat_stream: Any, serve: Any, hooks: ModelHooks) -> Iterator[Any]:
    """A server whose one slot is held by a generation stuck in prefill until the test ends."""
    release = threading.Event()
    sockets: list[Any] = []

    def start(
        ping_interval: float = 15.0, api_keys: list[str] | None = None, **kwargs: Any
    ) -> tuple[Any, Any, Outcomes]:
        kwargs.setdefault("num_of_concurrent_executions", 1)
        chat_stream = make_chat_stream(**kwargs)
        hooks.hold = release  # after the engine's warm-up, which runs the model too
        hooks.prefill_started.clear()
        outcomes = Outcomes()
        app = ChatStreamMiddleware(
            Starlette(),
            chat_stream=chat_stream,
            serve=True,
            openai=True,
            callback=outcomes,
            ping_interval=ping_interval,
            api_keys=api_keys,
        )
        server = serve(app)
        auth = {"Authorization": f"Bearer {api_keys[0]}"} if api_keys else {}
        sockets.append(open_stream(server.url, "/chat_stream", {"user_input": "I hold the slot"}, auth))
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
        assert (
            client.post("/chat_stream", json={"user_input": "w"}, headers={"X-ChatStream-Deadline": "0"}).json()[
                "error"
            ]
            == "queue_timeout"
        )
    assert chat_stream.load() == {"processing": 1, "waiting": 0, "num_of_concurrent_executions": 1, "max_queue_size": 5}


def test_a_huge_malformed_deadline_header_is_not_echoed_whole_in_the_400_or_the_log(
    busy_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server, _, _ = busy_server()
    value = "9" * 10 + "x" * 60_000
    with caplog.at_level(logging.INFO, logger="chatstream_asgi"), server.client() as client:
        response = client.post("/chat_stream", json={"user_input": "w"}, headers={"X-ChatStream-Deadline": value})
    assert response.status_code == 400
    assert "X-ChatStream-Deadline" in response.json()["detail"] and "'9999999999xx" in response.json()["detail"]
    assert len(response.content) < 500
    [refusal] = [r.getMessage() for r in caplog.records if "invalid_request" in r.getMessage()]
    assert "X-ChatStream-Deadline" in refusal and len(refusal) < 500


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


def test_waiting_sse_client_gets_its_200_at_once_then_its_position(busy_server: Any) -> None:
    server, chat_stream, _ = busy_server()
    waiter = Frames(open_stream(server.url, "/chat_stream?format=sse", {"user_input": "next"}))
    [frame] = waiter.until(QUEUE_EVENT)
    assert waiter.data.startswith(b"HTTP/1.1 200")
    assert b"x-chatstream-last-generated-message-id" in waiter.data.lower()
    assert frame["position"] == 1
    assert chat_stream.load()["waiting"] == 1


def test_no_eta_is_given_before_any_chat_has_finished(busy_server: Any) -> None:
    server, _, _ = busy_server()
    waiter = Frames(open_stream(server.url, "/chat_stream?format=sse", {"user_input": "next"}))
    [frame] = waiter.until(QUEUE_EVENT)
    assert frame == {"position": 1, "eta_s": None}  # a figure with nothing measured behind it would be made up


def test_once_a_chat_has_finished_the_eta_is_measured(make_chat_stream: Any, serve: Any, hooks: ModelHooks) -> None:
    chat_stream = make_chat_stream(num_of_concurrent_executions=1, max_new_tokens=4)
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True))
    with server.client() as client:
        assert client.post("/chat_stream", json={"user_input": "a finished chat"}).status_code == 200
    hooks.hold = threading.Event()
    hooks.prefill_started.clear()
    holder = open_stream(server.url, "/chat_stream", {"user_input": "I hold the slot"})
    try:
        assert hooks.prefill_started.wait(30)
        waiter = Frames(open_stream(server.url, "/chat_stream?format=sse", {"user_input": "next"}))
        [frame] = waiter.until(QUEUE_EVENT)
        assert frame["position"] == 1 and isinstance(frame["eta_s"], float)  # from the measured hold
        waiter.sock.close()
    finally:
        hooks.hold.set()
        holder.close()


def test_queue_frames_follow_position_changes_then_the_reply_streams(busy_server: Any, hooks: ModelHooks) -> None:
    server, chat_stream, outcomes = busy_server()
    first = Frames(open_stream(server.url, "/chat_stream?format=sse", {"user_input": "one"}))
    first.until(QUEUE_EVENT)
    leaving = open_stream(server.url, "/chat_stream?format=sse", {"user_input": "two"})
    assert wait_until(lambda: chat_stream.load()["waiting"] == 2)
    second = Frames(open_stream(server.url, "/chat_stream?format=sse", {"user_input": "three"}))
    assert second.until(QUEUE_EVENT)[0]["position"] == 3
    leaving.close()
    assert [frame["position"] for frame in second.until(QUEUE_EVENT, 2)] == [3, 2]
    assert outcomes.wait(1) == ["client_disconnected_before_streaming"]
    assert hooks.hold is not None
    hooks.hold.set()
    first.until(b"event: done")
    assert second.until(QUEUE_EVENT, 3)[2]["position"] == 1
    second.until(b"event: done")
    assert b'data: {"delta"' in second.data
    assert outcomes.wait(4).count("success") == 3


def test_queue_frames_repeat_every_ping_interval_while_nothing_moves(busy_server: Any) -> None:
    server, _, _ = busy_server(ping_interval=0.05)
    waiter = Frames(open_stream(server.url, "/chat_stream?format=sse", {"user_input": "w"}))
    assert [frame["position"] for frame in waiter.until(QUEUE_EVENT, 3)][:3] == [1, 1, 1]


def test_deadline_after_the_200_comes_in_band_as_an_sse_error(busy_server: Any) -> None:
    server, chat_stream, outcomes = busy_server(max_queue_wait=0.2)
    waiter = Frames(open_stream(server.url, "/chat_stream?format=sse", {"user_input": "w"}))
    waiter.until(b"event: error")
    error = json.loads(waiter.data.split(b"event: error\r\ndata: ")[1].split(b"\r\n")[0])
    assert error["error"] == "queue_timeout"
    assert error["retry_after"] >= 1
    assert waiter.data.startswith(b"HTTP/1.1 200")
    waiter.until(b"0\r\n\r\n")  # the stream ends there
    assert chat_stream.load()["waiting"] == 0
    assert outcomes.calls == []
    # The session's turn lock went with it: its next turn waits again instead of `session_busy`.
    cookie = re.search(rb"set-cookie: ([^;]+);", waiter.data, re.IGNORECASE)
    assert cookie is not None
    again = Frames(
        open_stream(server.url, "/chat_stream?format=sse", {"user_input": "w"}, {"Cookie": cookie[1].decode()})
    )
    again.until(QUEUE_EVENT)
    assert again.data.startswith(b"HTTP/1.1 200")


def test_v1_stream_gets_queue_chunks_only_when_it_asks(busy_server: Any, hooks: ModelHooks) -> None:
    server, _, outcomes = busy_server()
    body = {"messages": HI, "stream": True, "stream_options": {"include_queue_status": True}}
    waiter = Frames(open_stream(server.url, "/v1/chat/completions", body))
    [chunk] = waiter.until(V1_QUEUE_CHUNK)
    assert waiter.data.startswith(b"HTTP/1.1 200")
    assert chunk["queue"] == {"position": 1, "eta_s": chunk["queue"]["eta_s"]}
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"] == []
    assert hooks.hold is not None
    hooks.hold.set()
    waiter.until(b"data: [DONE]")
    ids = {json.loads(line)["id"] for line in re.findall(rb"data: (\{[^\n]*\})\n\n", waiter.data)}
    assert ids == {chunk["id"]}  # the queue chunks belong to the completion that follows
    assert "success" in outcomes.wait(2)


def _queue_position(server: Any, headers: RequestHeaders) -> Frames:
    waiter = Frames(open_stream(server.url, "/chat_stream?format=sse", {"user_input": "w"}, headers))
    waiter.until(QUEUE_EVENT)
    return waiter


@pytest.mark.parametrize(
    ("options", "client_a", "client_b"),
    [
        ({"trust_forwarded": True}, {"X-Forwarded-For": "10.0.0.1"}, {"X-Forwarded-For": "10.0.0.9, 10.0.0.2"}),
        ({"api_keys": ["key-a", "key-b"]}, {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}),
    ],
    ids=["by-forwarded-address", "by-api-key"],
)
def test_fair_admission_puts_a_one_request_client_ahead_of_anothers_burst(
    busy_server: Any, options: dict[str, Any], client_a: dict[str, str], client_b: dict[str, str]
) -> None:
    server, chat_stream, _ = busy_server(admission="fair", **options)
    burst = [_queue_position(server, client_a) for _ in range(3)]
    assert [QUEUE_EVENT.findall(w.data) for w in burst] == [
        [f'{{"position": {n}, "eta_s": null}}'.encode()] for n in (1, 2, 3)
    ]
    single = _queue_position(server, client_b)
    assert QUEUE_EVENT.findall(single.data)[0].startswith(b'{"position": 2,')
    assert [frame["position"] for frame in burst[2].until(QUEUE_EVENT, 2)] == [3, 4]  # the burst's tail moved back
    assert [frame["position"] for frame in burst[1].until(QUEUE_EVENT, 2)] == [2, 3]
    assert chat_stream.load()["waiting"] == 4


def test_under_fair_admission_a_client_keeping_the_queue_full_never_keeps_another_client_out(
    busy_server: Any,
) -> None:
    # Client A holds the one slot and all ten places in the queue (11 chats in flight) and takes
    # back every place it loses at once; client B's chat must get in on every try.
    server, chat_stream, _ = busy_server(admission="fair", max_queue_size=10, api_keys=["key-a", "key-b"])
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    flood = [_queue_position(server, a) for _ in range(10)]
    assert chat_stream.load()["waiting"] == 10
    with server.client() as client:
        assert client.post("/chat_stream", json={"user_input": "w"}, headers=a).status_code == 429
        for _ in range(20):
            single = Frames(open_stream(server.url, "/chat_stream?format=sse", {"user_input": "w"}, b))
            single.until(b"\r\n\r\n")
            assert single.data.startswith(b"HTTP/1.1 200"), single.data  # not a 429
            assert single.until(QUEUE_EVENT)[0]["position"] == 2  # served after at most one of A's chats
            # A's newest waiter gave its place up: a 429 in-band, since its 200 had gone out.
            newest = flood.pop()
            newest.until(b"event: error")
            error = json.loads(newest.data.split(b"event: error\r\ndata: ")[1].split(b"\r\n")[0])
            assert error["error"] == "too_many_requests"
            newest.sock.close()
            # A cannot take it back while B waits, not even by crowding B out.
            assert client.post("/chat_stream", json={"user_input": "w"}, headers=a).status_code == 429
            single.sock.close()
            assert wait_until(lambda: chat_stream.load()["waiting"] == 9)
            flood.append(_queue_position(server, a))
    assert chat_stream.load()["waiting"] == 10


def test_a_silent_waiter_that_gives_its_place_to_another_client_gets_a_real_429(busy_server: Any) -> None:
    server, chat_stream, outcomes = busy_server(admission="fair", max_queue_size=2, api_keys=["key-a", "key-b"])
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    first = open_stream(server.url, "/chat_stream", {"user_input": "w"}, a)
    assert wait_until(lambda: chat_stream.load()["waiting"] == 1)
    newest = open_stream(server.url, "/v1/chat/completions", {"messages": HI}, a)
    assert wait_until(lambda: chat_stream.load()["waiting"] == 2)
    single = _queue_position(server, b)
    refusal = read_until(newest, b"}}")
    assert refusal.startswith(b"HTTP/1.1 429") and b"retry-after" in refusal.lower()
    assert b'"code":"too_many_requests"' in refusal.replace(b" ", b"")
    assert chat_stream.load()["waiting"] == 2
    assert outcomes.calls == []  # a refusal: no callback
    for sock in (first, newest, single.sock):
        sock.close()


def test_a_forged_first_forwarded_line_does_not_make_a_client_someone_else(busy_server: Any) -> None:
    # One client behind a proxy that appends its own X-Forwarded-For line (as HAProxy does) forges
    # a new address in its own first line each time: it is still the one client the proxy saw.
    server, _, _ = busy_server(admission="fair", trust_forwarded=True)
    burst = [
        _queue_position(server, [("X-Forwarded-For", f"10.0.0.{50 + n}"), ("X-Forwarded-For", "10.0.0.1")])
        for n in range(3)
    ]
    assert [w.until(QUEUE_EVENT)[0]["position"] for w in burst] == [1, 2, 3]
    single = _queue_position(server, [("X-Forwarded-For", "10.0.0.2")])
    assert single.until(QUEUE_EVENT)[0]["position"] == 2  # ahead of the burst's tail: another client


def test_fifo_admission_keeps_arrival_order_whoever_the_clients_are(busy_server: Any) -> None:
    server, _, _ = busy_server()
    burst = [_queue_position(server, {"X-Forwarded-For": "10.0.0.1"}) for _ in range(3)]
    assert len(burst) == 3  # held open: a closed socket would leave the queue
    single = _queue_position(server, {"X-Forwarded-For": "10.0.0.2"})
    assert QUEUE_EVENT.findall(single.data)[0].startswith(b'{"position": 4,')


def test_client_for_fair_turns_is_its_api_key_else_its_address_and_forwarded_only_when_trusted() -> None:
    scope: dict[str, Any] = {
        "type": "http",
        "client": ("192.0.2.7", 5000),
        "headers": [(b"x-forwarded-for", b"198.51.100.1, 203.0.113.5")],
    }
    assert client_identity(scope, trust_forwarded=False) == ("address", "192.0.2.7")
    assert client_identity(scope, trust_forwarded=True) == ("address", "203.0.113.5")  # what the proxy saw
    appended = {**scope, "headers": [*scope["headers"], (b"x-forwarded-for", b"192.0.2.44")]}
    assert client_identity(appended, trust_forwarded=True) == ("address", "192.0.2.44")  # the proxy's own line
    assert client_identity({**scope, API_KEY_SCOPE_KEY: "k"}, trust_forwarded=True) == ("key", "k")


def test_unknown_admission_policy_is_refused_naming_it(make_chat_stream: Any) -> None:
    with pytest.raises(ValueError, match="admission must be one of fifo, fair, not 'lifo'"):
        make_chat_stream(admission="lifo")
