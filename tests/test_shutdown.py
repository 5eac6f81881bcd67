"""A server that stops keeps every promise: each admitted chat gets its one outcome, streams end
cleanly, queued clients get 503 `shutting_down`, and the process exits without a traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware, MemoryStore

from .conftest import HANG_GUARD, ModelHooks, Outcomes, read_first_text, wait_until


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _open(url: str, user_input: str, query: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=HANG_GUARD)
    body = json.dumps({"user_input": user_input}).encode()
    head = f"POST /chat_stream{query} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock


class _Chat:
    """A raw chat whose whole response the test reads, across the server's stop."""

    def __init__(self, url: str, user_input: str, query: str) -> None:
        self.sock = _open(url, user_input, query)
        self.received = b""

    def read_first_text(self) -> None:
        self.received = read_first_text(self.sock)

    def read_to_end(self) -> bytes:
        while chunk := self.sock.recv(65536):
            self.received += chunk
        self.sock.close()
        return self.received


def _load(url: str) -> dict[str, int] | None:
    try:
        load: dict[str, int] = httpx.get(f"{url}/ready").json()["load"]
        return load
    except (httpx.TransportError, KeyError, ValueError):
        return None


def _ready_status(url: str) -> str | None:
    try:
        status: str = httpx.get(f"{url}/ready").json()["status"]
        return status
    except (httpx.TransportError, KeyError, ValueError):
        return None


def _chats_streaming_and_queued(url: str, running: int, waiting: int, *, sse: bool) -> list[_Chat]:
    """`running` chats that stream text, then `waiting` more that wait in the queue."""
    query = "?format=sse" if sse else ""
    chats = [_Chat(url, f"chat {i}", query) for i in range(running)]
    for chat in chats:
        chat.read_first_text()
    chats += [_Chat(url, f"chat {running + i}", query) for i in range(waiting)]
    assert wait_until(lambda: (_load(url) or {}).get("waiting") == waiting)
    return chats


def _assert_sse_cut_short(responses: list[bytes]) -> None:
    """Streaming and waiting SSE chats alike: 200, then `event: error` `shutting_down`, then a clean end."""
    for response in responses:
        assert response.startswith(b"HTTP/1.1 200")
        assert b'event: error\r\ndata: {"error": "shutting_down"' in response
        assert response.endswith(b"0\r\n\r\n")  # the chunked body was ended, not cut


def test_chats_the_server_cancels_at_its_timeout_still_finish_in_every_window(
    make_chat_stream: Any, hooks: ModelHooks, caplog: pytest.LogCaptureFixture
) -> None:
    chat_stream = make_chat_stream(num_of_concurrent_executions=2, max_queue_size=4, max_new_tokens=200)
    hooks.step_delay = 0.05
    outcomes, store = Outcomes(), MemoryStore()
    app = ChatStreamMiddleware(
        Starlette(), chat_stream=chat_stream, serve=True, health=True, callback=outcomes, session_store=store
    )
    config = uvicorn.Config(app, host="127.0.0.1", port=_free_port(), timeout_graceful_shutdown=0, log_level="info")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.port}"
    assert wait_until(lambda: server.started)
    chats = _chats_streaming_and_queued(url, 2, 4, sse=False)
    server.should_exit = True  # what a SIGTERM does
    thread.join(HANG_GUARD)
    assert not thread.is_alive()
    responses = [chat.read_to_end() for chat in chats]
    for streamed in responses[:2]:  # a text stream is cut: no end of the chunked body, so clients see it
        assert streamed.startswith(b"HTTP/1.1 200") and not streamed.endswith(b"0\r\n\r\n")
    for queued in responses[2:]:  # a silent waiter still has its status to give
        assert queued.startswith(b"HTTP/1.1 503") and b'"error": "shutting_down"' in queued
    assert outcomes.outcomes == ["unknown_error_occurred"] * 6
    assert chat_stream.load()["processing"] == 0 and chat_stream.load()["waiting"] == 0
    assert len(store) == 2  # the two that ran saved their conversation; the queued had nothing to save
    assert not [record for record in caplog.records if record.exc_info]  # a deploy is not a crash


def test_a_chat_arriving_while_shutting_down_gets_503(make_chat_stream: Any, serve: Any) -> None:
    app = ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(), serve=True, openai=True, health=True)
    server = serve(app)
    app.begin_shutdown()
    with server.client() as client:
        chat = client.post("/chat_stream", json={"user_input": "too late"})
        v1 = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "too late"}]})
        health = client.get("/health")
    assert chat.status_code == 503 and chat.json()["error"] == "shutting_down"
    assert v1.status_code == 503 and v1.json()["error"]["code"] == "shutting_down"
    assert health.status_code == 200


def _start(args: list[str], tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HOME": str(tmp_path), **env},
    )


def _stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=HANG_GUARD * 2)
    return process.returncode, output


