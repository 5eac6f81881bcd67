"""API keys with scopes: `chat`, `apis`, `admin`; 401 without a key, 403 without the scope."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware

KEYS = {"chatter": ["chat"], "helper": ["apis"], "root": ["chat", "apis", "admin"], "listed": []}
HI = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture
def scoped_server(make_chat_stream: Any, serve: Any) -> Any:
    app = ChatStreamMiddleware(
        Starlette(),
        chat_stream=make_chat_stream(),
        serve=True,
        openai=True,
        apis={"all": True},
        metrics=True,
        health=True,
        api_keys=KEYS,
    )
    return serve(app)


def _call(client: Any, route: str, key: str | None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if route == "/chat_stream":
        return client.post(route, json={"user_input": "Hi", "max_new_tokens": 2}, headers=headers)
    if route == "/v1/chat/completions":
        return client.post(route, json=HI, headers=headers)
    return client.get(route, headers=headers)


ROUTES = {
    "/chat_stream": "chat",
    "/v1/chat/completions": "chat",
    "/v1/models": "chat",
    "/get_generation_params": "apis",
    "/get_load": "apis",
    "/get_prompt": "admin",
    "/get_resource_usage": "admin",
    "/metrics": "admin",
}


def test_each_route_answers_only_keys_with_its_scope(scoped_server: Any) -> None:
    with scoped_server.client() as client:
        for route, needed in ROUTES.items():
            for key, scopes in KEYS.items():
                status = _call(client, route, key).status_code
                assert status == (200 if needed in scopes else 403), (route, key, status)


def test_no_key_or_an_unknown_key_gets_401_in_the_routes_own_shape(scoped_server: Any) -> None:
    with scoped_server.client() as client:
        plain = _call(client, "/chat_stream", None)
        chatstream = _call(client, "/get_load", "wrong")
        openai = _call(client, "/v1/chat/completions", "wrong")
        assert client.get("/health").status_code == 200
    assert plain.status_code == 401 and plain.json()["error"] == "unauthorized"
    assert chatstream.status_code == 401 and chatstream.json()["success"] is False
    assert openai.status_code == 401 and openai.json()["error"]["code"] == "unauthorized"


def test_a_key_without_the_scope_gets_403_in_the_routes_own_shape(scoped_server: Any) -> None:
    with scoped_server.client() as client:
        plain = _call(client, "/chat_stream", "helper")
        chatstream = _call(client, "/get_prompt", "helper")
        openai = _call(client, "/v1/chat/completions", "helper")
        metrics = _call(client, "/metrics", "chatter")
    assert plain.status_code == 403 and plain.json()["error"] == "forbidden"
    assert chatstream.status_code == 403 and chatstream.json()["success"] is False
    assert openai.json()["error"]["code"] == "forbidden" and openai.json()["error"]["type"] == "permission_error"
    assert metrics.status_code == 403 and "admin" in metrics.json()["detail"]


def test_unknown_scopes_and_malformed_keys_are_refused_at_start(make_chat_stream: Any) -> None:
    chat_stream = make_chat_stream()
    for keys in ({"k": ["chat", "root"]}, {"k": "chat"}, "k", {"": ["chat"]}, [""]):
        with pytest.raises(ValueError):
            ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, api_keys=keys)


def test_keys_guard_the_chat_and_the_apis_the_app_mounted_with_append_apis(make_chat_stream: Any, serve: Any) -> None:
    chat_stream = make_chat_stream()
    app = Starlette()
    chat_stream.append_apis(app, {"all": True})
    server = serve(ChatStreamMiddleware(app, chat_stream=chat_stream, api_keys=KEYS))
    mounted = {route: needed for route, needed in ROUTES.items() if not route.startswith(("/v1", "/metrics"))}
    with server.client() as client:
        for route, needed in mounted.items():
            assert _call(client, route, None).status_code == 401, route
            for key, scopes in KEYS.items():
                status = _call(client, route, key).status_code
                assert status == (200 if needed in scopes else 403), (route, key, status)
        cleared = client.post("/clear_context", headers={"Authorization": "Bearer chatter"})
        assert cleared.status_code == 403 and cleared.json()["success"] is False
