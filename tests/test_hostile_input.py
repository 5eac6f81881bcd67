"""Regression tests for what an adversarial probe found (issue 11): each reproduces its finding
over real HTTP, with raw sockets where a client library would refuse to send the input."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware, MemoryStore

from .conftest import Outcomes
from .rawhttp import exchange, request_head

IDLE = {"processing": 0, "waiting": 0, "num_of_concurrent_executions": 1, "max_queue_size": 1}
SESSION_ROUTES = [
    ("POST", "/chat_stream", b'{"user_input": "hi"}'),
    ("POST", "/clear_context", b""),
    ("GET", "/get_prompt", b""),
    ("POST", "/set_generation_params", b'{"temperature": 0.5}'),
    ("GET", "/get_generation_params", b""),
    ("POST", "/set_feedback", b'{"message_id": 5}'),
]
JSON_ROUTES = ["/chat_stream", "/v1/chat/completions", "/set_generation_params", "/set_feedback"]


@pytest.fixture
def server(make_chat_stream: Any, serve: Any) -> tuple[Any, Any, Outcomes]:
    chat_stream = make_chat_stream(num_of_concurrent_executions=1, max_queue_size=1, max_new_tokens=4)
    outcomes = Outcomes()
    app = ChatStreamMiddleware(
        Starlette(), chat_stream=chat_stream, serve=True, openai=True, apis={"all": True}, callback=outcomes
    )
    return serve(app), chat_stream, outcomes


def _error_code(response: httpx.Response) -> str:
    error = response.json()["error"]
    return str(error["code"] if isinstance(error, dict) else error)


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 200_000, id="200k-brackets"),
        pytest.param(b'{"user_input": ' + b"7" * 5000 + b"}", id="5000-digit-integer"),
        pytest.param(b'{"a": ' * 5000 + b"1" + b"}" * 5000, id="5000-nested-objects"),
        pytest.param(b'{"user_input": "x", "temperature": NaN}', id="nan"),
    ],
)
def test_pathological_json_is_a_400_invalid_json_on_every_json_route(
    server: tuple[Any, Any, Outcomes], route: str, body: bytes
) -> None:
    live, chat_stream, outcomes = server
    with live.client() as client:
        response = client.post(route, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert _error_code(response) == "invalid_json"
    assert b"Traceback" not in response.content
    assert chat_stream.load() == IDLE and outcomes.calls == []


@pytest.mark.parametrize(("method", "path", "body"), SESSION_ROUTES)
def test_a_cookie_with_non_ascii_bytes_starts_a_new_session_instead_of_a_500(
    server: tuple[Any, Any, Outcomes], method: str, path: str, body: bytes
) -> None:
    live, _, _ = server
    cookie = "chatstream_session=c2Vzc2lvbg.\xe9\xe9\xe9"
    headers = {"Cookie": cookie, "Content-Type": "application/json", "Content-Length": str(len(body))}
    response = exchange(live.url, request_head(method, path, headers), body)
    assert response.status_code in (200, 400)
    assert any(value.startswith("chatstream_session=") for value in response.headers_named("set-cookie"))


def test_a_declared_300_mb_body_is_refused_with_413_before_it_is_read(server: tuple[Any, Any, Outcomes]) -> None:
    live, _, _ = server
    head = request_head("POST", "/set_feedback", {"Content-Type": "application/json", "Content-Length": "314572800"})
    response = exchange(live.url, head)  # nothing of the body is ever sent: the answer must not wait for it
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"


@pytest.mark.parametrize("route", ["/set_feedback", "/set_generation_params", "/clear_context"])
def test_an_api_body_over_max_body_size_is_413_by_length_and_while_chunked(
    server: tuple[Any, Any, Outcomes], route: str
) -> None:
    live, _, _ = server
    big = json.dumps({"message_id": "x" * (2 << 20)}).encode()

    def chunked() -> Any:
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    with live.client() as client:
        by_length = client.post(route, content=big)
        streamed = client.post(route, content=chunked())
    assert (by_length.status_code, streamed.status_code) == (413, 413)
    assert by_length.json()["error"] == streamed.json()["error"] == "body_too_large"


def test_an_unknown_message_id_is_not_echoed_back_whole(server: tuple[Any, Any, Outcomes]) -> None:
    live, _, _ = server
    with live.client() as client:
        response = client.post("/set_feedback", json={"message_id": "x" * 500_000})
    assert response.status_code == 404
    assert len(response.content) < 1000


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/chat_stream", {"user_input": "x", "stop": [f"s{i}" for i in range(17)]}),
        ("/chat_stream", {"user_input": "x", "stop": ["s" * 257]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}),
    ],
    ids=["17-strings", "a-257-char-string", "5-strings-on-v1"],
)
def test_too_many_or_too_long_stop_strings_are_a_422(
    server: tuple[Any, Any, Outcomes], route: str, body: dict[str, Any]
) -> None:
    live, chat_stream, outcomes = server
    with live.client() as client:
        response = client.post(route, json=body)
    assert response.status_code == 422
    assert _error_code(response) == "invalid_parameter"
    assert chat_stream.load() == IDLE and outcomes.calls == []


@pytest.mark.parametrize(
    ("route", "body", "status"),
    [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "seed": ' + b"%d}" % 2**70, 422),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
        ("/chat_stream", b'{"user_input": "\\ud800"}', 400),
        ("/chat_stream", b'{"user_input": "ok", "\\udfff": 1}', 400),
    ],
    ids=["seed-2-70", "v1-lone-surrogate", "chat-lone-surrogate", "lone-surrogate-key"],
)
def test_input_that_cannot_be_generated_from_is_refused_before_admission(
    server: tuple[Any, Any, Outcomes], route: str, body: bytes, status: int
) -> None:
    live, chat_stream, outcomes = server
    with live.client() as client:
        response = client.post(route, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == status
        assert _error_code(response) in ("invalid_parameter", "invalid_json")
        ok = client.post("/chat_stream", json={"user_input": "fine"})
    assert ok.status_code == 200
    assert outcomes.wait() == ["success"]  # the refused request got no callback and left no slot held
    assert chat_stream.load() == IDLE


@pytest.mark.parametrize("path", ["/chat_stream", "/set_generation_params", "/v1/chat/completions"])
def test_a_body_that_trickles_past_body_timeout_gets_408(make_chat_stream: Any, serve: Any, path: str) -> None:
    chat_stream = make_chat_stream(num_of_concurrent_executions=1, max_queue_size=1)
    app = ChatStreamMiddleware(
        Starlette(), chat_stream=chat_stream, serve=True, openai=True, apis={"all": True}, body_timeout=0.3
    )
    live = serve(app)
    head = request_head("POST", path, {"Content-Type": "application/json", "Content-Length": "100"})
    response = exchange(live.url, head, b'{"user_in')  # and then nothing more
    assert response.status_code == 408
    error = response.json()["error"]
    assert (error["code"] if isinstance(error, dict) else error) == "body_timeout"
    assert chat_stream.load()["processing"] == 0


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/get_prompt", 404),  # not mounted: the app's own answer, the middleware let it through
        ("GET", "/chat_stream", 405),  # the middleware's route, asked with the wrong method
    ],
)
def test_a_route_this_server_does_not_serve_sets_no_cookie(
    make_chat_stream: Any, serve: Any, method: str, path: str, status: int
) -> None:
    chat_stream = make_chat_stream()
    live = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True))
    with live.client() as client:
        response = client.request(method, path)
    assert response.status_code == status
    assert "set-cookie" not in response.headers


def test_memory_store_is_bounded_by_bytes_across_sessions(make_chat_stream: Any, serve: Any) -> None:
    store = MemoryStore(max_bytes=400_000)
    chat_stream = make_chat_stream(max_new_tokens=2)
    live = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, session_store=store))
    for _ in range(10):
        with live.client() as client:  # a new session each
            assert client.post("/chat_stream", json={"user_input": "x" * 90_000}).status_code == 200
    assert store.stored_bytes <= 400_000
    assert 0 < len(store) < 10  # the least recently used went first


def test_one_conversation_is_bounded_by_bytes_keeping_its_newest_turns(make_chat_stream: Any, serve: Any) -> None:
    store = MemoryStore(max_session_bytes=250_000)
    chat_stream = make_chat_stream(max_new_tokens=2)
    outcomes = Outcomes()
    app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, session_store=store, callback=outcomes)
    live = serve(app)
    with live.client() as client:
        for turn in range(6):
            assert client.post("/chat_stream", json={"user_input": f"{turn}" * 50_000}).status_code == 200
    outcomes.wait(6)
    assert store.stored_bytes <= 250_000
    session = outcomes.calls[-1][0].state.session
    stored = store._entries[session.session_id][1]  # the JSON as kept
    assert '"' + "5" * 50_000 in stored and '"' + "0" * 50_000 not in stored
