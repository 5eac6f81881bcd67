"""`chatstream-asgi serve` as a person would run it: a real process, a real port."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chatstream_asgi import ChatStreamMiddleware
from chatstream_asgi.frontends.demo_model import CHAT_TEMPLATE

from .conftest import greedy_reply, open_chat, wait_until


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def run_cli(tmp_path: Path) -> Iterator[object]:
    processes: list[subprocess.Popen[str]] = []

    def run(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
        port = _free_port()
        # Models are built and converted in a fresh home's cache, unless the test names another.
        home = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"} | {"HOME": str(tmp_path)}
        process = subprocess.Popen(
            [sys.executable, "-m", "chatstream_asgi", "serve", "--port", str(port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=home | (env or {}),
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


def test_serve_without_a_model_serves_smollm2_converted_in_the_cache(run_cli: object, smollm2_cache: Path) -> None:
    process, url = run_cli(env={"XDG_CACHE_HOME": str(smollm2_cache)})  # type: ignore[operator]
    banner = _banner(process)
    assert "SmolLM2-135M-Instruct" in banner and "--model" in banner  # what it is, and how to serve another
    assert wait_until(lambda: _ready(url), timeout=120)
    question = {"user_input": "What is the capital of France?", "temperature": 0}  # greedy: the same answer each run
    answer = httpx.post(f"{url}/chat_stream", json=question, timeout=60)
    assert "Paris" in answer.text
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "SmolLM2-135M-Instruct"


def test_a_converted_default_model_is_not_converted_again(smollm2_cache: Path) -> None:
    result = _run("chat", "--max-new-tokens", "4", stdin="Hi\n", env={"XDG_CACHE_HOME": str(smollm2_cache)})
    assert result.returncode == 0, result.stderr
    assert "converting" not in result.stderr and "loading the model" in result.stderr


def test_demo_random_builds_a_readable_model_once_and_says_so(run_cli: object, tmp_path: Path) -> None:
    process, url = run_cli("--model", "demo-random")  # type: ignore[operator]
    assert "random-weight" in _banner(process)
    assert (tmp_path / ".cache" / "chatstream-asgi" / "demo-random" / "config.json").exists()
    assert wait_until(lambda: _ready(url), timeout=60)
    replies = [httpx.post(f"{url}/chat_stream", json={"user_input": f"Hello {n}"}, timeout=60).text for n in range(8)]
    # Whole words and punctuation only: nothing a browser or terminal shows as \ufffd or acts on.
    assert all(re.fullmatch(r"( [A-Za-z]{2,}|[.,!?])*", reply) for reply in replies), replies
    assert any(len(reply.split()) < 100 for reply in replies)  # its end token ends replies
    again = _run("chat", "--model", "demo-random", "--max-new-tokens", "4", stdin="Hi\n", env={"HOME": str(tmp_path)})
    assert again.returncode == 0 and "building" not in again.stderr  # built once


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
        [sys.executable, "-m", "chatstream_asgi", "serve", "--model", str(tmp_path / "nothing-here")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    line = _one_line_error(result)
    assert "no model folder at" in line and "Repo id" not in line


def test_serve_with_a_redis_store_needs_a_shared_key(run_cli: object, model_dir: Path, redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CHATSTREAM_SECRET_KEY"}
    refused = subprocess.run(
        [sys.executable, "-m", "chatstream_asgi", "serve", "--model", str(model_dir), "--session-store", redis_url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert "--secret-key" in _one_line_error(refused)
    _, url = run_cli("--model", str(model_dir), "--session-store", redis_url, "--secret-key", "k")  # type: ignore[operator]
    assert wait_until(lambda: _ready(url), timeout=60)
    with httpx.Client(base_url=url) as client:
        assert client.post("/chat_stream", json={"user_input": "Hi", "max_new_tokens": 4}).status_code == 200
        params = client.get("/get_generation_params").json()
        assert params["success"] is True
        assert client.get("/get_prompt").status_code == 404  # not served by the CLI


def test_serve_refuses_an_unknown_session_store() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatstream_asgi", "serve", "--session-store", "postgres://x"],
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
        "import os, sys; import chatstream_asgi.frontends.cli as cli; early = 'torch' in sys.modules; "
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
    assert '"system_prompt": true' in page.text  # serve takes the page's system prompt


def test_serve_with_no_webui_leaves_the_root_alone(run_cli: object) -> None:
    _, url = run_cli("--model", "mock", "--no-webui")  # type: ignore[operator]
    assert wait_until(lambda: _ready(url), timeout=60)
    assert httpx.get(f"{url}/").status_code == 404


def _run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatstream_asgi", *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def _usage_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one line of a command refused for how it was called (exit code 2)."""
    assert result.returncode == 2, result
    [line] = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    return line


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error line of a command that failed; before it, only progress lines may come."""
    assert result.returncode == 1, result
    *before, error = result.stderr.strip().splitlines()
    assert all(line.startswith("chatstream-asgi: ") and line.endswith("...") for line in before), result.stderr
    assert error.startswith("chatstream-asgi: ") and "Traceback" not in result.stderr
    return error


def test_version_prints_the_packages_version() -> None:
    result = _run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"chatstream-asgi {importlib.metadata.version('chatstream-asgi')}"


def test_serve_on_a_port_in_use_says_so_before_loading_the_model() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("serve", "--port", str(port))
    assert f"cannot listen on 127.0.0.1:{port}" in _one_line_error(result)
    assert "serving" not in result.stdout


def test_serve_on_a_device_torch_cannot_see_says_so_in_one_line() -> None:
    import torch

    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    assert f"--device {device}" in _one_line_error(_run("serve", "--model", "mock", "--device", device))


def test_a_redis_store_without_redis_py_says_what_to_install(tmp_path: Path) -> None:
    shadow = tmp_path / "redis"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('No module named redis')\n")
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    store = ("--session-store", "redis://127.0.0.1:1/0")
    result = _run("serve", "--model", "mock", *store, env={"PYTHONPATH": pythonpath})
    assert 'pip install "chatstream-asgi[redis]"' in _one_line_error(result)


@pytest.fixture
def model_without_template(model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "no-template"
    shutil.copytree(model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_model_without_a_chat_template_asks_for_one(model_without_template: Path) -> None:
    result = _run("chat", "--model", str(model_without_template), stdin="Hi\n")
    assert "--chat-template" in _one_line_error(result).partition("has no chat template")[2]
    assert "loading the model" not in result.stderr  # found out before the weights load


def test_chat_template_takes_a_jinja_file(model_without_template: Path, tmp_path: Path) -> None:
    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    result = _run("chat", "--model", str(model_without_template), "--chat-template", str(template), stdin="Hi\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_chat_template_takes_a_chatstream_prompt_class(model_without_template: Path) -> None:
    args = ("chat", "--model", str(model_without_template), "--chat-template", "ChatPromptRinnaJapaneseGPTNeoxInst")
    result = _run(*args, "--max-new-tokens", "8", stdin="Hi\n")
    assert result.returncode == 0, result.stderr


def test_dtype_loads_the_weights_in_that_type_and_says_each_stage(model_dir: Path) -> None:
    result = _run("chat", "--model", str(model_dir), "--dtype", "bfloat16", "--max-new-tokens", "4", stdin="Hi\n")
    assert result.returncode == 0, result.stderr
    assert "loading the tokenizer" in result.stderr
    assert "loading the model" in result.stderr and "(bfloat16)" in result.stderr
    assert "warming up" in result.stderr


def test_serve_with_metrics_answers_prometheus_text_with_request_ids(run_cli: object) -> None:
    process, url = run_cli("--model", "mock", "--metrics")  # type: ignore[operator]
    _banner(process)
    assert wait_until(lambda: _ready(url), timeout=60)
    with httpx.Client(base_url=url) as client:
        assert client.post("/chat_stream", json={"user_input": "count me"}).text == "count me"
        metrics = client.get("/metrics")
    assert 'chatstream_requests_total{outcome="success"} 1.0' in metrics.text
    assert metrics.headers["x-request-id"]


def test_serve_api_key_scopes_limit_what_a_key_may_do(run_cli: object) -> None:
    _, url = run_cli("--model", "mock", "--metrics", "--api-key", "ops:admin", "--api-key", "user:chat,apis")  # type: ignore[operator]
    assert wait_until(lambda: _ready(url), timeout=60)
    with httpx.Client(base_url=url) as client:
        user, ops = {"Authorization": "Bearer user"}, {"Authorization": "Bearer ops"}
        assert client.post("/chat_stream", json={"user_input": "hi"}, headers=user).status_code == 200
        assert client.get("/metrics", headers=user).status_code == 403
        assert client.get("/metrics", headers=ops).status_code == 200
        assert client.post("/chat_stream", json={"user_input": "hi"}, headers=ops).status_code == 403


def test_serve_refuses_an_unknown_key_scope() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatstream_asgi", "serve", "--api-key", "k:chat,root"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "chat, apis, admin" in result.stderr


def test_the_batching_engine_takes_its_cache_options_and_prefill_chunk_from_the_command_line(model_dir: Path) -> None:
    from chatstream_asgi.frontends.cli import _parser, load_service

    cache = ["--conversation-cache-bytes", "64M", "--cache-shared-system-prompt", "Be brief."]
    chunks = ["--prefill-chunk-tokens", "32", "--prompt-lookup-tokens", "4"]
    args = _parser().parse_args(["serve", "--model", str(model_dir), *cache, *chunks])
    chat_stream, _ = load_service(args, concurrency=1, queue=0)
    try:
        engine: Any = chat_stream.engine
        assert engine.conversations.capacity_bytes == 64 << 20
        assert engine.cache_shared_system_prompt == "Be brief."
        assert engine.chunks.budget(running=4, waiting=[1000]) == 32
        assert engine.prompt_lookup_num_tokens == 4
    finally:
        chat_stream.close()
    default, _ = load_service(_parser().parse_args(["serve", "--model", str(model_dir)]), concurrency=1, queue=0)
    try:
        assert default.engine.prompt_lookup_num_tokens == 24  # type: ignore[attr-defined]
    finally:
        default.close()


@pytest.mark.parametrize("size", ["lots", "-1", "2T", ""])
def test_a_cache_size_that_is_not_a_size_is_refused_with_the_expected_form(size: str) -> None:
    result = _run("serve", "--conversation-cache-bytes", size)
    assert result.returncode == 2
    assert "--conversation-cache-bytes" in result.stderr and "Traceback" not in result.stderr


def test_a_port_out_of_range_is_one_line() -> None:
    line = _usage_error(_run("serve", "--port", "99999"))
    assert "--port" in line and "1 to 65535" in line and "--help" in line


def test_options_without_a_command_ask_if_serve_was_meant() -> None:
    line = _usage_error(_run("--port", "8000"))
    assert "did you mean `chatstream-asgi serve --port 8000`" in line


def test_metrics_without_prometheus_client_says_what_to_install_before_the_model_loads(tmp_path: Path) -> None:
    shadow = tmp_path / "prometheus_client"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('No module named prometheus_client')\n")
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    result = _run("serve", "--metrics", env={"PYTHONPATH": pythonpath, "XDG_CACHE_HOME": str(tmp_path / "empty")})
    assert 'pip install "chatstream-asgi[metrics]"' in _one_line_error(result)
    assert "loading" not in result.stderr and "converting" not in result.stderr


def test_a_redis_store_that_does_not_answer_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    port = _free_port()  # a port nobody listens on
    store = ("--session-store", f"redis://127.0.0.1:{port}/0", "--secret-key", "k")
    result = _run("serve", *store, env={"XDG_CACHE_HOME": str(tmp_path / "empty")})
    line = _one_line_error(result)
    assert f"redis://127.0.0.1:{port}/0 does not answer" in line
    assert "loading" not in result.stderr and "converting" not in result.stderr


@pytest.mark.parametrize("proxy_settings", [{}, {"NO_PROXY": "localhost"}], ids=["no-proxy", "only-exclusions"])
def test_a_hub_id_with_the_hub_unreachable_fails_fast_saying_what_to_do(
    tmp_path: Path, proxy_settings: dict[str, str]
) -> None:
    port = _free_port()
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")}
    env |= proxy_settings  # exclusions alone are no proxy: the hub is still probed
    result = _run("serve", "--model", "someone/some-model", env=env)
    line = _one_line_error(result)
    assert f"cannot reach http://127.0.0.1:{port}" in line
    assert "HF_HUB_OFFLINE=1" in line and "--model DIR" in line
    assert "Retrying" not in result.stderr  # no retries, no duplicated warnings


def test_the_default_model_without_its_converter_says_what_to_install(tmp_path: Path) -> None:
    shadow = tmp_path / "gguf"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('No module named gguf')\n")
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    result = _run("serve", env={"PYTHONPATH": pythonpath, "XDG_CACHE_HOME": str(tmp_path / "empty")})
    line = _one_line_error(result)
    assert 'pip install "chatstream-asgi[demo]"' in line and "--model demo-random" in line


def test_the_banners_curl_carries_the_api_key_header(run_cli: object) -> None:
    process, _ = run_cli("--model", "mock", "--api-key", "s3cret")  # type: ignore[operator]
    _banner(process)
    assert process.stdout is not None
    curl = next(line for line in process.stdout if "curl" in line)
    # stdout is not a terminal here (a log, say): the key itself stays out of it.
    assert "-H 'Authorization: Bearer KEY'" in curl and "s3cret" not in curl


def test_a_stop_that_cuts_chats_short_logs_no_error_line(run_cli: object) -> None:
    process, url = run_cli("--model", "mock", "--shutdown-timeout", "0.5")  # type: ignore[operator]
    assert wait_until(lambda: _ready(url), timeout=60)
    long_chat = open_chat(url, "word " * 400)
    assert long_chat.recv(100).startswith(b"HTTP/1.1 200")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    long_chat.close()
    assert process.returncode == 0
    assert "ERROR" not in output and "Traceback" not in output
    assert "--shutdown-timeout reached" in output


def test_serve_help_groups_its_options_and_shows_an_example() -> None:
    result = _run("serve", "--help")
    assert result.returncode == 0
    for heading in ("model:", "listening:", "capacity:", "sessions and access:", "routes and stopping:", "examples:"):
        assert heading in result.stdout
    assert "chatstream-asgi serve --model" in result.stdout


@pytest.mark.parametrize(("option", "value"), [("--port", "abc"), ("--concurrency", "x"), ("--shutdown-timeout", "q")])
def test_a_value_of_the_wrong_kind_is_named_in_the_users_terms(option: str, value: str) -> None:
    line = _usage_error(_run("serve", option, value))
    assert f"argument {option}: expected" in line and repr(value) in line
    assert "invalid" not in line  # argparse's own "invalid _port value" names a function


def test_the_examples_extra_installs_every_server_the_docs_show() -> None:
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    examples = {requirement.split(">")[0].split("=")[0] for requirement in extras["optional-dependencies"]["examples"]}
    servers_doc = (Path(__file__).resolve().parent.parent / "docs" / "servers.md").read_text()
    shown = {server for server in ("uvicorn", "hypercorn", "granian") if f"\n{server} " in servers_doc}
    assert shown == {"uvicorn", "hypercorn", "granian"}
    assert shown - {"uvicorn"} <= examples  # uvicorn is a dependency of the package itself


@pytest.fixture
def upstream(make_chat_stream: Any, serve: Any) -> Any:
    """A chatstream-asgi server with the tiny model, speaking /v1 with a key: what `--upstream` fronts."""
    chat_stream = make_chat_stream(max_new_tokens=200, name="tiny")
    return serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, openai=True, api_keys=["up-key"]))


def test_serve_upstream_chats_through_the_server_it_fronts_as_the_model_it_lists(
    run_cli: object, upstream: Any, model: Any, tokenizer: Any
) -> None:
    process, url = run_cli("--upstream", upstream.url, env={"CHATSTREAM_UPSTREAM_API_KEY": "up-key"})  # type: ignore[operator]
    banner = _banner(process)
    assert f"'tiny' of the upstream server at {upstream.url}/v1" in banner and "front mode" in banner
    assert "up-key" not in banner
    assert wait_until(lambda: _ready(url), timeout=60)
    with httpx.Client(base_url=url, timeout=60) as client:
        reply = client.post("/chat_stream", json={"user_input": "Hello", "temperature": 0, "max_new_tokens": 8})
        again = client.post("/chat_stream", json={"user_input": "And more", "max_new_tokens": 4})
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert reply.status_code == 200 and reply.text == greedy_reply(model, tokenizer, "Hello", 8)
    assert again.status_code == 200  # the front keeps the conversation; the upstream stays stateless


def test_serve_upstream_takes_its_key_from_the_flag(run_cli: object, upstream: Any) -> None:
    _, url = run_cli("--upstream", f"{upstream.url}/v1", "--upstream-api-key", "up-key")  # type: ignore[operator]
    assert wait_until(lambda: _ready(url), timeout=60)
    assert httpx.post(f"{url}/chat_stream", json={"user_input": "Hi", "max_new_tokens": 4}, timeout=60).is_success


def test_serve_upstream_that_refuses_the_key_says_which_option_sets_it(upstream: Any) -> None:
    port = str(_free_port())
    line = _one_line_error(_run("serve", "--upstream", upstream.url, "--upstream-api-key", "wrong", "--port", port))
    assert "answered 401" in line and "--upstream-api-key" in line and "--upstream-model" in line


def test_serve_upstream_that_cannot_be_asked_for_its_model_says_to_name_it() -> None:
    port = _free_port()  # nobody listens there
    line = _one_line_error(_run("serve", "--upstream", f"http://127.0.0.1:{port}/v1"))
    assert f"cannot ask http://127.0.0.1:{port}/v1/models" in line and "pass --upstream-model NAME" in line


def test_serve_upstream_with_its_model_named_starts_before_its_upstream(run_cli: object, make_chat_stream: Any) -> None:
    port = _free_port()
    _, url = run_cli("--upstream", f"http://127.0.0.1:{port}", "--upstream-model", "tiny")  # type: ignore[operator]
    assert wait_until(lambda: _answers(f"{url}/health"), timeout=60)
    down = httpx.get(f"{url}/ready")
    assert down.status_code == 503 and down.json()["status"] == "upstream_unavailable"
    app = ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(name="tiny"), openai=True)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: _ready(url), timeout=60)
        answer = httpx.post(f"{url}/chat_stream", json={"user_input": "Hi", "max_new_tokens": 4}, timeout=60)
        assert answer.status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)


def _strict_upstream() -> Starlette:
    """An upstream that, like OpenAI's API, refuses a field it does not know (here `cache_salt`)."""

    async def completions(request: Request) -> Response:
        body = await request.json()
        if "cache_salt" in body:
            error = {"message": "Unrecognized request argument supplied: cache_salt", "type": "invalid_request_error"}
            return JSONResponse({"error": error}, status_code=400)
        chunk = {"choices": [{"index": 0, "delta": {"content": "fine"}, "finish_reason": "stop"}]}
        return Response(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n", media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def test_serve_upstream_no_cache_salt_chats_with_an_upstream_that_refuses_the_field(
    run_cli: object, serve: Any
) -> None:
    strict = serve(_strict_upstream())
    for flags, status in (((), 502), (("--upstream-no-cache-salt",), 200)):
        _, url = run_cli("--upstream", strict.url, "--upstream-model", "m", *flags)  # type: ignore[operator]
        assert wait_until(lambda url=url: _answers(f"{url}/health"), timeout=60)
        answer = httpx.post(f"{url}/chat_stream", json={"user_input": "Hi"}, timeout=60)
        assert answer.status_code == status, (flags, answer.text)
        if status == 502:  # the upstream's own words say which field it refused
            assert "cache_salt" in answer.json()["detail"]
        else:
            assert answer.text == "fine"


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("option", [("--model", "mock"), ("--device", "cpu"), ("--context-len", "4096")])
def test_serve_upstream_refuses_the_options_of_a_local_model(option: tuple[str, str]) -> None:
    line = _usage_error(_run("serve", "--upstream", "http://127.0.0.1:1/v1", *option))
    assert f"--upstream cannot go with {option[0]}" in line


