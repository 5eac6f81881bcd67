"""A reply the server cuts short never ends like a finished one: delta text (which has no end
marker of its own) ends without the end of its chunked body, so httpx raises reading it; SSE
ends with `event: error`; ChatStream's own format is kept as ChatStream ended it. Cut by an
engine failure, by an upstream failing in front mode, and by the server's shutdown timeout."""

from __future__ import annotations

import shutil
import subprocess
import threading
from typing import Any

import httpx
import pytest
import requests
import uvicorn
from fastapi import FastAPI, Request
from fastsession import FastSessionMiddleware
from fastsession import MemoryStore as FastSessionStore
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.routing import Route

from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.engine import OpenAIEngine

from .conftest import HANG_GUARD, ModelHooks, Outcomes, wait_until


def _serve_chats(serve: Any, chat_stream: Any) -> tuple[Any, Outcomes]:
    outcomes = Outcomes()
    app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, openai=True, callback=outcomes)
    return serve(app), outcomes


def _read(client: httpx.Client, user_input: str, query: str = "") -> str:
    with client.stream("POST", f"/chat_stream{query}", json={"user_input": user_input}) as response:
        assert response.status_code == 200
        return "".join(response.iter_text())


def _history(client: httpx.Client) -> list[str]:
    messages = client.get("/get_history").json()["messages"]
    return [message["content"] for message in messages if message["role"] == "user"]


def test_a_delta_reply_cut_by_an_engine_failure_raises_in_httpx_and_the_next_turn_goes_on(
    make_chat_stream: Any, serve: Any, hooks: ModelHooks
) -> None:
    server, outcomes = _serve_chats(serve, make_chat_stream(max_new_tokens=20))
    with server.client() as client:
        _read(client, "first")
        outcomes.wait(1)
        hooks.fail_on_call = hooks.forward_calls + 5  # the fifth step of the next reply fails
        with pytest.raises(httpx.RemoteProtocolError):
            _read(client, "doomed")
        hooks.fail_on_call = None
        assert outcomes.wait(2) == ["success", "unknown_error_occurred"]
        assert _read(client, "third")
    assert outcomes.wait(3)[-1] == "success"


def test_requests_and_curl_raise_on_a_cut_delta_reply_too(make_chat_stream: Any, serve: Any, hooks: ModelHooks) -> None:
    server, outcomes = _serve_chats(serve, make_chat_stream(max_new_tokens=20))
    hooks.fail_on_call = hooks.forward_calls + 5
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.post(f"{server.url}/chat_stream", json={"user_input": "doomed"}, timeout=HANG_GUARD)
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    hooks.fail_on_call = hooks.forward_calls + 5
    curl = subprocess.run(
        ["curl", "-sN", f"{server.url}/chat_stream", "-d", '{"user_input": "doomed"}'], capture_output=True
    )
    assert curl.returncode == 18  # CURLE_PARTIAL_FILE: "transfer closed with outstanding read data"
    assert outcomes.wait(2) == ["unknown_error_occurred"] * 2


def test_a_delta_reply_cut_by_an_engine_failure_is_not_history(
    make_chat_stream: Any, serve: Any, hooks: ModelHooks
) -> None:
    chat_stream = make_chat_stream(max_new_tokens=20)
    outcomes = Outcomes()
    app = ChatStreamMiddleware(
        Starlette(), chat_stream=chat_stream, serve=True, callback=outcomes, apis={"include": ["get_history"]}
    )
    server = serve(app)
    with server.client() as client:
        _read(client, "kept")
        outcomes.wait(1)
        hooks.fail_on_call = hooks.forward_calls + 5
        with pytest.raises(httpx.RemoteProtocolError):
            _read(client, "doomed")
        hooks.fail_on_call = None
        outcomes.wait(2)
        assert _history(client) == ["kept"]


def _failing_after_a_few_steps(hooks: ModelHooks) -> None:
    hooks.fail_on_call = hooks.forward_calls + 5


