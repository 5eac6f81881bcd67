"""The page's "New chat" (POST /new_chat) and a chat's `system` text."""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import unquote

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette

from chatstream_asgi import ChatPrompt, ChatStream, ChatStreamMiddleware
from chatstream_asgi.engine.mock import MockEngine

from .conftest import open_chat, wait_until


def _page_server(make_chat_stream: Any, serve: Any) -> Any:
    return serve(
        ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(max_new_tokens=4), webui=True, serve=True)
    )


def _history(client: Any) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = client.get("/get_history").json()["messages"]
    return messages


def test_new_chat_starts_an_empty_conversation_and_keeps_the_old_one_on_the_server(
    make_chat_stream: Any, serve: Any
) -> None:
    server = _page_server(make_chat_stream, serve)
    with server.client() as client:
        assert client.post("/chat_stream", json={"user_input": "first conversation"}).status_code == 200
        old_cookie = client.cookies["chatstream_session"]
        response = client.post("/new_chat", json={})
        assert response.status_code == 200 and response.json() == {"success": True}
        new_cookie = client.cookies["chatstream_session"]
        assert new_cookie != old_cookie
        assert _history(client) == []
    with server.client(cookies={"chatstream_session": old_cookie}) as old:
        assert [m["content"] for m in _history(old)][:1] == ["first conversation"]


def test_system_text_sent_with_a_chat_becomes_the_conversations_system_message(
    make_chat_stream: Any, serve: Any
) -> None:
    chat_stream = make_chat_stream(max_new_tokens=4, allow_system_prompt=True)
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, apis={"all": True}))
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "hi", "system": "Answer like a pirate."})
        client.post("/chat_stream", json={"user_input": "and again"})  # no system: the conversation keeps its own
        prompt = unquote(client.get("/get_prompt").json()["prompt"])  # ChatStream's get_prompt is URL-encoded
    assert prompt.startswith("<|system|>Answer like a pirate.<|end|>")
    assert prompt.count("pirate") == 1


def test_a_system_text_is_refused_unless_the_server_allows_it(make_chat_stream: Any, serve: Any) -> None:
    class Guarded(ChatPrompt):
        def build_initial_prompt(self, chat_prompt: Any) -> None:
            chat_prompt.set_system("Never reveal the secret.")

    chat_stream = make_chat_stream(max_new_tokens=4, chat_prompt_clazz=Guarded)
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, apis={"all": True}))
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "hi"})
        refused = client.post("/chat_stream", json={"user_input": "hi", "system": ""})
        prompt = unquote(client.get("/get_prompt").json()["prompt"])
    assert refused.status_code == 400 and "allow_system_prompt" in refused.json()["detail"]
    assert prompt.startswith("<|system|>Never reveal the secret.<|end|>")


def test_a_refused_turn_leaves_the_system_text_as_it_was(make_chat_stream: Any, serve: Any) -> None:
    chat_stream = make_chat_stream(max_new_tokens=4, allow_system_prompt=True)
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, apis={"all": True}))
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "hi", "system": "first system"})
        refused = client.post("/chat_stream", json={"user_input": "hi", "system": "second", "temperature": 9})
        prompt = unquote(client.get("/get_prompt").json()["prompt"])
    assert refused.status_code == 422
    assert prompt.startswith("<|system|>first system<|end|>")


def test_a_system_that_is_not_a_string_is_refused(make_chat_stream: Any, serve: Any) -> None:
    chat_stream = make_chat_stream(max_new_tokens=4, allow_system_prompt=True)
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True))
    with server.client() as client:
        response = client.post("/chat_stream", json={"user_input": "hi", "system": 3})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request" and "'system'" in response.json()["detail"]


def test_new_chat_works_on_a_page_mounted_by_append_apis(serve: Any) -> None:
    chat_stream = ChatStream(engine=MockEngine(tokens_per_second=1000))
    app = FastAPI()
    app.add_middleware(ChatStreamMiddleware, chat_stream=chat_stream)
    chat_stream.append_apis(app, {"all": True})
    with serve(app).client() as client:
        client.post("/chat_stream", json={"user_input": "first conversation"})
        old_cookie = client.cookies["chatstream_session"]
        assert client.post("/new_chat", json={}).json() == {"success": True}
        assert client.cookies["chatstream_session"] != old_cookie
        assert _history(client) == []
    with serve(app).client(cookies={"chatstream_session": old_cookie}) as old:
        assert [m["content"] for m in _history(old)][:1] == ["first conversation"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"}],
    ids=["none", "form", "text"],
)
def test_new_chat_from_a_form_is_refused_and_keeps_the_conversation(
    make_chat_stream: Any, serve: Any, headers: dict[str, str]
) -> None:
    server = _page_server(make_chat_stream, serve)
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "keep me"})
        cookie = client.cookies["chatstream_session"]
        refused = client.post("/new_chat", content=b"a=1", headers=headers)
        assert refused.status_code == 415 and refused.json()["error"] == "unsupported_media_type"
        assert "set-cookie" not in refused.headers and client.cookies["chatstream_session"] == cookie
        assert [m["content"] for m in _history(client)][:1] == ["keep me"]


def test_new_chat_on_an_append_apis_page_refuses_a_form_too(serve: Any) -> None:
    chat_stream = ChatStream(engine=MockEngine(tokens_per_second=1000))
    app = FastAPI()
    app.add_middleware(ChatStreamMiddleware, chat_stream=chat_stream)
    chat_stream.append_apis(app, {"all": True})
    with serve(app).client() as client:
        refused = client.post(
            "/new_chat", content=b"a=1", headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
    assert refused.status_code == 415 and refused.json()["error"] == "unsupported_media_type"
    assert "set-cookie" not in refused.headers


def test_a_system_text_given_by_a_turn_whose_client_left_before_any_reply_is_not_kept(
    make_chat_stream: Any, serve: Any, hooks: Any
) -> None:
    chat_stream = make_chat_stream(max_new_tokens=4, allow_system_prompt=True)
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, apis={"all": True}))
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "hi", "system": "first system"})
        cookie = f"chatstream_session={client.cookies['chatstream_session']}"
        hooks.hold = threading.Event()  # the model is stuck: no reply text will come
        hooks.prefill_started.clear()
        sock = open_chat(server.url, "again", cookie, system="second system")
        assert hooks.prefill_started.wait(30)
        sock.close()  # the client leaves before the first token
        hooks.hold.set()
        assert wait_until(lambda: chat_stream.load()["processing"] == 0)
        prompt = unquote(client.get("/get_prompt").json()["prompt"])
    assert prompt.startswith("<|system|>first system<|end|>")


def test_the_page_is_told_whether_the_server_takes_a_system_text_and_params_cannot_say_otherwise(
    make_chat_stream: Any, serve: Any
) -> None:
    app = ChatStreamMiddleware(
        Starlette(), chat_stream=make_chat_stream(), webui=True, web_ui_params={"system_prompt": "Be brief."}
    )
    with serve(app).client() as client:
        page = client.get("/").text
    assert '"system_prompt": false' in page


def test_new_chat_without_the_middlewares_sessions_says_what_it_needs(serve: Any) -> None:
    chat_stream = ChatStream(engine=MockEngine(tokens_per_second=1000))
    app = FastAPI()
    chat_stream.append_apis(app, {"all": True})  # no middleware: the app's own sessions, if any
    with serve(app).client() as client:
        response = client.post("/new_chat", json={})
    assert response.status_code == 501 and response.json()["error"] == "not_supported"
    assert "append_middlewares" in response.json()["detail"]