@pytest.mark.parametrize(
    "option",
    [
        ("--upstream-model", "m"),
        ("--upstream-api-key", "k"),
        ("--upstream-timeout", "5"),
        ("--upstream-no-cache-salt",),
    ],
)
def test_the_upstream_options_need_upstream(option: tuple[str, ...]) -> None:
    assert f"{option[0]} needs --upstream URL" in _usage_error(_run("serve", *option))


@pytest.mark.parametrize("url", ["gpu-host:8000", "ftp://gpu-host/v1", "http://gpu-host:8000/v1?x=1"])
def test_serve_upstream_takes_only_an_http_url(url: str) -> None:
    assert "argument --upstream: expected an http:// or https:// URL" in _usage_error(_run("serve", "--upstream", url))


def test_lock_ttl_store_timeout_and_max_queue_wait_reach_the_store_and_the_queue(redis_url: str) -> None:
    from chatstream_asgi.frontends.cli import _parser, build_app

    store = ("--session-store", redis_url, "--secret-key", "k", "--lock-ttl", "12.5", "--store-timeout", "0.75")
    args = _parser().parse_args(["serve", "--model", "mock", *store, "--max-queue-wait", "3"])
    app, _ = build_app(args)
    store: Any = app.session_store
    assert (store.lock_ttl, store.timeout) == (12.5, 0.75)
    assert app.service.max_queue_wait == 3


