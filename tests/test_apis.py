"""ChatStream's conversation APIs: its names and shapes, with real statuses for errors."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import pytest
from fastapi import FastAPI, Request
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware
from chatstream_asgi.asgi.conversation_apis import enabled_apis

from .conftest import Outcomes, wait_until


@pytest.fixture
def api_server(make_chat_stream: Any, serve: Any) -> Any:
    def start(apis: Any = None, **kwargs: Any) -> tuple[Any, Any, Outcomes]:
        chat_stream = make_chat_stream(**kwargs)
        outcomes = Outcomes()
        app = ChatStreamMiddleware(
            Starlette(), chat_stream=chat_stream, serve=True, callback=outcomes, apis=apis or {"all": True}
        )
        return serve(app), chat_stream, outcomes

    return start


def _chat(client: Any, outcomes: Outcomes, text: str, **extra: Any) -> Any:
    expected = len(outcomes.calls) + 1
    response = client.post("/chat_stream", json={"user_input": text, **extra})
    outcomes.wait(expected)
    return response


def test_clear_context_forgets_the_conversation(api_server: Any) -> None:
    server, _, outcomes = api_server()
    with server.client() as client:
        _chat(client, outcomes, "remember this")
        cleared = client.post("/clear_context")
        _chat(client, outcomes, "fresh start")
    assert cleared.status_code == 200
    assert cleared.json() == {"success": True, "message": "Context successfully cleared"}
    prompt = outcomes.calls[-1][0].state.session.get_session()["chat_prompt"]
    assert [c.get_message() for c in prompt.requester_messages] == ["fresh start"]


def test_get_prompt_returns_the_url_quoted_prompt(api_server: Any) -> None:
    server, _, outcomes = api_server()
    with server.client() as client:
        empty = client.get("/get_prompt").json()
        _chat(client, outcomes, "Hello 日本")
        prompt = client.get("/get_prompt").json()
    assert empty == {"success": True, "message": "no prompt", "prompt": None}
    text = urllib.parse.unquote(prompt["prompt"])
    assert prompt["success"] is True and text.startswith("<|user|>Hello 日本<|end|>\n<|assistant|>")


def test_get_prompt_is_off_unless_switched_on(make_chat_stream: Any, serve: Any) -> None:
    server = serve(
        ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(), serve=True, apis={"exclude": ["get_prompt"]})
    )
    with server.client() as client:
        assert client.get("/get_prompt").status_code == 404
        assert client.get("/get_load").status_code == 200
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(), serve=True))
    with server.client() as client:
        assert client.get("/get_load").status_code == 404  # no apis= at all: nothing is mounted


def test_generation_params_round_trip_with_chatstream_names_and_aliases(api_server: Any) -> None:
    server, _, _ = api_server(temperature=0.7, max_new_tokens=24)
    with server.client() as client:
        before = client.get("/get_generation_params").json()
        stored = client.post("/set_generation_params", json={"temperature": 0, "top_k": 10, "top_p_value": 0.5}).json()
        after = client.get("/get_generation_params").json()
    assert before["generation_params"] == {
        "temperature": 0.7,
        "top_k_value": 50,
        "top_p_value": 0.9,
        "max_new_tokens": 24,
    }
    expected = {"temperature": 0.0, "top_k_value": 10, "top_p_value": 0.5, "max_new_tokens": 24}
    assert stored == {"success": True, "message": "success", "generation_params": expected}
    assert after["generation_params"] == expected


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_k_value": 501}, "top_k_value"),
        ({"top_p": 0}, "top_p"),
        ({"max_new_tokens": 25}, "max_new_tokens"),
        ({"temperature": 0.5, "top_k_value": "ten"}, "top_k_value"),
    ],
)
def test_bad_generation_parameter_is_422_naming_it_and_nothing_is_stored(
    api_server: Any, body: dict[str, Any], field: str
) -> None:
    server, _, _ = api_server(max_new_tokens=24)
    with server.client() as client:
        client.post("/set_generation_params", json={"temperature": 0.1})
        refused = client.post("/set_generation_params", json=body)
        after = client.get("/get_generation_params").json()["generation_params"]
    assert refused.status_code == 422
    error = refused.json()
    assert error["success"] is False and error["error"] == "invalid_parameter" and error["field"] == field
    assert after["temperature"] == 0.1 and after["top_k_value"] == 50


def test_unknown_parameter_or_bad_json_is_400(api_server: Any) -> None:
    server, _, _ = api_server()
    with server.client() as client:
        unknown = client.post("/set_generation_params", json={"temprature": 0.1})
        bad_json = client.post("/set_generation_params", content=b"{oops", headers={"Content-Type": "application/json"})
    assert unknown.status_code == 400 and "temprature" in unknown.json()["detail"]
    assert bad_json.status_code == 400 and bad_json.json()["error"] == "invalid_json"


def test_null_returns_a_parameter_to_the_server_default(api_server: Any) -> None:
    server, _, _ = api_server()
    with server.client() as client:
        client.post("/set_generation_params", json={"top_k_value": 3})
        reset = client.post("/set_generation_params", json={"top_k_value": None}).json()
    assert reset["generation_params"]["top_k_value"] == 50


def test_session_parameters_shape_the_next_reply(api_server: Any) -> None:
    server, _, outcomes = api_server(stream_format="sse", max_new_tokens=24)
    with server.client() as client:
        client.post("/set_generation_params", json={"max_new_tokens": 4})
        reply = _chat(client, outcomes, "hi")
        overridden = _chat(client, outcomes, "again", max_new_tokens=6)
    for response, tokens in ((reply, 4), (overridden, 6)):
        done = json.loads(response.text.strip().split("\r\n\r\n")[-1].split("data: ", 1)[1])
        assert done["usage"]["completion_tokens"] == tokens


def test_feedback_reaches_the_callback_with_the_prompt_up_to_that_message(make_chat_stream: Any, serve: Any) -> None:
    received: list[dict[str, Any]] = []
    outcomes = Outcomes()
    app = ChatStreamMiddleware(
        Starlette(),
        chat_stream=make_chat_stream(),
        serve=True,
        callback=outcomes,
        apis={"include": ["set_feedback"], "on_feedback_received": received.append},
    )
    server = serve(app)
    with server.client() as client:
        first = _chat(client, outcomes, "first question")
        _chat(client, outcomes, "second question")
        message_id = first.headers["x-chatstream-last-generated-message-id"]
        answer = client.post(
            "/set_feedback", json={"message_id": message_id, "is_like": True, "form_data": {"why": "ok"}}
        )
    assert answer.json() == {"success": True, "message": "success", "target_message_id": message_id}
    (feedback,) = received
    assert feedback["is_like"] is True and feedback["form_data"] == {"why": "ok"}
    assert feedback["target_message"] == first.text
    assert feedback["prompt"].endswith(first.text + "<|end|>\n") and "second question" not in feedback["prompt"]


def test_feedback_on_an_unknown_message_is_404(api_server: Any) -> None:
    server, _, outcomes = api_server()
    with server.client() as client:
        _chat(client, outcomes, "hi")
        unknown = client.post("/set_feedback", json={"message_id": "no-such-id", "is_like": False})
        missing = client.post("/set_feedback", json={"is_like": True})
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"


def test_feedback_receiver_that_raises_does_not_fail_the_request(make_chat_stream: Any, serve: Any) -> None:
    def broken(data: dict[str, Any]) -> None:
        raise RuntimeError("receiver bug")

    outcomes = Outcomes()
    app = ChatStreamMiddleware(
        Starlette(),
        chat_stream=make_chat_stream(),
        serve=True,
        callback=outcomes,
        apis={"all": True, "on_feedback_received": broken},
    )
    server = serve(app)
    with server.client() as client:
        reply = _chat(client, outcomes, "hi")
        answer = client.post(
            "/set_feedback", json={"message_id": reply.headers["x-chatstream-last-generated-message-id"]}
        )
    assert answer.status_code == 200


def test_get_load_and_resource_usage_in_chatstreams_shapes(api_server: Any) -> None:
    server, chat_stream, _ = api_server()
    with server.client() as client:
        load = client.get("/get_load").json()
        usage = client.get("/get_resource_usage").json()
        assert "set-cookie" not in client.get("/get_load").headers  # no session needed
    assert load == {
        "success": True,
        "message": "success",
        "chatstream_workers": [
            {"name": chat_stream.name, "processing": 0, "waiting": 0, "max_processing": 2, "max_waiting": 5}
        ],
    }
    (memory,) = usage["memory_usage"]
    assert memory["name"] == chat_stream.name and memory["cpu"]["used_memory"] > 0
    assert memory["cpu"]["total_memory"] >= memory["cpu"]["used_memory"] and isinstance(memory["gpus"], list)


def test_session_apis_issue_the_session_cookie(api_server: Any) -> None:
    server, _, _ = api_server()
    with server.client() as client:
        first = client.post("/set_generation_params", json={"temperature": 0.2})
        second = client.get("/get_generation_params")
    assert "chatstream_session=" in first.headers["set-cookie"] and "HttpOnly" in first.headers["set-cookie"]
    assert "set-cookie" not in second.headers and second.json()["generation_params"]["temperature"] == 0.2


def test_append_apis_mounts_routes_on_a_fastapi_app_and_the_middleware_gives_them_sessions(
    make_chat_stream: Any, serve: Any
) -> None:
    chat_stream = make_chat_stream()
    outcomes = Outcomes()
    app = FastAPI()
    app.add_middleware(ChatStreamMiddleware, chat_stream=chat_stream)
    chat_stream.append_apis(app, {"include": ["clear_context", "get_generation_params", "set_generation_params"]})

    @app.post("/chat_stream")
    async def stream_api(request: Request) -> Any:
        return await chat_stream.handle_chat_stream_request(request, callback=outcomes)

    server = serve(app)
    with server.client() as client:
        client.post("/set_generation_params", json={"top_k": 7})
        assert client.get("/get_generation_params").json()["generation_params"]["top_k_value"] == 7
        _chat(client, outcomes, "hi")
        assert client.post("/clear_context").json()["success"] is True
        assert client.get("/get_load").status_code == 404  # not included
    assert wait_until(lambda: outcomes.outcomes == ["success"])


def test_api_route_without_the_middleware_says_what_is_missing(make_chat_stream: Any) -> None:
    from starlette.testclient import TestClient

    chat_stream = make_chat_stream()
    app = Starlette()
    chat_stream.append_apis(app, {"include": ["clear_context"]})
    with TestClient(app) as client, pytest.raises(RuntimeError, match="ChatStreamMiddleware"):
        client.post("/clear_context")


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"all": True, "exclude": ["get_load"]}, "exactly one"),
        ({"include": ["get_lod"]}, "unknown API"),
        ({"include": ["chat_stream"]}, "serve=True"),
    ],
)
def test_bad_api_options_are_refused_at_start(opts: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        enabled_apis(opts)
