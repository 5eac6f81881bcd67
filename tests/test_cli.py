"""`chatstream-asgi serve` as a person would run it: a real process, a real port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import wait_until


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def run_cli(tmp_path: Path) -> Iterator[object]:
    processes: list[subprocess.Popen[str]] = []

    def run(*args: str) -> tuple[subprocess.Popen[str], str]:
        port = _free_port()
        env = {**os.environ, "HOME": str(tmp_path)}  # the demo model is built under a fresh home
        process = subprocess.Popen(
            [sys.executable, "-m", "chatstream_asgi.cli", "serve", "--port", str(port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        processes.append(process)
        return process, f"http://127.0.0.1:{port}"

    yield run
    for process in processes:
        process.terminate()
        process.wait(30)


def _banner(process: subprocess.Popen[str]) -> str:
    """The line that says what is served (progress bars of model loading may come first)."""
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("chatstream-asgi serving"):
            return line
    raise AssertionError(f"no banner; exit code {process.wait()}")


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready").status_code == 200
    except httpx.TransportError:
        return False


def test_serve_without_a_model_builds_the_demo_model_and_says_so(run_cli: object, tmp_path: Path) -> None:
    process, url = run_cli()  # type: ignore[operator]
    banner = _banner(process)
    assert "demo model" in banner and "random weights" in banner
    assert (tmp_path / ".cache" / "chatstream-asgi" / "demo-model" / "config.json").exists()
    assert wait_until(lambda: _ready(url), timeout=60)
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    response = httpx.post(f"{url}/chat_stream", json={"user_input": "Hello", "max_new_tokens": 8})
    assert response.status_code == 200 and response.text


def test_serve_takes_a_model_folder_and_the_limits(run_cli: object, model_dir: Path) -> None:
    process, url = run_cli("--model", str(model_dir), "--concurrency", "3", "--queue", "0", "--max-new-tokens", "16")  # type: ignore[operator]
    assert str(model_dir) in _banner(process)
    assert wait_until(lambda: _ready(url), timeout=60)
    load = httpx.get(f"{url}/ready").json()["load"]
    assert load["num_of_concurrent_executions"] == 3 and load["max_queue_size"] == 0
    too_long = httpx.post(f"{url}/chat_stream", json={"user_input": "Hi", "max_new_tokens": 17})
    assert too_long.status_code == 422


def test_serve_with_a_missing_model_folder_fails_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatstream_asgi.cli", "serve", "--model", str(tmp_path / "nothing-here")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert "cannot start" in result.stderr


def test_serve_with_a_redis_store_needs_a_shared_key(run_cli: object, model_dir: Path, redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CHATSTREAM_SECRET_KEY"}
    refused = subprocess.run(
        [sys.executable, "-m", "chatstream_asgi.cli", "serve", "--model", str(model_dir), "--session-store", redis_url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert refused.returncode == 1 and "secret_key" in refused.stderr
    _, url = run_cli("--model", str(model_dir), "--session-store", redis_url, "--secret-key", "k")  # type: ignore[operator]
    assert wait_until(lambda: _ready(url), timeout=60)
    with httpx.Client(base_url=url) as client:
        assert client.post("/chat_stream", json={"user_input": "Hi", "max_new_tokens": 4}).status_code == 200
        params = client.get("/get_generation_params").json()
        assert params["success"] is True
        assert client.get("/get_prompt").status_code == 404  # not served by the CLI


def test_serve_refuses_an_unknown_session_store() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatstream_asgi.cli", "serve", "--session-store", "postgres://x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "redis://" in result.stderr


def test_serve_mock_with_an_api_key_guards_everything_but_health(run_cli: object) -> None:
    process, url = run_cli("--model", "mock", "--api-key", "s3cret")  # type: ignore[operator]
    assert "mock engine" in _banner(process)
    assert wait_until(lambda: _ready(url), timeout=60)
    with httpx.Client(base_url=url) as client:
        assert client.post("/chat_stream", json={"user_input": "echo me"}).status_code == 401
        assert client.get("/v1/models").status_code == 401
        assert client.get("/health").status_code == 200
        authorized = {"Authorization": "Bearer s3cret"}
        assert client.post("/chat_stream", json={"user_input": "echo me"}, headers=authorized).text == "echo me"
        models = client.get("/v1/models", headers=authorized).json()
        assert models["data"][0]["id"] == "mock"


def test_the_command_tunes_openmp_before_torch_loads() -> None:
    probe = (
        "import os, sys; import chatstream_asgi.cli as cli; early = 'torch' in sys.modules; "
        "cli.main(['serve', '--model', '/nonexistent/model']); print(early, os.environ['GOMP_SPINCOUNT'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.split() == ["False", "20000"]
    mine = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env={**env, "GOMP_SPINCOUNT": "5"}
    )
    assert mine.stdout.split() == ["False", "5"]  # a user's own setting wins


def test_serve_serves_the_chat_page_and_prints_its_url(run_cli: object) -> None:
    process, url = run_cli("--model", "mock")  # type: ignore[operator]
    _banner(process)
    assert process.stdout is not None
    assert f"chat page: {url}/" in process.stdout.readline()
    assert wait_until(lambda: _ready(url), timeout=60)
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and 'src="chatstream.js"' in page.text


def test_serve_with_no_webui_leaves_the_root_alone(run_cli: object) -> None:
    _, url = run_cli("--model", "mock", "--no-webui")  # type: ignore[operator]
    assert wait_until(lambda: _ready(url), timeout=60)
    assert httpx.get(f"{url}/").status_code == 404
