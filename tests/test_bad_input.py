"""Bad input gets a clear 4xx JSON error and leaves nothing behind."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware

from .conftest import ModelHooks, Outcomes, open_chat, read_until, wait_until

IDLE = {"processing": 0, "waiting": 0, "num_of_concurrent_executions": 1, "max_queue_size": 1}


@pytest.fixture
def server(make_chat_stream: Any, serve: Any) -> tuple[Any, Any, Outcomes]:
    chat_stream = make_chat_stream(num_of_concurrent_executions=1, max_queue_size=1)
    outcomes = Outcomes()
    app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, callback=outcomes, max_body_size=1000)
    return serve(app), chat_stream, outcomes


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"\xff\xfe{}", 400, "invalid_json"),
        (b"[]", 400, "invalid_json"),
        (b"{}", 400, "invalid_request"),
        (b'{"user_input": 42}', 400, "invalid_request"),
        (b'{"user_input": "x", "regenerate": "yes"}', 400, "invalid_request"),
        (b'{"user_input": "x", "temperature": 3}', 422, "invalid_parameter"),
        (b'{"user_input": "x", "top_k": -1}', 422, "invalid_parameter"),
        (b'{"user_input": "x", "top_p": 0}', 422, "invalid_parameter"),
        (b'{"user_input": "x", "max_new_tokens": 100000}', 422, "invalid_parameter"),
        (b'{"user_input": "x", "stop": "END"}', 422, "invalid_parameter"),
        (b'{"regenerate": true}', 400, "nothing_to_regenerate"),
    ],
)
def test_bad_body_gets_its_status_and_code_and_leaves_nothing_behind(
    server: tuple[Any, Any, Outcomes], body: bytes, status: int, code: str
) -> None:
    live, chat_stream, outcomes = server
    with live.client() as client:
        response = client.post("/chat_stream", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        error = response.json()
        assert error["error"] == code and error["detail"]
        assert chat_stream.load() == IDLE
        # The session can still chat, and its history holds no trace of the bad request.
        ok = client.post("/chat_stream", json={"user_input": "fine"})
    assert ok.status_code == 200
    assert outcomes.wait() == ["success"]
    prompt = outcomes.calls[0][0].state.session.get_session()["chat_prompt"]
    assert [c.get_message() for c in prompt.requester_messages] == ["fine"]


def test_invalid_parameter_error_names_the_field(server: tuple[Any, Any, Outcomes]) -> None:
    live, _, _ = server
    with live.client() as client:
        response = client.post("/chat_stream", json={"user_input": "x", "top_k_value": 9999})
    assert response.json()["field"] == "top_k_value"
    assert "top_k_value" in response.json()["detail"]


def test_body_over_the_declared_limit_gets_413(server: tuple[Any, Any, Outcomes]) -> None:
    live, chat_stream, outcomes = server
    with live.client() as client:
        response = client.post("/chat_stream", json={"user_input": "x" * 2000})
    assert response.status_code == 413 and response.json()["error"] == "body_too_large"
    assert chat_stream.load() == IDLE and outcomes.calls == []


def test_chunked_body_over_the_limit_gets_413_without_a_content_length(server: tuple[Any, Any, Outcomes]) -> None:
    live, chat_stream, _ = server

    def chunks() -> Any:
        yield b'{"user_input": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    with live.client() as client:
        response = client.post("/chat_stream", content=chunks())
    assert response.status_code == 413 and response.json()["error"] == "body_too_large"
    assert chat_stream.load() == IDLE


def test_full_queue_gets_429_with_retry_after_and_no_callback(
    server: tuple[Any, Any, Outcomes], hooks: ModelHooks
) -> None:
    hooks.step_delay = 0.02
    live, chat_stream, outcomes = server
    running = open_chat(live.url, "running")
    read_until(running, b"\r\n\r\n")
    queued = open_chat(live.url, "queued")
    assert wait_until(lambda: chat_stream.load()["waiting"] == 1)
    with live.client() as client:
        refused = client.post("/chat_stream", json={"user_input": "refused"})
    assert refused.status_code == 429
    assert refused.json()["error"] == "too_many_requests"
    assert int(refused.headers["retry-after"]) >= 1
    for sock in (running, queued):
        read_until(sock, b"0\r\n\r\n")
        sock.close()
    assert outcomes.wait(2) == ["success", "success"]
    assert chat_stream.load() == IDLE


def test_chatstreams_200_mode_for_too_many_requests(make_chat_stream: Any, serve: Any, hooks: ModelHooks) -> None:
    hooks.step_delay = 0.02
    chat_stream = make_chat_stream(
        num_of_concurrent_executions=1, max_queue_size=0, too_many_request_as_http_error=False
    )
    live = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True))
    with live.client() as a, live.client() as b:
        with a.stream("POST", "/chat_stream", json={"user_input": "running"}) as running:
            refused = b.post("/chat_stream", json={"user_input": "refused"})
            running.read()
    assert refused.status_code == 200
    assert json.loads(refused.text)["error"] == "too_many_requests"


def test_forged_session_cookie_gets_a_new_session_not_someone_elses(server: tuple[Any, Any, Outcomes]) -> None:
    live, _, outcomes = server
    with live.client() as victim:
        victim.post("/chat_stream", json={"user_input": "secret"})
        victim_cookie = victim.cookies["chatstream_session"]
    outcomes.wait(1)
    session_id = victim_cookie.rsplit(".", 1)[0]
    with live.client(cookies={"chatstream_session": session_id + ".forgedsignature"}) as attacker:
        response = attacker.post("/chat_stream", json={"user_input": "what did they say?"})
    outcomes.wait(2)
    assert "set-cookie" in response.headers
    prompt = outcomes.calls[1][0].state.session.get_session()["chat_prompt"]
    assert prompt.get_turn() == 1
