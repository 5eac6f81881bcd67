"""`/v1/chat/completions` and `/v1/models`, driven by the official `openai` client."""

from __future__ import annotations

import json
from typing import Any

import anyio
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware

from .conftest import ModelHooks, Outcomes, greedy_reply, wait_until


@pytest.fixture
def v1_server(make_chat_stream: Any, serve: Any) -> Any:
    def start(api_keys: list[str] | None = None, **kwargs: Any) -> tuple[Any, Any, Outcomes]:
        chat_stream = make_chat_stream(**kwargs)
        outcomes = Outcomes()
        app = ChatStreamMiddleware(
            Starlette(), chat_stream=chat_stream, openai=True, callback=outcomes, api_keys=api_keys, health=True
        )
        return serve(app), chat_stream, outcomes

    return start


def _read_events(sock: Any, count: int) -> bytes:
    data = b""
    while data.count(b"data: ") < count:
        chunk = sock.recv(4096)
        assert chunk, "server closed the connection"
        data += chunk
    return data


def _client(server: Any, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


HI = [{"role": "user", "content": "Hello 日本 😀"}]


def test_models_lists_the_servers_name(v1_server: Any) -> None:
    server, _chat_stream, _ = v1_server(name="tiny-chat")
    assert [model.id for model in _client(server).models.list()] == ["tiny-chat"]


def test_completion_is_what_model_generate_says(v1_server: Any, model: Any, tokenizer: Any) -> None:
    server, chat_stream, outcomes = v1_server()
    reply = _client(server).chat.completions.create(model=chat_stream.name, messages=HI, max_tokens=12)
    assert reply.choices[0].message.content == greedy_reply(model, tokenizer, HI[0]["content"], 12)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    assert outcomes.wait() == ["success"]


def test_streamed_completion_concatenates_to_the_same_text_and_ends_with_usage(
    v1_server: Any, model: Any, tokenizer: Any
) -> None:
    server, chat_stream, outcomes = v1_server()
    stream = _client(server).chat.completions.create(
        model=chat_stream.name,
        messages=HI,
        max_completion_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == greedy_reply(model, tokenizer, HI[0]["content"], 10)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert outcomes.wait() == ["success"]


def test_async_client_streams_and_completes(v1_server: Any) -> None:
    server, chat_stream, _ = v1_server()

    async def talk() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        whole = await client.chat.completions.create(model=chat_stream.name, messages=HI, max_tokens=6)
        stream = await client.chat.completions.create(model=chat_stream.name, messages=HI, max_tokens=6, stream=True)
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        await client.close()
        return whole.choices[0].message.content or "", "".join(pieces)

    whole, streamed = anyio.run(talk)
    assert whole == streamed and whole


def test_emitted_json_matches_the_shapes_the_client_parses(v1_server: Any) -> None:
    server, chat_stream, _ = v1_server()
    with server.client() as client:
        whole = client.post("/v1/chat/completions", json={"model": chat_stream.name, "messages": HI, "max_tokens": 4})
        streamed = client.post(
            "/v1/chat/completions",
            json={"messages": HI, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}},
        )
    ChatCompletion.model_validate(whole.json())
    events = [line[6:] for line in streamed.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        ChatCompletionChunk.model_validate(json.loads(event))
    assert "set-cookie" not in whole.headers and "set-cookie" not in streamed.headers  # stateless


def test_system_messages_and_text_parts_are_understood(v1_server: Any, tokenizer: Any) -> None:
    server, chat_stream, _outcomes = v1_server(stream_format="sse")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]
    reply = _client(server).chat.completions.create(model=chat_stream.name, messages=messages, max_tokens=3)  # type: ignore[arg-type]
    flat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = len(
        tokenizer(tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True))["input_ids"]
    )
    assert reply.usage is not None and reply.usage.prompt_tokens == expected


@pytest.mark.parametrize(
    ("body", "status", "error_class"),
    [
        ({"model": "gpt-4", "messages": HI}, 404, openai.NotFoundError),
        ({"messages": HI, "n": 2}, 400, openai.BadRequestError),
        ({"messages": []}, 400, openai.BadRequestError),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, openai.BadRequestError),
        ({"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, openai.BadRequestError),
        ({"messages": HI, "temperature": 3}, 422, openai.UnprocessableEntityError),
        ({"messages": HI, "max_tokens": 10**6}, 422, openai.UnprocessableEntityError),
    ],
)
def test_bad_requests_get_openais_error_shape_and_status(
    v1_server: Any, body: dict[str, Any], status: int, error_class: type[Exception]
) -> None:
    server, chat_stream, outcomes = v1_server()
    with server.client() as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    with pytest.raises(error_class):
        _client(server).chat.completions.create(**{"model": chat_stream.name, **body})
    assert outcomes.calls == [] and chat_stream.load()["processing"] == 0


def test_parameter_error_names_the_clients_own_key(v1_server: Any) -> None:
    server, _, _ = v1_server()
    with server.client() as client:
        error = client.post("/v1/chat/completions", json={"messages": HI, "max_completion_tokens": 0}).json()["error"]
    assert error["param"] == "max_completion_tokens" and error["code"] == "invalid_parameter"


def test_oversized_body_is_413_in_openai_shape(make_chat_stream: Any, serve: Any) -> None:
    app = ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(), openai=True, max_body_size=100)
    with serve(app).client() as client:
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 200}]})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_full_queue_is_429_rate_limit(v1_server: Any, hooks: ModelHooks) -> None:
    from .conftest import socket

    hooks.step_delay = 0.02
    server, chat_stream, outcomes = v1_server(num_of_concurrent_executions=1, max_queue_size=0, max_new_tokens=500)
    host, port = server.url.removeprefix("http://").split(":")
    running = socket.create_connection((host, int(port)), timeout=30)
    body = json.dumps({"messages": HI, "stream": True}).encode()
    running.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    _read_events(running, 2)  # the role chunk, then text
    with pytest.raises(openai.RateLimitError):
        _client(server).chat.completions.create(model=chat_stream.name, messages=HI)
    running.close()
    assert outcomes.wait() == ["client_disconnected_while_streaming"]


def test_api_keys_guard_v1_but_not_health(v1_server: Any) -> None:
    server, chat_stream, _ = v1_server(api_keys=["k1", "k2"])
    with pytest.raises(openai.AuthenticationError):
        _client(server, "wrong").models.list()
    assert [m.id for m in _client(server, "k2").models.list()] == [chat_stream.name]
    with server.client() as client:
        refused = client.post("/v1/chat/completions", json={"messages": HI})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert client.get("/health").status_code == 200


def test_client_leaving_a_v1_stream_stops_generation(v1_server: Any, hooks: ModelHooks) -> None:
    from .conftest import socket

    hooks.step_delay = 0.02
    server, chat_stream, outcomes = v1_server(max_new_tokens=200)
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    body = json.dumps({"messages": HI, "stream": True}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    _read_events(sock, 2)  # the role chunk, then text
    sock.close()
    assert outcomes.wait() == ["client_disconnected_while_streaming"]
    stats = outcomes.calls[0][0].state.chat_generation
    assert stats.steps_after_cancel <= 1 and stats.completion_tokens < 200
    assert wait_until(lambda: chat_stream.load()["processing"] == 0)


def test_v1_is_off_unless_switched_on(make_chat_stream: Any, serve: Any) -> None:
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(), serve=True))
    with server.client() as client:
        assert client.get("/v1/models").status_code == 404
