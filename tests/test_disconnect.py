"""A client that leaves is noticed at once, wherever it is, and classified exactly once."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware

from .conftest import ModelHooks, Outcomes, open_chat, read_first_text, read_until, wait_until


@pytest.fixture
def slow_server(make_chat_stream: Any, serve: Any, hooks: ModelHooks) -> Any:
    def start(**kwargs: Any) -> tuple[Any, Any, Outcomes, list[dict[str, int]]]:
        chat_stream = make_chat_stream(**kwargs)
        outcomes = Outcomes()
        load_at_callback: list[dict[str, int]] = []

        def record(request: Any, outcome: str) -> None:
            load_at_callback.append(chat_stream.load())
            outcomes(request, outcome)

        server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, callback=record))
        return server, chat_stream, outcomes, load_at_callback

    return start


def test_client_leaving_mid_stream_stops_generation_within_one_step(slow_server: Any, hooks: ModelHooks) -> None:
    hooks.step_delay = 0.02
    server, chat_stream, outcomes, load_at_callback = slow_server(max_new_tokens=200)
    sock = open_chat(server.url, "tell me a long story")
    head = read_until(sock, b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    read_until(sock, b"\r\n")  # the first chunk of reply text
    sock.close()
    assert outcomes.wait() == ["client_disconnected_while_streaming"]
    stats = outcomes.calls[0][0].state.chat_generation
    assert stats.finish_reason == "cancelled"
    assert stats.steps_after_cancel <= 1
    assert stats.completion_tokens < 200
    assert load_at_callback == [{"processing": 0, "waiting": 0, "num_of_concurrent_executions": 2, "max_queue_size": 5}]
    calls_after = hooks.forward_calls
    assert wait_until(lambda: chat_stream.load()["processing"] == 0)
    assert hooks.forward_calls == calls_after  # nothing runs after the outcome


def test_partial_reply_of_a_client_that_left_stays_in_history(slow_server: Any, hooks: ModelHooks) -> None:
    hooks.step_delay = 0.02
    server, _, outcomes, _ = slow_server(max_new_tokens=200)
    with server.client() as client:
        with client.stream("POST", "/chat_stream", json={"user_input": "story"}) as response:
            received = b""
            for chunk in response.iter_bytes():
                received += chunk
                if len(received) > 5:
                    break
        client.close()
    assert outcomes.wait() == ["client_disconnected_while_streaming"]
    prompt = outcomes.calls[0][0].state.session.get_session()["chat_prompt"]
    assert prompt.get_requester_last_msg() == "story"
    kept = prompt.get_responder_last_msg()
    assert kept is not None and kept.startswith(received.decode(errors="ignore"))
    assert outcomes.calls[0][0].state.chat_generation.completion_tokens < 200


def test_client_leaving_during_prefill_is_classified_before_streaming(slow_server: Any, hooks: ModelHooks) -> None:
    hooks.prefill_delay = 1.0
    server, chat_stream, outcomes, _ = slow_server(max_new_tokens=50)
    sock = open_chat(server.url, "hello")
    assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 200")  # headers go out once a slot is held
    assert hooks.prefill_started.wait(30)
    sock.close()
    assert outcomes.wait() == ["client_disconnected_before_streaming"]
    stats = outcomes.calls[0][0].state.chat_generation
    assert stats.steps_after_cancel == 1  # the prefill that was in flight, and nothing after it
    assert stats.finish_reason == "cancelled"
    prompt = outcomes.calls[0][0].state.session.get_session()["chat_prompt"]
    assert prompt.is_empty()  # a reply the client never saw a byte of is not history
    assert chat_stream.load()["processing"] == 0


def test_client_leaving_the_queue_never_starts_and_its_place_goes_to_the_next(
    slow_server: Any, hooks: ModelHooks
) -> None:
    hooks.step_delay = 0.02
    server, chat_stream, outcomes, _ = slow_server(num_of_concurrent_executions=1, max_new_tokens=60)
    running = open_chat(server.url, "first")
    read_first_text(running)
    leaving = open_chat(server.url, "second")
    assert wait_until(lambda: chat_stream.load()["waiting"] == 1)
    staying = open_chat(server.url, "third")
    assert wait_until(lambda: chat_stream.load()["waiting"] == 2)
    leaving.close()
    assert outcomes.wait(1) == ["client_disconnected_before_streaming"]
    assert chat_stream.load()["waiting"] == 1
    running.close()
    assert read_until(staying, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    read_until(staying, b"0\r\n\r\n")  # the end of the chunked reply
    staying.close()
    assert outcomes.wait(3) == [
        "client_disconnected_before_streaming",
        "client_disconnected_while_streaming",
        "success",
    ]
    assert hooks.prefills == 2  # "first" and "third": the request that left never reached the model


def test_every_request_that_reached_admission_gets_exactly_one_outcome(slow_server: Any, hooks: ModelHooks) -> None:
    hooks.step_delay = 0.01
    server, chat_stream, outcomes, _ = slow_server(num_of_concurrent_executions=2, max_queue_size=3, max_new_tokens=15)
    socks = [open_chat(server.url, f"q{i}") for i in range(5)]
    socks[1].close()
    for sock in socks[:1] + socks[2:]:
        read_until(sock, b"0\r\n\r\n")
        sock.close()
    assert wait_until(lambda: len(outcomes.calls) == 5)
    assert outcomes.outcomes.count("success") == 4
    assert len({id(request) for request, _ in outcomes.calls}) == 5
    assert wait_until(lambda: chat_stream.load()["processing"] == 0)
