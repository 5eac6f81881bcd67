"""The engines behind the protocol: a remote OpenAI-compatible server, the mock, local replicas."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from starlette.applications import Starlette

from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.engine import MockEngine, OpenAIEngine

from .conftest import ModelHooks, Outcomes, greedy_reply, open_chat, read_until, wait_until


def _sse_deltas(body: str) -> str:
    return "".join(
        json.loads(frame.split("data: ", 1)[1])["delta"]
        for frame in body.split("\r\n\r\n")
        if frame.startswith("data: ")
    )


@pytest.fixture
def upstream(make_chat_stream: Any, serve: Any) -> tuple[Any, Any, Outcomes]:
    """A chatstream-asgi server with the tiny model, speaking /v1: the 'vLLM' of these tests."""
    chat_stream = make_chat_stream(max_new_tokens=200, name="tiny")
    outcomes = Outcomes()
    return (
        serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, openai=True, callback=outcomes)),
        chat_stream,
        outcomes,
    )


def _front(serve: Any, engine: Any, **kwargs: Any) -> tuple[Any, Outcomes]:
    chat_stream = ChatStream(engine=engine, temperature=0, max_new_tokens=kwargs.pop("max_new_tokens", 12), **kwargs)
    outcomes = Outcomes()
    app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, openai=True, callback=outcomes)
    return serve(app), outcomes


def test_second_server_chats_through_the_first_with_openai_engine(
    upstream: Any, serve: Any, model: Any, tokenizer: Any
) -> None:
    first, _, first_outcomes = upstream
    front, outcomes = _front(serve, OpenAIEngine(f"{first.url}/v1", model="tiny"), stream_format="sse")
    with front.client() as client:
        reply = client.post("/chat_stream", json={"user_input": "Hello"})
        client.post("/chat_stream", json={"user_input": "And more"})
    assert outcomes.wait(2) == ["success", "success"]
    assert _sse_deltas(reply.text) == greedy_reply(model, tokenizer, "Hello", 12)
    assert first_outcomes.wait(2) == ["success", "success"]
    usage = json.loads(reply.text.strip().split("\r\n\r\n")[-1].split("data: ", 1)[1])["usage"]
    assert usage["completion_tokens"] == 12 and usage["prompt_tokens"] > 0  # the upstream's own count
    prompt = outcomes.calls[1][0].state.session.get_session()["chat_prompt"]
    assert prompt.get_turn() == 2  # the session lives in front; the upstream stays stateless


def test_client_leaving_the_front_stops_the_upstream_generation(upstream: Any, serve: Any, hooks: ModelHooks) -> None:
    first, first_stream, first_outcomes = upstream
    front, outcomes = _front(serve, OpenAIEngine(f"{first.url}/v1", model="tiny"), max_new_tokens=200)
    hooks.step_delay = 0.02
    sock = open_chat(front.url, "a long story")
    read_until(sock, b"\r\n\r\n")
    read_until(sock, b"\r\n")
    sock.close()
    assert outcomes.wait() == ["client_disconnected_while_streaming"]
    assert first_outcomes.wait() == ["client_disconnected_while_streaming"]
    upstream_stats = first_outcomes.calls[0][0].state.chat_generation
    assert upstream_stats.completion_tokens < 200 and upstream_stats.steps_after_cancel <= 1
    assert wait_until(lambda: first_stream.load()["processing"] == 0)


def _unreachable_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_unreachable_upstream_is_a_502_json_on_every_route_and_an_error_outcome(serve: Any) -> None:
    front, outcomes = _front(serve, OpenAIEngine(_unreachable_url(), model="x", timeout=2), name="x")
    messages = [{"role": "user", "content": "hi"}]
    with front.client() as client:
        answers = [
            client.post("/v1/chat/completions", json={"messages": messages}),
            client.post("/v1/chat/completions", json={"messages": messages, "stream": True}),
            client.post("/chat_stream?format=sse", json={"user_input": "hi"}),
            client.post("/chat_stream", json={"user_input": "hi"}),
            client.post("/chat_stream?format=chatstream", json={"user_input": "hi"}),
        ]
    assert [answer.status_code for answer in answers] == [502] * 5
    assert [answer.headers["content-type"] for answer in answers] == ["application/json"] * 5
    assert [answer.json()["error"]["code"] for answer in answers[:2]] == ["generation_failed"] * 2
    assert [answer.json()["error"] for answer in answers[2:]] == ["generation_failed"] * 3
    assert outcomes.wait(5) == ["unknown_error_occurred"] * 5


def test_ready_says_whether_the_upstream_answers(upstream: Any, serve: Any) -> None:
    first, _, _ = upstream
    fronts = []
    for url in (f"{first.url}/v1", _unreachable_url()):
        chat_stream = ChatStream(engine=OpenAIEngine(url, model="tiny", timeout=2))
        fronts.append(serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, health=True)))
    with fronts[0].client() as up, fronts[1].client() as down:
        assert up.get("/ready").status_code == 200
        assert down.get("/ready").status_code == 503


def test_upstream_that_stalls_past_the_timeout_is_504(upstream: Any, serve: Any, hooks: ModelHooks) -> None:
    import threading

    first, _, first_outcomes = upstream
    hooks.hold = threading.Event()  # the upstream's model never finishes its prefill
    front, outcomes = _front(serve, OpenAIEngine(f"{first.url}/v1", model="tiny", timeout=0.5), name="tiny")
    with front.client() as client:
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    hooks.hold.set()
    assert response.status_code == 504 and "did not answer in time" in response.json()["error"]["message"]
    assert outcomes.wait() == ["unknown_error_occurred"]
    assert first_outcomes.wait() == ["client_disconnected_before_streaming"]


def test_upstream_refusal_is_502(upstream: Any, serve: Any) -> None:
    first, _, _ = upstream
    front, outcomes = _front(serve, OpenAIEngine(f"{first.url}/v1", model="not-served"), name="front")
    with front.client() as client:
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 502 and "404" in response.json()["error"]["message"]
    assert outcomes.wait() == ["unknown_error_occurred"]


def test_mock_engine_echoes_the_user_and_keeps_the_conversation(serve: Any) -> None:
    front, outcomes = _front(serve, MockEngine(tokens_per_second=500), max_new_tokens=100)
    with front.client() as client:
        first = client.post("/chat_stream", json={"user_input": "Hello there, 日本語 too"})
        client.post("/chat_stream", json={"user_input": "again"})
    assert first.text == "Hello there, 日本語 too"
    assert outcomes.wait(2) == ["success", "success"]
    prompt = outcomes.calls[1][0].state.session.get_session()["chat_prompt"]
    assert prompt.create_prompt().startswith("<|user|>Hello there, 日本語 too<|end|>\n<|assistant|>Hello there")


def test_mock_engine_says_fixed_text_within_the_limits(serve: Any) -> None:
    front, outcomes = _front(
        serve, MockEngine(text="one two three four five six", tokens_per_second=500), max_new_tokens=100
    )
    with front.client() as client:
        limited = client.post("/chat_stream?format=sse", json={"user_input": "x", "max_new_tokens": 2})
        stopped = client.post("/chat_stream", json={"user_input": "x", "stop": ["four"]})
    assert _sse_deltas(limited.text) == "one two"
    assert stopped.text == "one two three "
    assert outcomes.wait(2) == ["success", "success"]


def test_mock_engine_is_cancelled_when_the_client_leaves(serve: Any) -> None:
    front, outcomes = _front(serve, MockEngine(text="word " * 1000, tokens_per_second=50), max_new_tokens=1000)
    sock = open_chat(front.url, "go")
    read_until(sock, b"\r\n\r\n")
    read_until(sock, b"word")
    sock.close()
    assert outcomes.wait() == ["client_disconnected_while_streaming"]
    assert outcomes.calls[0][0].state.chat_generation.completion_tokens < 1000


def test_chatstreams_use_mock_response_selects_the_mock(model: Any, tokenizer: Any) -> None:
    chat_stream = ChatStream(model=model, tokenizer=tokenizer, use_mock_response=True)
    assert isinstance(chat_stream.engine, MockEngine) and chat_stream.ready


def test_two_replicas_are_separately_loaded_models_and_generate_at_once(model: Any, tokenizer: Any, serve: Any) -> None:
    chat_stream = ChatStream(
        model=model,
        tokenizer=tokenizer,
        devices=["cpu", "cpu"],
        num_of_concurrent_executions=1,
        max_new_tokens=300,
        temperature=0,
    )
    try:
        first, second = (engine.model for engine in chat_stream.engines)  # type: ignore[attr-defined]
        assert first is model and second is not model
        assert first.lm_head.weight.data_ptr() != second.lm_head.weight.data_ptr()
        assert first.lm_head.weight.equal(second.lm_head.weight)
        for replica in (first, second):
            ModelHooks(replica).step_delay = 0.02  # both slow, so both are still running below
        assert wait_until(lambda: chat_stream.ready)
        outcomes = Outcomes()
        server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, callback=outcomes))
        socks = [open_chat(server.url, f"q{i}") for i in range(2)]
        for sock in socks:
            read_until(sock, b"\r\n\r\n")
        assert chat_stream.admission.replica_load() == [1, 1]
        assert chat_stream.load()["processing"] == 2 and chat_stream.load()["num_of_concurrent_executions"] == 2
        for sock in socks:
            read_until(sock, b"\r\n")
            sock.close()
        assert outcomes.wait(2) == ["client_disconnected_while_streaming"] * 2
        assert wait_until(lambda: chat_stream.admission.replica_load() == [0, 0])
    finally:
        chat_stream.close()


def test_num_gpus_asks_for_one_replica_per_gpu(model: Any, tokenizer: Any) -> None:
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this checks the refusal on a machine without two GPUs")
    with pytest.raises((RuntimeError, AssertionError, ValueError)):
        ChatStream(model=model, tokenizer=tokenizer, num_gpus=2)


def test_a_ready_engine_cannot_also_be_placed_on_devices() -> None:
    with pytest.raises(ValueError, match="devices"):
        ChatStream(engine=MockEngine(), devices=["cpu", "cpu"])


def test_a_conversations_next_turn_runs_on_the_replica_holding_its_cache(
    model: Any, tokenizer: Any, serve: Any
) -> None:
    chat_stream = ChatStream(
        model=model,
        tokenizer=tokenizer,
        devices=["cpu", "cpu"],
        num_of_concurrent_executions=1,
        max_new_tokens=40,
        temperature=0,
    )
    try:
        ModelHooks(model).step_delay = 0.05  # replica 0 stays busy while the other conversation starts
        assert wait_until(lambda: chat_stream.ready)
        outcomes = Outcomes()
        server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, callback=outcomes))
        busy = open_chat(server.url, "keep replica 0 busy")
        read_until(busy, b"\r\n\r\n")
        assert chat_stream.admission.replica_load() == [1, 0]
        with server.client() as visitor:
            assert visitor.post("/chat_stream", json={"user_input": "first turn", "max_new_tokens": 8}).is_success
            first = outcomes.wait(1) and outcomes.calls[-1][0].state.chat_generation
            busy.close()
            assert outcomes.wait(2)
            assert wait_until(lambda: chat_stream.admission.replica_load() == [0, 0])
            # Both replicas are free now: the least-loaded rule alone would pick replica 0.
            assert visitor.post("/chat_stream", json={"user_input": "second turn", "max_new_tokens": 8}).is_success
            second = outcomes.wait(3) and outcomes.calls[-1][0].state.chat_generation
        assert second.cached_prompt_tokens >= first.prompt_tokens  # its whole first turn came from the cache
    finally:
        chat_stream.close()
