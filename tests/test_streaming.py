"""The streamed reply over real HTTP: formats, headers, content, outcomes, history."""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware
from chatstream_asgi.asgi.wire import CHATSTREAM_EOS

from .conftest import ModelHooks, Outcomes, greedy_reply, wait_until


@pytest.fixture
def chat_server(make_chat_stream: Any, serve: Any) -> Any:
    """Serve mode on a bare Starlette app; returns (server, chat_stream, outcomes)."""

    def start(**kwargs: Any) -> tuple[Any, Any, Outcomes]:
        middleware_options = {k: kwargs.pop(k) for k in ("ping_interval",) if k in kwargs}
        chat_stream = make_chat_stream(**kwargs)
        outcomes = Outcomes()
        app = ChatStreamMiddleware(
            Starlette(), chat_stream=chat_stream, serve=True, callback=outcomes, **middleware_options
        )
        return serve(app), chat_stream, outcomes

    return start


def _sse_events(body: str) -> list[tuple[str, str]]:
    events = []
    for frame in body.split("\r\n\r\n"):
        if not frame:
            continue
        name, data = "message", ""
        for line in frame.split("\r\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line.startswith(":"):
                name = "comment"
        events.append((name, data))
    return events


def test_delta_stream_concatenates_to_what_model_generate_replies(chat_server: Any, model: Any, tokenizer: Any) -> None:
    server, _, outcomes = chat_server(max_new_tokens=40)
    with (
        server.client() as client,
        client.stream("POST", "/chat_stream", json={"user_input": "Hello 日本 😀"}) as response,
    ):
        assert response.status_code == 200
        chunks = list(response.iter_bytes())
    assert outcomes.wait() == ["success"]
    reply = b"".join(chunks).decode()
    assert reply == greedy_reply(model, tokenizer, "Hello 日本 😀", 40)


def test_every_stream_carries_the_message_id_and_no_buffering_headers(chat_server: Any) -> None:
    server, _, outcomes = chat_server()
    with server.client() as client:
        response = client.post("/chat_stream", json={"user_input": "hi"})
    outcomes.wait()
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert len(response.headers["x-chatstream-last-generated-message-id"]) == 36


def test_chatstream_format_sends_the_whole_reply_so_far_with_eos_marker(
    chat_server: Any, model: Any, tokenizer: Any
) -> None:
    server, _, outcomes = chat_server(stream_format="chatstream", max_new_tokens=30)
    with server.client() as client, client.stream("POST", "/chat_stream", json={"user_input": "hi"}) as response:
        body = response.read().decode()
    outcomes.wait()
    chunks = [c for c in body.split(CHATSTREAM_EOS) if c]
    assert body.endswith(CHATSTREAM_EOS)
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(chunks))
    assert chunks[-1] == greedy_reply(model, tokenizer, "hi", 30)


def test_sse_stream_sends_delta_events_then_done_with_usage(chat_server: Any, model: Any, tokenizer: Any) -> None:
    server, _, outcomes = chat_server(stream_format="sse", max_new_tokens=20)
    with server.client() as client:
        response = client.post("/chat_stream", json={"user_input": "hi"})
    outcomes.wait()
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(response.text)
    deltas = [json.loads(data)["delta"] for name, data in events if name == "message"]
    assert "".join(deltas) == greedy_reply(model, tokenizer, "hi", 20)
    name, data = events[-1]
    assert name == "done"
    done = json.loads(data)
    assert done["outcome"] == "success"
    assert done["usage"]["completion_tokens"] == 20 and done["usage"]["prompt_tokens"] > 0


def test_format_query_beats_accept_header_which_beats_the_constructor(chat_server: Any) -> None:
    server, _, outcomes = chat_server(stream_format="chatstream")
    with server.client() as client:
        by_query = client.post(
            "/chat_stream?format=delta", json={"user_input": "a"}, headers={"Accept": "text/event-stream"}
        )
        outcomes.wait(1)
        by_accept = client.post("/chat_stream", json={"user_input": "a"}, headers={"Accept": "text/event-stream"})
        outcomes.wait(2)
        by_default = client.post("/chat_stream", json={"user_input": "a"})
        outcomes.wait(3)
    assert by_query.headers["content-type"].startswith("text/plain") and CHATSTREAM_EOS not in by_query.text
    assert by_accept.headers["content-type"].startswith("text/event-stream")
    assert by_default.text.endswith(CHATSTREAM_EOS)


def test_unknown_format_is_a_400(chat_server: Any) -> None:
    server, chat_stream, outcomes = chat_server()
    with server.client() as client:
        response = client.post("/chat_stream?format=xml", json={"user_input": "a"})
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    assert outcomes.calls == [] and chat_stream.load()["processing"] == 0


