"""`X-Request-Id` on every response the middleware serves, and on every log line about the request."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from chatstream_asgi import ChatStreamMiddleware

from .conftest import Outcomes, open_chat, read_until, wait_until


async def _own_route(request: Any) -> PlainTextResponse:
    return PlainTextResponse("the app's own")


def _app(chat_stream: Any, **kwargs: Any) -> ChatStreamMiddleware:
    return ChatStreamMiddleware(
        Starlette(routes=[Route("/own", _own_route)]),
        chat_stream=chat_stream,
        serve=True,
        openai=True,
        health=True,
        metrics=True,
        apis={"all": True},
        **kwargs,
    )


def test_every_served_route_answers_with_a_fresh_request_id(make_chat_stream: Any, serve: Any) -> None:
    server = serve(_app(make_chat_stream()))
    hi = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with server.client() as client:
        responses = [
            client.post("/chat_stream", json={"user_input": "Hi", "max_new_tokens": 2}),
            client.post("/chat_stream", content=b"not json"),
            client.post("/v1/chat/completions", json=hi),
            client.get("/v1/models"),
            client.get("/get_generation_params"),
            client.get("/health"),
            client.get("/metrics"),
        ]
    ids = [response.headers.get("x-request-id") for response in responses]
    assert all(request_id is not None and re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids), ids
    assert len(set(ids)) == len(ids)


def test_a_clients_own_sane_request_id_is_kept(make_chat_stream: Any, serve: Any) -> None:
    server = serve(_app(make_chat_stream()))
    with server.client() as client:
        response = client.post(
            "/chat_stream", json={"user_input": "Hi", "max_new_tokens": 2}, headers={"X-Request-Id": "lb-7f3a/2:x.y+z="}
        )
    assert response.headers["x-request-id"] == "lb-7f3a/2:x.y+z="


@pytest.mark.parametrize(
    "sent",
    ["x" * 129, "caf\u00e9", "", "a] chat ended: success [request b", "a b"],
    ids=["too-long", "not-ascii", "empty", "posing-as-a-log-line", "with-a-space"],
)
def test_an_unfit_client_request_id_is_replaced(make_chat_stream: Any, serve: Any, sent: str) -> None:
    server = serve(_app(make_chat_stream()))
    with server.client() as client:
        response = client.get("/health", headers={"X-Request-Id": sent.encode("latin-1")})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_the_apps_own_routes_get_no_request_id(make_chat_stream: Any, serve: Any) -> None:
    server = serve(_app(make_chat_stream()))
    with server.client() as client:
        response = client.get("/own")
    assert response.text == "the app's own" and "x-request-id" not in response.headers


def test_log_lines_about_a_chat_carry_its_request_id(
    make_chat_stream: Any, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes = Outcomes()
    server = serve(_app(make_chat_stream(), callback=outcomes))
    caplog.set_level(logging.INFO, logger="chatstream_asgi")
    with server.client() as client:
        ok = client.post("/chat_stream", json={"user_input": "Hi", "max_new_tokens": 2})
        refused = client.post("/chat_stream", json={"user_input": 5})
    outcomes.wait()
    by_id: dict[str, list[str]] = {}
    for record in caplog.records:
        by_id.setdefault(getattr(record, "request_id", ""), []).append(record.getMessage())
    assert any("chat ended: success" in line for line in by_id[ok.headers["x-request-id"]])
    assert any("invalid_request" in line for line in by_id[refused.headers["x-request-id"]])


def test_a_callback_that_raises_is_logged_with_the_request_id(
    make_chat_stream: Any, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(request: Any, outcome: str) -> None:
        raise RuntimeError("callback bug")

    server = serve(_app(make_chat_stream(), callback=broken))
    with server.client() as client:
        response = client.post("/chat_stream", json={"user_input": "Hi", "max_new_tokens": 2})

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.levelno == logging.ERROR and "callback" in r.getMessage()]

    assert wait_until(lambda: bool(logged()))  # the callback runs once the reply is out
    [record] = logged()
    assert record.request_id == response.headers["x-request-id"]  # type: ignore[attr-defined]


def test_prompts_and_replies_are_not_logged_by_default(
    make_chat_stream: Any, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes = Outcomes()
    server = serve(_app(make_chat_stream(), callback=outcomes))
    caplog.set_level(logging.DEBUG)
    with server.client() as client:
        reply = client.post("/chat_stream", json={"user_input": "my secret question", "max_new_tokens": 6}).text
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "other secret"}]})
    outcomes.wait(2)
    assert caplog.records and reply.strip()  # the chats were logged, without their words
    assert not any("secret" in r.getMessage() or reply in r.getMessage() for r in caplog.records)


def test_log_content_logs_the_prompt_and_the_reply(
    make_chat_stream: Any, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes = Outcomes()
    server = serve(_app(make_chat_stream(), callback=outcomes, log_content=True))
    caplog.set_level(logging.INFO, logger="chatstream_asgi")
    sock = open_chat(server.url, "my question")
    reply = read_until(sock, b"0\r\n\r\n")
    sock.close()
    outcomes.wait()
    lines = [r.getMessage() for r in caplog.records]
    assert any("my question" in line for line in lines)
    assert any(line.startswith("reply: ") for line in lines) and reply
