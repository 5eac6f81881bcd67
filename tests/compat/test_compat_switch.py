"""`ChatStream(compat="chatstream")`: ChatStream 0.3.0's observable defaults in one place;
arguments the caller passes still win, and without the switch our defaults stay."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from starlette.applications import Starlette

from chatstream_asgi import ChatStream, ChatStreamMiddleware

from ..conftest import open_chat, read_first_text, wait_until


def test_compat_chatstream_answers_a_full_queue_with_200_and_the_error_json(serve: Any) -> None:
    chat_stream = ChatStream(
        use_mock_response=True,
        mock_params={"type": "long", "time_per_token_sec": 0.05},
        num_of_concurrent_executions=1,
        max_queue_size=1,
        compat="chatstream",
    )
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True))
    running = open_chat(server.url, "first")
    read_first_text(running)
    waiting = open_chat(server.url, "second")
    assert wait_until(lambda: chat_stream.load()["waiting"] == 1)
    with server.client() as client:
        refused = client.post("/chat_stream", json={"user_input": "third"})
    running.close()
    waiting.close()
    assert refused.status_code == 200
    assert refused.json()["error"] == "too_many_requests"


def test_compat_chatstream_streams_cumulative_chunks_ending_in_eos(serve: Any) -> None:
    chat_stream = ChatStream(
        use_mock_response=True, mock_params={"type": "echo", "time_per_token_sec": 0.001}, compat="chatstream"
    )
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True))
    with server.client() as client:
        body = client.post("/chat_stream", json={"user_input": "one two three four five six"}).text
    chunks = body.split("<::EOS::>")
    assert chunks[-1] == "" and len(chunks) > 2
    assert chunks[-2] == "one two three four five six"
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(chunks[:-1]))


def test_compat_chatstream_takes_chatstreams_parameter_defaults() -> None:
    chat_stream = ChatStream(use_mock_response=True, compat="chatstream")
    assert chat_stream.params.get("temperature") == 1.0 and chat_stream.params.get("top_p_value") == 1.0
    assert chat_stream.params.get("top_k_value") is None
    assert chat_stream.context_len == 1024 and chat_stream.name == "node:0"
    assert chat_stream.too_many_request_as_http_error is False and chat_stream.stream_format == "chatstream"
    assert chat_stream.client_roles is not None and "user" in chat_stream.client_roles


def test_arguments_passed_win_over_the_compat_defaults() -> None:
    chat_stream = ChatStream(
        use_mock_response=True,
        compat="chatstream",
        temperature=0.3,
        stream_format="delta",
        too_many_request_as_http_error=True,
    )
    assert chat_stream.params.get("temperature") == 0.3
    assert chat_stream.stream_format == "delta" and chat_stream.too_many_request_as_http_error is True


def test_without_the_switch_our_defaults_stay() -> None:
    chat_stream = ChatStream(use_mock_response=True)
    assert chat_stream.params.get("temperature") == 0.7 and chat_stream.params.get("top_k_value") == 50
    assert chat_stream.too_many_request_as_http_error is True and chat_stream.stream_format == "delta"
    assert chat_stream.context_len == 2048 and chat_stream.client_roles is None


def test_an_unknown_compat_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="compat"):
        ChatStream(use_mock_response=True, compat="chatstream-0.2")