def test_sse_sends_pings_while_the_model_is_silent(chat_server: Any, hooks: ModelHooks) -> None:
    hooks.prefill_delay = 0.6
    server, _, outcomes = chat_server(stream_format="sse", ping_interval=0.1, max_new_tokens=2)
    with server.client() as client:
        response = client.post("/chat_stream", json={"user_input": "hi"})
    outcomes.wait()
    events = _sse_events(response.text)
    first_delta = next(i for i, (name, _) in enumerate(events) if name == "message")
    assert any(name == "comment" for name, _ in events[:first_delta])
    assert ": ping\r\n\r\n" in response.text


def test_stop_string_from_the_request_ends_the_reply_without_printing_it(
    chat_server: Any, model: Any, tokenizer: Any
) -> None:
    full = greedy_reply(model, tokenizer, "hi", 40)
    stop = _stop_string_across_a_token_boundary(model, tokenizer, "hi", 40)
    server, _, outcomes = chat_server(max_new_tokens=40)
    with server.client() as client:
        response = client.post("/chat_stream", json={"user_input": "hi", "stop": [stop]})
    outcomes.wait()
    assert response.text == full[: full.index(stop)]


def _stop_string_across_a_token_boundary(model: Any, tokenizer: Any, user_input: str, max_new_tokens: int) -> str:
    """A stop string the model will produce split over two tokens: the end of one, the start of the next."""
    import torch

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_input}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    pieces = [tokenizer.decode([token]) for token in out[0, ids.shape[1] :].tolist()]
    for first, second in itertools.pairwise(pieces):
        if len(first) >= 2 and len(second) >= 2 and "\ufffd" not in first + second:
            return first[-2:] + second[:2]
    raise AssertionError(f"no two neighbouring multi-character tokens in {pieces}")


def test_stop_string_from_the_constructor_applies_to_every_request(
    chat_server: Any, model: Any, tokenizer: Any
) -> None:
    full = greedy_reply(model, tokenizer, "hi", 40)
    stop = full[5:8]
    server, _, outcomes = chat_server(max_new_tokens=40, stop=[stop])
    with server.client() as client:
        response = client.post("/chat_stream", json={"user_input": "hi"})
    outcomes.wait()
    assert stop not in response.text and response.text == full[: full.index(stop)]


def test_request_max_new_tokens_limits_the_reply(chat_server: Any) -> None:
    server, _, outcomes = chat_server(stream_format="sse", max_new_tokens=30)
    with server.client() as client:
        response = client.post("/chat_stream", json={"user_input": "hi", "max_new_tokens": 3})
    outcomes.wait()
    assert json.loads(_sse_events(response.text)[-1][1])["usage"]["completion_tokens"] == 3


def test_conversation_continues_in_the_session_named_by_the_cookie(chat_server: Any) -> None:
    server, _, outcomes = chat_server(stream_format="sse")
    with server.client() as client:
        first = client.post("/chat_stream", json={"user_input": "first question"})
        outcomes.wait(1)
        second = client.post("/chat_stream", json={"user_input": "second question"})
        outcomes.wait(2)
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    assert "set-cookie" not in second.headers  # same session, no new cookie
    first_usage = json.loads(_sse_events(first.text)[-1][1])["usage"]
    second_usage = json.loads(_sse_events(second.text)[-1][1])["usage"]
    assert second_usage["prompt_tokens"] > first_usage["prompt_tokens"] + first_usage["completion_tokens"]
    prompt = outcomes.calls[1][0].state.session.get_session()["chat_prompt"]
    assert [c.get_message() for c in prompt.requester_messages] == ["first question", "second question"]
    assert prompt.get_responder_last_msg() == "".join(
        json.loads(d)["delta"] for n, d in _sse_events(second.text) if n == "message"
    )


def test_a_client_without_the_cookie_gets_a_fresh_conversation(chat_server: Any) -> None:
    server, _, outcomes = chat_server()
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "one"})
    outcomes.wait(1)
    with server.client() as stranger:
        stranger.post("/chat_stream", json={"user_input": "two"})
    outcomes.wait(2)
    prompt = outcomes.calls[1][0].state.session.get_session()["chat_prompt"]
    assert prompt.get_turn() == 1


def test_regenerate_replaces_the_last_reply(chat_server: Any) -> None:
    server, _, outcomes = chat_server(temperature=1.0, seed=1)
    with server.client() as client:
        first = client.post("/chat_stream", json={"user_input": "hi"})
        outcomes.wait(1)
        again = client.post("/chat_stream", json={"regenerate": True})
        outcomes.wait(2)
    prompt = outcomes.calls[1][0].state.session.get_session()["chat_prompt"]
    assert prompt.get_turn() == 1 and len(prompt.responder_messages) == 1
    assert prompt.get_responder_last_msg() == again.text
    assert (
        again.headers["x-chatstream-last-generated-message-id"]
        != first.headers["x-chatstream-last-generated-message-id"]
    )
    assert prompt.responder_messages[0].get_message_id() == again.headers["x-chatstream-last-generated-message-id"]