def _serve(model_dir: Path, tmp_path: Path, *options: str) -> tuple[subprocess.Popen[str], str]:
    port = _free_port()
    command = [sys.executable, "-m", "chatstream_asgi", "serve", "--model", str(model_dir), "--port", str(port)]
    process = _start([*command, "--concurrency", "2", "--queue", "4", *options], tmp_path)
    url = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: _load(url) is not None or process.poll() is not None, timeout=60)
    return process, url


def test_serve_cuts_chats_short_at_its_shutdown_timeout_and_exits_0(model_dir: Path, tmp_path: Path) -> None:
    process, url = _serve(
        model_dir, tmp_path, "--shutdown-timeout", "0", "--max-new-tokens", "3000", "--context-len", "4096"
    )
    try:
        chats = _chats_streaming_and_queued(url, 2, 4, sse=True)
        code, output = _stop(process)
    finally:
        process.kill()
    _assert_sse_cut_short([chat.read_to_end() for chat in chats])
    assert code == 0, output
    assert output.count("chat ended: unknown_error_occurred") == 6, output
    assert output.count("cut short: the server is shutting down") == 6
    assert "Traceback" not in output


def test_serve_cuts_chats_short_at_a_second_ctrl_c_and_exits_0(model_dir: Path, tmp_path: Path) -> None:
    process, url = _serve(
        model_dir, tmp_path, "--shutdown-timeout", "60", "--max-new-tokens", "3000", "--context-len", "4096"
    )
    try:
        chats = _chats_streaming_and_queued(url, 2, 3, sse=True)
        process.send_signal(signal.SIGINT)
        assert wait_until(lambda: _ready_status(url) == "shutting_down")  # the drain has begun
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=HANG_GUARD * 2)
    finally:
        process.kill()
    _assert_sse_cut_short([chat.read_to_end() for chat in chats])
    assert process.returncode == 0, output
    assert output.count("chat ended: unknown_error_occurred") == 5, output
    assert "Traceback" not in output


def test_serve_lets_running_and_queued_chats_finish_within_its_timeout(model_dir: Path, tmp_path: Path) -> None:
    process, url = _serve(model_dir, tmp_path, "--shutdown-timeout", "60", "--max-new-tokens", "1000")
    try:
        chats = _chats_streaming_and_queued(url, 2, 4, sse=True)
        code, output = _stop(process)
    finally:
        process.kill()
    for response in [chat.read_to_end() for chat in chats]:
        assert response.startswith(b"HTTP/1.1 200") and b"event: done" in response
    assert code == 0, output
    assert output.count("chat ended: success") == 6, output


def test_an_app_under_plain_uvicorn_keeps_every_promise_at_its_graceful_timeout(
    model_dir: Path, tmp_path: Path
) -> None:
    port = _free_port()
    command = [sys.executable, "-m", "uvicorn", "tests.shutdown_app:app", "--port", str(port)]
    process = _start(
        [*command, "--timeout-graceful-shutdown", "0"],
        tmp_path,
        CHATSTREAM_TEST_MODEL=str(model_dir),
        CHATSTREAM_TEST_STEP="0.05",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _load(url) is not None or process.poll() is not None, timeout=60)
        chats = _chats_streaming_and_queued(url, 2, 2, sse=True)
        _, output = _stop(process)
    finally:
        process.kill()
    _assert_sse_cut_short([chat.read_to_end() for chat in chats])
    assert output.count("outcome unknown_error_occurred") == 4, output
    assert "Traceback" not in output


def test_serve_stays_operable_while_it_drains(model_dir: Path, tmp_path: Path) -> None:
    """While running and queued chats finish, /ready says why it is out (503, JSON), /metrics
    is scraped, and a new chat is refused with 503 shutting_down, not a refused connection."""
    process, url = _serve(model_dir, tmp_path, "--shutdown-timeout", "60", "--max-new-tokens", "1000", "--metrics")
    try:
        chats = _chats_streaming_and_queued(url, 2, 1, sse=True)
        process.send_signal(signal.SIGTERM)
        assert wait_until(lambda: _ready_status(url) == "shutting_down")
        ready = httpx.get(f"{url}/ready")
        metrics = httpx.get(f"{url}/metrics")
        refused = httpx.post(f"{url}/chat_stream", json={"user_input": "too late"})
        output, _ = process.communicate(timeout=HANG_GUARD * 2)
    finally:
        process.kill()
    assert ready.status_code == 503 and ready.json()["load"]["processing"] == 2
    assert metrics.status_code == 200 and "chatstream_draining 1.0" in metrics.text
    assert "chatstream_requests_running 2.0" in metrics.text and "chatstream_requests_waiting 1.0" in metrics.text
    assert refused.status_code == 503 and refused.json()["error"] == "shutting_down"
    for response in [chat.read_to_end() for chat in chats]:
        assert b"event: done" in response
    assert process.returncode == 0, output
