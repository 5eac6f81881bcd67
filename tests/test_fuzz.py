"""Property-based fuzzing of every route the middleware serves (issue 11).

Random bodies (bytes and JSON shapes), headers, cookies and framing go to a real server over raw
sockets; every answer must be a normal reply or a JSON 4xx/5xx that is not a 500 and carries no
traceback, and afterwards nothing is left running. `CHATSTREAM_FUZZ=long` runs many more examples
(the manual profile): `CHATSTREAM_FUZZ=long /work/bin/cs-test tests/test_fuzz.py`.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware

from .conftest import wait_until
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
        "message_id": json_values,
        "max_new_tokens": st.integers(min_value=1, max_value=3),
    },
)
bodies = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | chat_like.map(lambda v: json.dumps(v).encode())
)
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40)
framings = st.sampled_from(["length", "chunked", "short", "long", "closed"])


@pytest.fixture(scope="module")
def fuzz_server(model_dir: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatstream_asgi import ChatStream

    from .conftest import LiveServer

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
    with LiveServer(app) as live:
        yield live, chat_stream
    chat_stream.close()


@given(
    route=st.sampled_from(ROUTES),
    body=bodies,
    framing=framings,
    cookie=header_values,
    extra=st.lists(
        st.tuples(st.sampled_from(["Accept", "Content-Type", "X-Foo", "Authorization"]), header_values), max_size=3
    ),
)
def test_any_request_gets_a_normal_reply_or_a_json_error_and_leaves_nothing_running(
    fuzz_server: Any, route: tuple[str, str], body: bytes, framing: str, cookie: str, extra: list[tuple[str, str]]
) -> None:
    live, chat_stream = fuzz_server
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
    assert wait_until(lambda: chat_stream.load()["processing"] == 0 and chat_stream.load()["waiting"] == 0)
