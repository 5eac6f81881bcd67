"""The examples/ files run as shipped: the seed's three endpoint forms, and serve mode on
Starlette, Quart and a bare ASGI callable."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from chatstream_asgi import ChatStreamMiddleware

from .conftest import wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def load_example(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("CHATSTREAM_MODEL", str(model_dir))
    loaded: list[Any] = []

    def load(name: str) -> Any:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loaded.append(module)
        assert wait_until(lambda: module.chat_stream.ready)
        return module

    yield load
    for module in loaded:
        module.chat_stream.close()
        sys.modules.pop(module.__name__, None)


def _chat(server: Any, text: str = "Hello") -> Any:
    with server.client() as client:
        return client.post("/chat_stream", json={"user_input": text, "max_new_tokens": 8})


def test_plain_endpoint_streams_a_reply(load_example: Any, serve: Any) -> None:
    example = load_example("fastapi_plain")
    response = _chat(serve(example.app))
    assert response.status_code == 200 and response.text
    assert response.headers["x-chatstream-last-generated-message-id"]


def test_intercepting_endpoint_reads_the_body_and_still_hands_it_on(load_example: Any, serve: Any) -> None:
    example = load_example("fastapi_intercept")
    server = serve(example.app)
    assert _chat(server).status_code == 200
    refused = _chat(server, "forbidden topic")
    assert refused.status_code == 403 and refused.json()["error"] == "refused"
    assert example.chat_stream.load()["processing"] == 0


def test_callback_endpoint_prints_outcome_and_conversation_once_per_request(load_example: Any, serve: Any) -> None:
    example = load_example("fastapi_callback")
    printed: list[str] = []
    example.print = printed.append  # the module's own print, as its callback calls it
    response = _chat(serve(example.app), "What is ASGI?")
    assert wait_until(lambda: len(printed) == 2)
    assert printed[0] == "request finished: success"
    assert printed[1].startswith("<|user|>What is ASGI?<|end|>\n<|assistant|>")
    assert printed[1].endswith(response.text + "<|end|>\n")


def test_endpoint_may_read_json_and_call_the_handler_without_the_body(load_example: Any, serve: Any) -> None:
    example = load_example("fastapi_plain")
    chat_stream = example.chat_stream
    seen: list[str] = []
    app = FastAPI()
    app.add_middleware(ChatStreamMiddleware, chat_stream=chat_stream)

    @app.post("/chat_stream")
    async def stream_api(request: Request) -> Any:
        data = await request.json()
        seen.append(data["user_input"])
        return await chat_stream.handle_chat_stream_request(request)

    response = _chat(serve(app), "replayed")
    assert response.status_code == 200 and response.text
    assert seen == ["replayed"]


def test_starlette_app_gains_the_chat_route_and_keeps_its_own(load_example: Any, serve: Any) -> None:
    example = load_example("starlette_serve")
    server = serve(example.app)
    assert _chat(server).status_code == 200
    with server.client() as client:
        assert client.get("/").text == "POST /chat_stream to chat"
        assert client.get("/health").json() == {"status": "ok"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_quart_app_gains_the_chat_route_and_keeps_its_own(load_example: Any, serve: Any) -> None:
    example = load_example("quart_serve")
    server = serve(example.app)
    response = _chat(server)
    assert response.status_code == 200 and response.text
    assert "chatstream_session=" in response.headers["set-cookie"]
    with server.client() as client:
        assert client.get("/").text == "POST /chat_stream to chat"
        assert client.get("/ready").status_code == 200


def test_bare_asgi_callable_gains_the_chat_route(load_example: Any, serve: Any) -> None:
    example = load_example("bare_asgi")
    server = serve(example.app)
    response = _chat(server)
    assert response.status_code == 200 and response.text
    with server.client() as client:
        assert client.get("/elsewhere").status_code == 404


def test_sse_over_fastapi_endpoint(load_example: Any, serve: Any) -> None:
    example = load_example("fastapi_plain")
    with serve(example.app).client() as client:
        response = client.post("/chat_stream?format=sse", json={"user_input": "hi", "max_new_tokens": 4})
    last = response.text.strip().split("\r\n\r\n")[-1]
    assert last.startswith("event: done") and json.loads(last.split("data: ", 1)[1])["outcome"] == "success"


def test_openai_sdk_example_talks_to_a_server(
    load_example: Any, serve: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = load_example("starlette_serve")
    server = serve(ChatStreamMiddleware(backend.app, chat_stream=backend.chat_stream, openai=True))
    monkeypatch.setenv("CHATSTREAM_URL", server.url)
    client_example = importlib.util.spec_from_file_location("example_openai_sdk", EXAMPLES / "openai_sdk.py")
    assert client_example is not None and client_example.loader is not None
    module = importlib.util.module_from_spec(client_example)
    client_example.loader.exec_module(module)
    module.main()
    out = capsys.readouterr().out
    assert "whole: " in out and "streamed: " in out


def test_vllm_front_example_chats_through_an_upstream(
    load_example: Any, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = load_example("starlette_serve")
    upstream = serve(ChatStreamMiddleware(backend.app, chat_stream=backend.chat_stream, openai=True))
    monkeypatch.setenv("UPSTREAM_URL", f"{upstream.url}/v1")
    monkeypatch.setenv("UPSTREAM_MODEL", backend.chat_stream.name)
    front = load_example("vllm_front")
    response = _chat(serve(front.app))
    assert response.status_code == 200 and response.text


def test_several_gpus_example_runs_two_replicas_here(
    load_example: Any, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHATSTREAM_DEVICES", "cpu,cpu")
    example = load_example("several_gpus")
    assert len(example.chat_stream.engines) == 2
    assert _chat(serve(example.app)).status_code == 200


@pytest.mark.parametrize(
    "name",
    ["fastapi_plain", "fastapi_intercept", "fastapi_callback", "starlette_serve", "quart_serve", "bare_asgi"],
)
def test_an_example_run_as_a_script_serves_on_the_port_in_PORT(name: str, model_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PORT": str(port), "CHATSTREAM_MODEL": str(model_dir)}
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / f"{name}.py")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:

        def answers() -> bool:
            try:
                chat = httpx.post(
                    f"http://127.0.0.1:{port}/chat_stream", json={"user_input": "Hi", "max_new_tokens": 4}
                )
            except httpx.TransportError:
                return process.poll() is not None  # stop waiting for a script that died
            return chat.status_code == 200

        assert wait_until(answers, timeout=90) and process.poll() is None, process.stderr
    finally:
        process.terminate()
        process.wait(30)