def test_admission_trust_forwarded_and_the_body_limits_reach_the_app() -> None:
    from chatstream_asgi.frontends.cli import _parser, build_app

    defaults, _ = build_app(_parser().parse_args(["serve", "--model", "mock"]))
    assert (defaults.service.admission.policy, defaults.service.trust_forwarded) == ("fifo", False)
    assert (defaults.max_body_size, defaults.body_timeout) == (1 << 20, 30.0)
    given = ["--admission", "fair", "--trust-forwarded", "--max-body-size", "64K", "--body-timeout", "2.5"]
    app, _ = build_app(_parser().parse_args(["serve", "--model", "mock", *given]))
    assert (app.service.admission.policy, app.service.trust_forwarded) == ("fair", True)
    assert (app.max_body_size, app.body_timeout) == (64 << 10, 2.5)


def test_serve_refuses_a_body_over_max_body_size_with_413(run_cli: object) -> None:
    _, url = run_cli("--model", "mock", "--max-body-size", "1K")  # type: ignore[operator]
    assert wait_until(lambda: _ready(url), timeout=60)
    assert httpx.post(f"{url}/chat_stream", json={"user_input": "x" * 900}).status_code == 200
    too_large = httpx.post(f"{url}/chat_stream", json={"user_input": "x" * 1100})
    assert too_large.status_code == 413 and too_large.json()["error"] == "body_too_large"