def test_a_delta_reply_cut_without_our_middleware_raises_in_httpx(
    make_chat_stream: Any, serve: Any, hooks: ModelHooks
) -> None:
    chat_stream = make_chat_stream(max_new_tokens=20)
    outcomes = Outcomes()

    async def stream_api(request: StarletteRequest) -> Any:
        return await chat_stream.handle_chat_stream_request(request, callback=outcomes)

    server = serve(Starlette(routes=[Route("/chat_stream", stream_api, methods=["POST"])]))
    with server.client() as client:
        _failing_after_a_few_steps(hooks)
        with pytest.raises(httpx.RemoteProtocolError):
            _read(client, "doomed")
        hooks.fail_on_call = None
        assert _read(client, "next")  # the server goes on
    assert outcomes.wait(2) == ["unknown_error_occurred", "success"]


def test_behind_a_base_http_middleware_a_cut_reply_is_told_by_sse(
    make_chat_stream: Any, serve: Any, hooks: ModelHooks
) -> None:
    """fastsession's middleware (Starlette's BaseHTTPMiddleware) ends every body it passes on
    cleanly, a cut one too, so there only SSE can say a reply was cut (the documented advice)."""
    chat_stream = make_chat_stream(max_new_tokens=20)
    outcomes = Outcomes()
    app = FastAPI()
    app.add_middleware(FastSessionMiddleware, secret_key="k", store=FastSessionStore(), secure=False)

    @app.post("/chat_stream")
    async def stream_api(request: Request) -> Any:
        return await chat_stream.handle_chat_stream_request(request, callback=outcomes)

    server = serve(app)
    with server.client() as client:
        _failing_after_a_few_steps(hooks)
        body = _read(client, "doomed", "?format=sse")
    assert "event: error" in body and "event: done" not in body
    assert outcomes.wait(1) == ["unknown_error_occurred"]


@pytest.mark.parametrize(("query", "ending"), [("?format=sse", "event: error"), ("?format=chatstream", "<::EOS::>")])
def test_formats_with_an_end_of_their_own_end_a_cut_reply_cleanly(
    make_chat_stream: Any, serve: Any, hooks: ModelHooks, query: str, ending: str
) -> None:
    server, outcomes = _serve_chats(serve, make_chat_stream(max_new_tokens=20))
    with server.client() as client:
        hooks.fail_on_call = hooks.forward_calls + 5
        body = _read(client, "doomed", query)  # the body ends cleanly: no exception
    assert ending in body and "event: done" not in body
    assert outcomes.wait(1) == ["unknown_error_occurred"]


def test_a_delta_reply_cut_by_a_failing_upstream_raises_in_httpx(
    make_chat_stream: Any, serve: Any, hooks: ModelHooks
) -> None:
    upstream, _ = _serve_chats(serve, make_chat_stream(max_new_tokens=40, name="tiny"))
    front, outcomes = _serve_chats(
        serve, ChatStream(engine=OpenAIEngine(f"{upstream.url}/v1", model="tiny"), max_new_tokens=40)
    )
    with front.client() as client:
        hooks.fail_on_call = hooks.forward_calls + 20  # the upstream's model fails mid-reply
        with pytest.raises(httpx.RemoteProtocolError):
            _read(client, "doomed")
    assert outcomes.wait(1) == ["unknown_error_occurred"]


def test_a_delta_reply_cut_by_the_shutdown_timeout_raises_in_httpx(make_chat_stream: Any, hooks: ModelHooks) -> None:
    hooks.step_delay = 0.05
    outcomes = Outcomes()
    app = ChatStreamMiddleware(
        Starlette(), chat_stream=make_chat_stream(max_new_tokens=500), serve=True, callback=outcomes
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, timeout_graceful_shutdown=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    with httpx.Client(base_url=url, timeout=HANG_GUARD) as client:
        with client.stream("POST", "/chat_stream", json={"user_input": "long"}) as response:
            chunks = response.iter_text()
            assert next(chunks)  # streaming
            server.should_exit = True  # what a SIGTERM does; the timeout (0) cuts the reply
            with pytest.raises(httpx.RemoteProtocolError):
                for _ in chunks:
                    pass
    thread.join(HANG_GUARD)
    assert outcomes.wait(1) == ["unknown_error_occurred"]