def test_an_edit_replaces_the_last_user_message_and_replies_to_it_anew(chat_server: Any) -> None:
    server, _, outcomes = chat_server(max_new_tokens=4)
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "first question"})
        client.post("/chat_stream", json={"user_input": "a typo'd question"})
        edited = client.post("/chat_stream", json={"edit": "the corrected question"})
        outcomes.wait(3)
    prompt = outcomes.calls[2][0].state.session.get_session()["chat_prompt"]
    assert [content.get_message() for content in prompt.requester_messages] == [
        "first question",
        "the corrected question",
    ]
    assert prompt.get_turn() == 2 and prompt.get_responder_last_msg() == edited.text


def test_regenerate_ignores_the_user_input_sent_with_it(chat_server: Any) -> None:
    server, _, outcomes = chat_server(max_new_tokens=4)
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "the question"})
        client.post("/chat_stream", json={"user_input": "what a front-end left in its box", "regenerate": True})
        outcomes.wait(2)
    prompt = outcomes.calls[1][0].state.session.get_session()["chat_prompt"]
    assert [content.get_message() for content in prompt.requester_messages] == ["the question"]


@pytest.mark.parametrize(
    "body",
    [{"edit": ""}, {"edit": 3}, {"edit": "x", "user_input": "y"}, {"edit": "x", "regenerate": True}],
    ids=["empty", "not-a-string", "with-user_input", "with-regenerate"],
)
def test_a_malformed_edit_is_refused_and_changes_nothing(chat_server: Any, body: dict[str, Any]) -> None:
    server, _, outcomes = chat_server(max_new_tokens=4)
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "the question"})
        outcomes.wait(1)
        refused = client.post("/chat_stream", json=body)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_request"
    assert "'edit'" in refused.json()["detail"]
    assert len(outcomes.calls) == 1  # refused before admission: no turn ran
    prompt = outcomes.calls[0][0].state.session.get_session()["chat_prompt"]
    assert [content.get_message() for content in prompt.requester_messages] == ["the question"]


def test_long_history_is_truncated_to_fit_the_context(chat_server: Any) -> None:
    server, _, outcomes = chat_server(stream_format="sse", context_len=160, max_new_tokens=16)
    usages = []
    with server.client() as client:
        for turn in range(8):
            response = client.post("/chat_stream", json={"user_input": f"question {turn} " * 4})
            outcomes.wait(turn + 1)
            usages.append(json.loads(_sse_events(response.text)[-1][1])["usage"])
    assert outcomes.outcomes == ["success"] * 8
    assert all(u["prompt_tokens"] <= 160 - 16 for u in usages)
    prompt = outcomes.calls[-1][0].state.session.get_session()["chat_prompt"]
    assert prompt.get_turn() == 8  # the stored history is whole; only the prompt was cut


def test_session_busy_while_a_turn_of_it_runs(chat_server: Any, hooks: ModelHooks) -> None:
    hooks.step_delay = 0.02
    server, chat_stream, outcomes = chat_server(max_new_tokens=100)
    with server.client() as client, client.stream("POST", "/chat_stream", json={"user_input": "long"}) as running:
        chunks = running.iter_bytes()
        next(chunks)
        second = client.post("/chat_stream", json={"user_input": "meanwhile"})
        assert second.status_code == 409 and second.json()["error"] == "session_busy"
        for _ in chunks:
            pass
    assert outcomes.wait() == ["success"]
    assert chat_stream.load()["processing"] == 0


def test_generation_runs_on_the_engines_thread_never_the_event_loop(chat_server: Any, hooks: ModelHooks) -> None:
    import threading

    server, _, outcomes = chat_server()
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "hi"})
    outcomes.wait()
    server_threads = {t.name for t in threading.enumerate() if not t.name.startswith("chatstream-engine")}
    assert hooks.threads and all(name.startswith("chatstream-engine-") for name in hooks.threads)
    assert not hooks.threads & server_threads


def test_plain_and_async_callbacks_are_both_called_once(make_chat_stream: Any, serve: Any) -> None:
    seen: list[str] = []

    async def async_callback(request: Any, outcome: str) -> None:
        seen.append("async:" + outcome)

    chat_stream = make_chat_stream()
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, callback=async_callback))
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "hi"})
    assert wait_until(lambda: seen == ["async:success"])