@pytest.mark.parametrize(
    ("option", "value"), [("--admission", "lifo"), ("--max-body-size", "0"), ("--body-timeout", "0")]
)
def test_serve_refuses_an_admission_policy_or_body_limit_it_cannot_use(option: str, value: str) -> None:
    assert f"argument {option}:" in _usage_error(_run("serve", option, value))


@pytest.mark.parametrize("option", [("--lock-ttl", "10"), ("--store-timeout", "1")])
def test_the_store_options_need_a_redis_store(option: tuple[str, str]) -> None:
    line = _usage_error(_run("serve", "--model", "mock", *option))
    assert f"{option[0]} applies to a shared store only" in line and "--session-store redis://" in line


@pytest.mark.parametrize("option", ["--lock-ttl", "--store-timeout", "--max-queue-wait", "--upstream-timeout"])
def test_a_time_limit_must_be_more_than_0_seconds(option: str) -> None:
    assert f"argument {option}: must be more than 0 seconds" in _usage_error(_run("serve", option, "0"))


def test_a_redis_store_that_stalls_is_refused_naming_the_store_timeout(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        store = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        result = _run(
            "serve", "--session-store", store, "--secret-key", "k", "--store-timeout", "0.3",
            env={"XDG_CACHE_HOME": str(tmp_path / "empty")},
        )  # fmt: skip
    assert f"{store} does not answer within 0.3 s (its --store-timeout)" in _one_line_error(result)


def test_serve_max_queue_wait_ends_a_wait_with_503_queue_timeout(run_cli: object) -> None:
    _, url = run_cli("--model", "mock", "--concurrency", "1", "--queue", "1", "--max-queue-wait", "0.5")  # type: ignore[operator]
    assert wait_until(lambda: _ready(url), timeout=60)
    long_chat = open_chat(url, "word " * 400)  # the mock echoes it slowly: it holds the only slot
    assert long_chat.recv(100).startswith(b"HTTP/1.1 200")
    waited = httpx.post(f"{url}/chat_stream", json={"user_input": "Hi"}, timeout=60)
    long_chat.close()
    assert waited.status_code == 503 and waited.json()["error"] == "queue_timeout"
    assert int(waited.headers["retry-after"]) >= 1


def test_serve_https_only_names_the_session_cookie_host_prefixed_and_secure(run_cli: object) -> None:
    process, url = run_cli("--model", "mock", "--https-only")  # type: ignore[operator]
    _banner(process)
    assert wait_until(lambda: _ready(url))
    response = httpx.post(f"{url}/chat_stream", json={"user_input": "Hello"})
    set_cookie = response.headers["set-cookie"]
    assert set_cookie.startswith("__Host-chatstream_session=") and "; Secure" in set_cookie
    assert "__Host-chatstream_session" in " ".join(_run("serve", "--help").stdout.split())


def test_the_banners_curl_line_chats_and_goes_on_chatting_with_a_cookie_jar(run_cli: object, tmp_path: Path) -> None:
    process, url = run_cli("--model", "mock")  # type: ignore[operator]
    _banner(process)
    assert process.stdout is not None
    curl = shlex.split(next(line for line in process.stdout if "curl" in line).split("chat:", 1)[1])
    assert wait_until(lambda: _ready(url))
    jar = str(tmp_path / "cookies")
    # As printed; then twice keeping the cookie, so the second turn is one of a conversation (and
    # is checked as a cookie-carrying POST: JSON, from no other origin).
    for command in (curl, [*curl, "-f", "-c", jar], [*curl, "-f", "-b", jar, "-c", jar]):
        turn = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert turn.returncode == 0 and "Hello" in turn.stdout, (command, turn.stdout, turn.stderr)


def test_serve_allowed_origin_lets_that_page_post_with_the_cookie_and_no_other(run_cli: object) -> None:
    trusted = "https://app.example.com"
    process, url = run_cli("--model", "mock", "--allowed-origin", trusted, "--allowed-origin", "http://b.example:81")  # type: ignore[operator]
    _banner(process)
    assert wait_until(lambda: _ready(url))
    with httpx.Client(base_url=url) as client:
        assert client.post("/chat_stream", json={"user_input": "Hello"}).status_code == 200
        change = {"max_new_tokens": 3}
        assert client.post("/set_generation_params", json=change, headers={"Origin": trusted}).status_code == 200
        refused = client.post("/set_generation_params", json=change, headers={"Origin": "https://evil.example.com"})
    assert refused.status_code == 403 and "--allowed-origin" in refused.json()["detail"]
    result = _run("serve", "--allowed-origin", "https://app.example.com/path")
    assert result.returncode == 2 and "not an origin" in result.stderr
