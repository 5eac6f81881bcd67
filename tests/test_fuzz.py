"""Property-based fuzzing of every route the middleware serves (issue 11).

Random bodies (bytes and JSON shapes), headers, cookies and framing go to a real server over raw
sockets; every answer must be a normal reply or a JSON 4xx/5xx that is not a 500 and carries no
traceback nor another session's data, and afterwards nothing is left running. Another session is
seeded first with a marker in its conversation; the fuzzed cookies include its id under forged
signatures and the fuzzed message ids include its reply's id. `CHATSTREAM_FUZZ=long` runs many more
examples (the manual profile): `CHATSTREAM_FUZZ=long /work/bin/cs-test tests/test_fuzz.py`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from chatstream_asgi import ChatStream, ChatStreamMiddleware

from .conftest import LiveServer, wait_until
from .rawhttp import connect, read_response, request_head

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile("long" if os.environ.get("CHATSTREAM_FUZZ") == "long" else "ci")

ROUTES = [
    ("POST", "/chat_stream"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("POST", "/clear_context"),
    ("GET", "/get_prompt"),
    ("POST", "/set_generation_params"),
    ("GET", "/get_generation_params"),
    ("POST", "/set_feedback"),
    ("GET", "/get_load"),
    ("GET", "/health"),
    ("GET", "/ready"),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
chat_like = st.fixed_dictionaries(
    {},
    optional={
        "user_input": json_values,
        "regenerate": json_values,
        "messages": json_values,
        "temperature": json_values,
        "top_k": json_values,
        "stop": json_values,
        "seed": json_values,
        "message_id": json_values | st.builds(lambda: SEEDED.message_id),
        "max_new_tokens": st.integers(min_value=1, max_value=3),
    },
)
bodies = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | chat_like.map(lambda v: json.dumps(v).encode())
)
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40)
# Random cookies, and the seeded session's own id under a forged, missing or mangled signature.
cookies = (
    header_values | header_values.map(lambda mac: f"{SEEDED.session_id}.{mac}") | st.builds(lambda: SEEDED.session_id)
)
framings = st.sampled_from(["length", "chunked", "short", "long", "closed"])


MARKER = "seeded-secret-7f3a91"
#: Threads an idle server may gain on its own: anyio's pool for `to_thread` (`/get_prompt`), whose
#: threads wait idle between calls and end with the event loop.
POOLED = {"AnyIO worker thread"}


@dataclass
class Seeded:
    """The other session: its id and its reply's message id, once the server has answered it."""

    session_id: str = ""
    message_id: str = ""
    cookie: str = ""  # its signed cookie, which only its own client has


SEEDED = Seeded()


@dataclass
class FuzzServer:
    live: LiveServer
    chat_stream: ChatStream
    threads_before_start: set[threading.Thread]
    threads_serving: set[threading.Thread]

    def stop(self) -> None:
        self.live.__exit__()
        self.chat_stream.close()


@pytest.fixture(scope="module")
def fuzz_server(model_dir: Any) -> Iterator[FuzzServer]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads_before_start = set(threading.enumerate())
    chat_stream = ChatStream(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        device="cpu",
        temperature=0,
        max_new_tokens=3,
        num_of_concurrent_executions=1,
        max_queue_size=1,
    )
    assert wait_until(lambda: chat_stream.ready)
    app = ChatStreamMiddleware(
        Starlette(),
        chat_stream=chat_stream,
        serve=True,
        openai=True,
        apis={"all": True},
        health=True,
        body_timeout=0.5,
        max_body_size=4096,
    )
    server = FuzzServer(LiveServer(app).__enter__(), chat_stream, threads_before_start, set())
    try:
        with server.live.client() as client:  # another user's conversation, which no fuzzed request may see
            seeded = client.post("/chat_stream", json={"user_input": f"my secret is {MARKER}"})
            assert seeded.status_code == 200
            SEEDED.cookie = client.cookies["chatstream_session"]
            SEEDED.session_id = SEEDED.cookie.rpartition(".")[0]
            SEEDED.message_id = seeded.headers["x-chatstream-last-generated-message-id"]
            assert MARKER in client.get("/get_prompt").text  # it is there to be found
        server.threads_serving = set(threading.enumerate())
        yield server
    finally:
        server.stop()


@given(
    route=st.sampled_from(ROUTES),
    body=bodies,
    framing=framings,
    cookie=cookies,
    extra=st.lists(
        st.tuples(st.sampled_from(["Accept", "Content-Type", "X-Foo", "Authorization"]), header_values), max_size=3
    ),
)
def test_any_request_gets_a_normal_reply_or_a_json_error_and_leaves_nothing_running(
    fuzz_server: FuzzServer,
    route: tuple[str, str],
    body: bytes,
    framing: str,
    cookie: str,
    extra: list[tuple[str, str]],
) -> None:
    live, chat_stream = fuzz_server.live, fuzz_server.chat_stream
    method, path = route
    headers = [("Cookie", f"chatstream_session={cookie}"), *extra]
    if framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    else:
        declared = {"length": len(body), "short": len(body) + 10, "long": max(0, len(body) - 1)}.get(
            framing, len(body) + 10
        )
        headers.append(("Content-Length", str(declared)))
        payload = body
    with connect(live.url) as sock:
        sock.sendall(request_head(method, path, headers) + payload)
        if framing == "closed":
            sock.shutdown(socket.SHUT_WR)
        try:
            response = read_response(sock)
        except (ValueError, IndexError):  # the server closed without an answer (a client that left)
            response = None
    if response is not None:
        assert response.status_code != 500, response.body[:300]
        assert b"Traceback" not in response.body
        if response.status_code >= 400 and response.body:
            assert (response.header("content-type") or "").startswith("application/json"), response.body[:200]
        assert MARKER.encode() not in response.body, response.body[:300]  # another session's data
        assert not any(MARKER in value for _, value in response.headers)
    assert wait_until(lambda: chat_stream.load()["processing"] == 0 and chat_stream.load()["waiting"] == 0)
    assert wait_until(lambda: {t.name for t in set(threading.enumerate()) - fuzz_server.threads_serving} <= POOLED)


def test_after_fuzzing_the_server_stops_leaving_no_thread_and_the_seeded_session_intact(
    fuzz_server: FuzzServer,
) -> None:
    """Runs after the fuzz test (file order): nothing it sent changed the seeded session, and
    once the server and its engine stop, no thread they or the fuzzed requests started is left."""
    with fuzz_server.live.client(cookies={"chatstream_session": SEEDED.cookie}) as client:
        assert MARKER in client.get("/get_prompt").text
    fuzz_server.stop()
    assert wait_until(lambda: set(threading.enumerate()) <= fuzz_server.threads_before_start), (
        set(threading.enumerate()) - fuzz_server.threads_before_start
    )