def test_a_callback_that_raises_is_logged_and_breaks_nothing(make_chat_stream: Any, serve: Any, caplog: Any) -> None:
    calls: list[str] = []

    def broken(request: Any, outcome: str) -> None:
        calls.append(outcome)
        raise ValueError("bug in user code")

    chat_stream = make_chat_stream()
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, callback=broken))
    with server.client() as client:
        first = client.post("/chat_stream", json={"user_input": "hi"})
        second = client.post("/chat_stream", json={"user_input": "again"})
    assert first.status_code == second.status_code == 200 and second.text
    assert wait_until(lambda: calls == ["success", "success"])
    assert wait_until(lambda: "bug in user code" in caplog.text)
    assert chat_stream.load()["processing"] == 0


def test_a_failure_inside_generation_ends_that_request_and_the_server_goes_on(
    chat_server: Any, hooks: ModelHooks
) -> None:
    server, chat_stream, outcomes = chat_server(stream_format="sse", max_new_tokens=20)
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "first"})
        outcomes.wait(1)
        hooks.fail_on_call = hooks.forward_calls + 5  # the fifth step of the next reply fails
        failed = client.post("/chat_stream", json={"user_input": "doomed"})
        outcomes.wait(2)
        hooks.fail_on_call = None
        after = client.post("/chat_stream", json={"user_input": "third"})
        outcomes.wait(3)
    assert failed.status_code == 200
    name, data = _sse_events(failed.text)[-1]
    assert name == "error" and "simulated model failure" in json.loads(data)["detail"]
    assert outcomes.outcomes == ["success", "unknown_error_occurred", "success"]
    assert _sse_events(after.text)[-1][0] == "done"
    prompt = outcomes.calls[2][0].state.session.get_session()["chat_prompt"]
    assert [c.get_message() for c in prompt.requester_messages] == ["first", "third"]  # the failed turn is not history
    assert chat_stream.load() == {"processing": 0, "waiting": 0, "num_of_concurrent_executions": 2, "max_queue_size": 5}


def test_outcome_callback_sees_the_generation_stats(chat_server: Any) -> None:
    server, _, outcomes = chat_server(max_new_tokens=7)
    with server.client() as client:
        client.post("/chat_stream", json={"user_input": "hi"})
    outcomes.wait()
    stats = outcomes.calls[0][0].state.chat_generation
    assert stats.completion_tokens == 7 and stats.finish_reason == "length" and stats.steps_after_cancel == 0


def test_non_chat_routes_pass_through_untouched(make_chat_stream: Any, serve: Any) -> None:
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def other(request: Any) -> PlainTextResponse:
        return PlainTextResponse((await request.body()).decode() + request.url.path)

    app = Starlette(routes=[Route("/echo", other, methods=["POST"]), Route("/chat_stream", other, methods=["GET"])])
    server = serve(ChatStreamMiddleware(app, chat_stream=make_chat_stream()))
    with server.client() as client:
        echoed = client.post("/echo", content=b"x" * (2 << 20))  # over max_body_size: not ours to limit
        get_chat = client.get("/chat_stream")
    assert echoed.text == "x" * (2 << 20) + "/echo"
    assert get_chat.text == "/chat_stream" and "set-cookie" not in get_chat.headers


def test_serve_mode_leaves_preflight_to_the_app_and_answers_a_wrong_method_with_405(
    make_chat_stream: Any, serve: Any
) -> None:
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    app = Starlette(
        middleware=[Middleware(CORSMiddleware, allow_origins=["https://chat.example"], allow_methods=["POST"])]
    )
    server = serve(ChatStreamMiddleware(app, chat_stream=make_chat_stream(), serve=True))
    with server.client() as client:
        preflight = client.options(
            "/chat_stream",
            headers={"Origin": "https://chat.example", "Access-Control-Request-Method": "POST"},
        )
        get = client.get("/chat_stream")
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://chat.example"
    assert get.status_code == 405 and get.headers["allow"] == "POST"


def test_handler_without_the_middleware_answers_in_a_plain_starlette_app(make_chat_stream: Any, serve: Any) -> None:
    from starlette.routing import Route

    chat_stream = make_chat_stream()

    async def endpoint(request: Any) -> Any:
        return await chat_stream.handle_chat_stream_request(request)

    server = serve(Starlette(routes=[Route("/chat_stream", endpoint, methods=["POST"])]))
    with server.client() as client:
        response = client.post("/chat_stream", json={"user_input": "hi"})
    assert response.status_code == 200 and response.text
    assert response.headers["x-chatstream-last-generated-message-id"]


def test_httpx_reads_an_ordinary_json_error(chat_server: Any) -> None:
    server, _, _ = chat_server()
    with server.client() as client:
        response = client.post("/chat_stream", content=b"{")
    assert response.headers["content-type"] == "application/json"
    with pytest.raises(httpx.HTTPStatusError):
        response.raise_for_status()
