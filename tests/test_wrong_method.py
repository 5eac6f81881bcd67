"""A wrong method on a route the middleware serves is 405 JSON naming the method to use (DESIGN §3)."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from chatstream_asgi import ChatStreamMiddleware


@pytest.fixture
def server(make_chat_stream: Any, serve: Any) -> Any:
    app = ChatStreamMiddleware(
        Starlette(),
        chat_stream=make_chat_stream(),
        serve=True,
        health=True,
        apis={"all": True},
        openai=True,
        webui=True,
    )
    return serve(app)


@pytest.mark.parametrize(
    ("method", "path", "allowed", "shape"),
    [
        ("GET", "/chat_stream", "POST", "plain"),
        ("PUT", "/chat_stream", "POST", "plain"),
        ("GET", "/clear_context", "POST", "chatstream"),
        ("POST", "/get_history", "GET", "chatstream"),
        ("GET", "/v1/chat/completions", "POST", "openai"),
        ("DELETE", "/v1/models", "GET", "openai"),
        ("POST", "/health", "GET", "plain"),
        ("GET", "/new_chat", "POST", "chatstream"),
        ("HEAD", "/chat_stream", "POST", "plain"),
    ],
)
def test_a_wrong_method_is_405_json_naming_the_method_to_use(
    server: Any, method: str, path: str, allowed: str, shape: str
) -> None:
    with server.client() as client:
        response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert response.headers["content-type"].startswith("application/json")
    if method == "HEAD":
        return  # no body to a HEAD
    body = response.json()
    error = body["error"] if shape == "openai" else body
    code = error["code"] if shape == "openai" else error["error"]
    assert code == "method_not_allowed"
    message = error["message"] if shape == "openai" else error["detail"]
    assert f"use {allowed}" in message
    assert "set-cookie" not in response.headers  # a refusal starts no conversation


def test_options_passes_through_to_the_apps_own_handling(make_chat_stream: Any, serve: Any) -> None:
    async def preflight(request: Any) -> PlainTextResponse:
        return PlainTextResponse("app's preflight")

    app = Starlette(routes=[Route("/chat_stream", preflight, methods=["OPTIONS"])])
    server = serve(ChatStreamMiddleware(app, chat_stream=make_chat_stream(), serve=True))
    with server.client() as client:
        response = client.options("/chat_stream")
    assert response.status_code == 200 and response.text == "app's preflight"


def test_a_route_the_middleware_hands_to_the_app_keeps_the_apps_own_answer(make_chat_stream: Any, serve: Any) -> None:
    async def own(request: Any) -> PlainTextResponse:
        return PlainTextResponse("the app's GET")

    app = Starlette(routes=[Route("/chat_stream", own, methods=["GET", "POST"])])
    server = serve(ChatStreamMiddleware(app, chat_stream=make_chat_stream(), serve=False))
    with server.client() as client:
        assert client.get("/chat_stream").text == "the app's GET"


def test_routes_that_are_off_stay_the_apps_404(make_chat_stream: Any, serve: Any) -> None:
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(), serve=True))
    with server.client() as client:
        assert client.get("/v1/chat/completions").status_code == 404
        assert client.get("/new_chat").status_code == 404


@pytest.mark.parametrize("path", ["/health", "/ready", "/get_history", "/v1/models"])
def test_head_on_a_get_route_is_answered_as_get(server: Any, path: str) -> None:
    with server.client() as client:
        head, get = client.head(path), client.get(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""


def test_with_api_keys_a_wrong_method_needs_a_key_like_any_request_of_its_route(
    make_chat_stream: Any, serve: Any
) -> None:
    app = ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(), serve=True, api_keys=["k"])
    with serve(app).client() as client:
        assert client.get("/chat_stream").status_code == 401
        assert client.get("/chat_stream", headers={"Authorization": "Bearer k"}).status_code == 405


def test_the_chat_may_share_the_pages_path_each_answering_its_own_method(make_chat_stream: Any, serve: Any) -> None:
    app = ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(), serve=True, webui=True, path="/")
    with serve(app).client() as client:
        page, head = client.get("/"), client.head("/")
        chat = client.post("/", json={"user_input": "hi", "max_new_tokens": 2})
        wrong = client.put("/")
    assert page.status_code == head.status_code == 200 and "chatstream.js" in page.text and head.content == b""
    assert chat.status_code == 200 and chat.headers["x-chatstream-last-generated-message-id"]
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


def test_with_the_page_on_the_apps_own_post_to_the_root_still_answers(make_chat_stream: Any, serve: Any) -> None:
    async def own(request: Any) -> PlainTextResponse:
        return PlainTextResponse("the app's POST /")

    app = Starlette(routes=[Route("/", own, methods=["POST"])])
    with serve(ChatStreamMiddleware(app, chat_stream=make_chat_stream(), webui=True)).client() as client:
        assert client.post("/").text == "the app's POST /"
        assert client.get("/chatstream.js").status_code == 200
        assert client.head("/chatstream.js").content == b""


def test_options_on_new_chat_and_head_on_a_post_route(server: Any) -> None:
    with server.client() as client:
        assert client.options("/new_chat").status_code != 405  # the app's (here: its 404), for CORS
        head = client.head("/clear_context")
    assert head.status_code == 405 and head.headers["allow"] == "POST"
