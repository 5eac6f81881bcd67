"""Behind ChatStreamMiddleware, `request.state.session` is there on every path of the app, as
fastsession's was, opened only when a route reads it; a value JSON cannot hold is refused with
a 500 naming its key instead of failing at save time."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI, Request

from chatstream_asgi import ChatStream, ChatStreamMiddleware, MemoryStore


@pytest.fixture
def session_app(serve: Any) -> tuple[Any, MemoryStore]:
    chat_stream = ChatStream(use_mock_response=True, mock_params={"type": "echo", "time_per_token_sec": 0})
    store = MemoryStore()
    app = FastAPI()
    app.add_middleware(ChatStreamMiddleware, chat_stream=chat_stream, session_store=store)

    @app.post("/note")
    async def set_note(request: Request) -> Any:
        request.state.session.get_session()["note"] = (await request.json())["note"]
        request.state.session.save_session()
        return {"id": request.state.session.get_session_id()}

    @app.get("/note")
    async def get_note(request: Request) -> Any:
        data = request.state.session.get_session()
        prompt = data.get("chat_prompt")
        return {
            "note": data.get("note"),
            "turns": prompt.get_turn() if prompt else 0,
            "id": request.state.session.get_session_id(),
        }

    @app.post("/forget")
    async def forget(request: Request) -> Any:
        request.state.session.clear_session()
        return {"ok": True}

    @app.post("/bad")
    async def bad(request: Request) -> Any:
        request.state.session.get_session()["tags"] = {"a", "b"}
        request.state.session.save_session()
        return {"ok": True}

    @app.get("/plain")
    async def plain() -> Any:
        return {"ok": True}

    @app.post("/api/chat")
    async def chat(request: Request) -> Any:
        return await chat_stream.handle_chat_stream_request(request)

    return serve(app), store


def test_an_apps_own_route_keeps_values_in_the_session_across_requests(session_app: Any) -> None:
    server, _ = session_app
    with server.client() as client:
        first = client.post("/note", json={"note": "remember me"})
        assert "chatstream_session" in first.headers["set-cookie"]
        read = client.get("/note").json()
    assert read["note"] == "remember me" and read["id"] == first.json()["id"]


def test_a_route_that_never_reads_the_session_gets_no_cookie_and_stores_nothing(session_app: Any) -> None:
    server, store = session_app
    with server.client() as client:
        response = client.get("/plain")
    assert response.status_code == 200 and "set-cookie" not in response.headers
    assert len(store) == 0


def test_clear_session_empties_it(session_app: Any) -> None:
    server, _ = session_app
    with server.client() as client:
        client.post("/note", json={"note": "x"})
        client.post("/forget")
        assert client.get("/note").json()["note"] is None


def test_a_value_json_cannot_hold_is_refused_naming_its_key_and_nothing_is_stored(session_app: Any) -> None:
    server, store = session_app
    with server.client() as client:
        response = client.post("/bad")
    assert response.status_code == 500
    assert response.json()["error"] == "session_value_not_storable" and "'tags'" in response.json()["detail"]
    assert len(store) == 0


def test_a_chat_endpoint_on_its_own_path_uses_the_middlewares_session(session_app: Any) -> None:
    server, _ = session_app
    with server.client() as client:
        assert client.post("/api/chat", json={"user_input": "one"}).text == "one"
        assert client.post("/api/chat", json={"user_input": "two"}).text == "two"
        assert client.get("/note").json()["turns"] == 2
