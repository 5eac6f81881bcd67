"""The README's ASGI servers, run as a person would: uvicorn, hypercorn and granian serving an example app."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import HANG_GUARD, wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _command(server: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [str(BIN / "uvicorn"), "starlette_serve:app", "--port", str(port)]
    if server == "hypercorn":
        return [str(BIN / "hypercorn"), "starlette_serve:app", "--bind", f"127.0.0.1:{port}"]
    return [str(BIN / "granian"), "--interface", "asgi", "--port", str(port), "starlette_serve:app"]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "granian"])
def test_an_example_app_streams_under_each_asgi_server(server: str, model_dir: Path) -> None:
    port = _free_port()
    pythonpath = os.pathsep.join(filter(None, [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen(
        _command(server, port),
        cwd=EXAMPLES,
        env={**os.environ, "CHATSTREAM_MODEL": str(model_dir), "PYTHONPATH": pythonpath},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _healthy(url), timeout=HANG_GUARD * 2), f"{server} did not start"
        with httpx.stream(
            "POST", f"{url}/chat_stream?format=sse", json={"user_input": "Hi", "max_new_tokens": 6}, timeout=HANG_GUARD
        ) as response:
            assert response.status_code == 200
            body = response.read().decode()
        assert '"delta"' in body and "event: done" in body
    finally:
        process.terminate()
        process.wait(HANG_GUARD)
