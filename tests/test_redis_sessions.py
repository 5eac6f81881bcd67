"""Conversations in Redis: shared by replicas, locked across them, and surviving Redis going away."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.routing import Route

from chatstream_asgi import ChatStreamMiddleware, RedisStore
from chatstream_asgi.errors import SessionStoreUnavailable

from .conftest import (
    HANG_GUARD,
    ModelHooks,
    Outcomes,
    RedisServer,
    free_port,
    open_chat,
    read_first_text,
    read_until,
    wait_until,
)
from .faultproxy import FaultProxy

SECRET = "a-key-every-replica-shares"


@pytest.fixture
def replica(make_chat_stream: Any, serve: Any, redis_url: str, redis_prefix: str) -> Any:
    """Start a server (its own ChatStream and RedisStore) on the shared Redis."""

    def start(url: str = redis_url, **store_options: Any) -> tuple[Any, Outcomes]:
        outcomes = Outcomes()
        store = RedisStore(url, **{"prefix": redis_prefix, **store_options})
        app = ChatStreamMiddleware(
            Starlette(),
            chat_stream=make_chat_stream(stream_format="sse"),
            serve=True,
            callback=outcomes,
            session_store=store,
            secret_key=SECRET,
            apis={"all": True},
        )
        return serve(app), outcomes

    return start


def _usage(sse_body: str) -> dict[str, int]:
    last = sse_body.strip().split("\r\n\r\n")[-1]
    usage: dict[str, int] = json.loads(last.split("data: ", 1)[1])["usage"]
    return usage


def test_two_replicas_continue_one_conversation_whichever_a_turn_lands_on(replica: Any) -> None:
    (a, a_outcomes), (b, b_outcomes) = replica(), replica()
    with a.client() as client_a:
        first = client_a.post("/chat_stream", json={"user_input": "first, on replica A"})
        cookies = client_a.cookies
    a_outcomes.wait()
    with b.client(cookies=cookies) as client_b:
        second = client_b.post("/chat_stream", json={"user_input": "second, on replica B"})
        assert "set-cookie" not in second.headers  # B accepted A's cookie
    b_outcomes.wait()
    with a.client(cookies=cookies) as client_a:
        third = client_a.post("/chat_stream", json={"user_input": "third, back on A"})
    a_outcomes.wait(2)
    assert _usage(second.text)["prompt_tokens"] > _usage(first.text)["prompt_tokens"]
    assert _usage(third.text)["prompt_tokens"] > _usage(second.text)["prompt_tokens"]
    prompt = a_outcomes.calls[1][0].state.session.get_session()["chat_prompt"]
    assert [c.get_message() for c in prompt.requester_messages] == [
        "first, on replica A",
        "second, on replica B",
        "third, back on A",
    ]


def test_second_turn_on_another_replica_while_one_runs_is_409(replica: Any, hooks: ModelHooks) -> None:
    (a, a_outcomes), (b, _) = replica(), replica()
    with a.client() as client_a:
        client_a.post("/chat_stream", json={"user_input": "hello"})
        cookie = f"chatstream_session={client_a.cookies['chatstream_session']}"
    a_outcomes.wait()
    hooks.step_delay = 0.1  # the turn outlasts both refusals below (each waits a short grace for a Stop)
    running = open_chat(a.url, "a long one", cookie=cookie)
    read_until(running, b"data: ")
    with b.client(headers={"Cookie": cookie}) as client_b:
        busy = client_b.post("/chat_stream", json={"user_input": "meanwhile on B"})
        clear = client_b.post("/clear_context")
    assert busy.status_code == 409 and busy.json()["error"] == "session_busy"
    assert clear.status_code == 409 and clear.json()["success"] is False
    assert busy.headers["retry-after"] == clear.headers["retry-after"] == "1"
    running.close()
    assert a_outcomes.wait(2)[1] == "client_disconnected_while_streaming"
    with b.client(headers={"Cookie": cookie}) as client_b:
        assert client_b.post("/chat_stream", json={"user_input": "now on B"}).status_code == 200


def test_redis_going_away_gives_503_quickly_and_service_resumes_when_it_returns(replica: Any) -> None:
    redis_server = RedisServer()
    redis_server.start()
    try:
        server, outcomes = replica(redis_server.url, timeout=0.5)
        with server.client() as client:
            assert client.post("/chat_stream", json={"user_input": "before"}).status_code == 200
            outcomes.wait()
            redis_server.stop()
            down = client.post("/chat_stream", json={"user_input": "while down"})
            assert down.status_code == 503
            assert down.json()["error"] == "session_store_unavailable"
            api_down = client.get("/get_generation_params")
            assert api_down.status_code == 503 and api_down.json()["success"] is False
            redis_server.start()
            assert wait_until(lambda: client.post("/chat_stream", json={"user_input": "after"}).status_code == 200)
        assert outcomes.outcomes[0] == "success" and outcomes.wait(2)[-1] == "success"
    finally:
        redis_server.stop()


def test_redis_store_without_a_shared_secret_is_refused_at_start(
    make_chat_stream: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHATSTREAM_SECRET_KEY", raising=False)
    with pytest.raises(ValueError, match="secret_key"):
        ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(), session_store=RedisStore(redis_url))
    monkeypatch.setenv("CHATSTREAM_SECRET_KEY", "from-the-environment")
    ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(), session_store=RedisStore(redis_url))


def test_redis_going_away_mid_reply_does_not_stop_the_reply(replica: Any, hooks: ModelHooks, caplog: Any) -> None:
    redis_server = RedisServer()
    redis_server.start()
    try:
        server, outcomes = replica(redis_server.url, timeout=0.3, lock_ttl=0.3)  # refreshed every 0.1 s
        hooks.step_delay = 0.02
        sock = open_chat(server.url, "a long one")
        read_until(sock, b"data: ")
        redis_server.stop()
        body = read_until(sock, b"event: done")
        sock.close()
        assert b"event: error" not in body
        assert outcomes.wait() == ["success"]  # the reply went out; only its record was lost
        assert wait_until(lambda: "not refreshed" in caplog.text and "not saved" in caplog.text)
    finally:
        redis_server.stop()


def test_a_turn_that_timed_out_in_a_redis_freeze_leaves_no_lock_after_the_thaw(replica: Any) -> None:
    redis_server = RedisServer()
    redis_server.start()
    try:
        server, outcomes = replica(redis_server.url, timeout=0.3)
        with server.client() as warm:  # a pooled connection, so the frozen Redis gets the commands
            assert warm.post("/chat_stream", json={"user_input": "warm"}).status_code == 200
        with server.client() as client:
            redis_server.freeze()
            frozen = client.post("/chat_stream", json={"user_input": "during the freeze"})
            assert frozen.status_code == 503  # its cookie came with it: the client will retry
            redis_server.thaw()  # Redis now runs the SET NX that timed out
            after = client.post("/chat_stream", json={"user_input": "after the thaw"})
        assert after.status_code == 200  # not 409 for the lock's TTL
        assert outcomes.wait(2) == ["success", "success"]
    finally:
        redis_server.thaw()
        redis_server.stop()


# -- turn locks through a faulty link: a lock never outlives the request that asked for it ---------


@pytest.fixture
def link(redis_url: str, redis_prefix: str) -> Iterator[tuple[FaultProxy, Any]]:
    """A `FaultProxy` in front of the test Redis, and a direct client to look at what Redis holds."""
    import redis

    direct = redis.Redis.from_url(redis_url, decode_responses=True)
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with FaultProxy(port) as proxy:
        yield proxy, direct
    direct.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py's asyncio client
async def test_a_lock_redis_took_while_its_answer_was_late_is_released_before_the_next_lock(
    link: tuple[FaultProxy, Any], redis_prefix: str
) -> None:
    proxy, direct = link
    store = RedisStore(proxy.url(), prefix=redis_prefix, timeout=0.3)
    try:
        await store.unlock_turn("warm", str(await store.lock_turn("warm")))  # connected, clocks compared
        answers = proxy.answers
        proxy.hold_answers()  # Redis runs the SET NX at once; its answer comes after the timeout
        with pytest.raises(SessionStoreUnavailable):
            await store.lock_turn("conversation")
        assert proxy.wait_for_answers(answers + 1)
        assert direct.get(f"{redis_prefix}lock:conversation") is not None  # taken, and nobody heard
        proxy.release_answers()
        assert await store.lock_turn("conversation") is not None  # not refused for the lock's TTL
    finally:
        await store.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_release_redis_never_received_is_made_as_soon_as_redis_answers_again(
    link: tuple[FaultProxy, Any], redis_prefix: str
) -> None:
    proxy, direct = link
    store = RedisStore(proxy.url(), prefix=redis_prefix, timeout=0.3)
    try:
        token = await store.lock_turn("conversation")
        assert token is not None
        proxy.drop_requests = True
        with pytest.raises(SessionStoreUnavailable):
            await store.unlock_turn("conversation", token)
        proxy.drop_requests = False
        assert direct.get(f"{redis_prefix}lock:conversation") == token  # the release never arrived
        assert await store.load("another conversation") is None  # any call, once Redis answers...
        assert direct.get(f"{redis_prefix}lock:conversation") is None  # ...releases it
    finally:
        await store.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_lock_request_reaching_redis_after_its_caller_gave_up_takes_nothing(
    link: tuple[FaultProxy, Any], redis_prefix: str
) -> None:
    proxy, direct = link
    store = RedisStore(proxy.url(), prefix=redis_prefix, timeout=1.0)
    try:
        assert await store.load("connect first") is None
        # The clocks are compared over a slow link, as over a connection opened under load: the
        # deadline must not count the link's delay as Redis's clock being ahead.
        proxy.request_delay = 0.8
        await store.unlock_turn("warm", str(await store.lock_turn("warm")))
        proxy.request_delay = 1.25  # past the timeout: the caller gives up before Redis sees it
        answers = proxy.answers
        with pytest.raises(SessionStoreUnavailable):
            await store.lock_turn("conversation")
        assert proxy.wait_for_answers(answers + 1)  # Redis has run it by now
        assert direct.get(f"{redis_prefix}lock:conversation") is None
    finally:
        await store.close()


def test_a_full_server_refuses_with_429_before_touching_a_stalled_store(
    make_chat_stream: Any, serve: Any, hooks: ModelHooks, redis_prefix: str
) -> None:
    redis_server = RedisServer()
    redis_server.start()
    release = threading.Event()
    try:
        chat_stream = make_chat_stream(num_of_concurrent_executions=1, max_queue_size=0)
        store = RedisStore(redis_server.url, prefix=redis_prefix, timeout=5.0)
        app = ChatStreamMiddleware(
            Starlette(), chat_stream=chat_stream, serve=True, session_store=store, secret_key=SECRET
        )
        server = serve(app)
        hooks.hold = release  # the one slot's generation is stuck mid-step
        running = open_chat(server.url, "holds the only slot")
        assert hooks.prefill_started.wait(30)
        redis_server.freeze()
        with server.client() as client:  # a new conversation: nothing to read from the store first
            refused = client.post("/chat_stream", json={"user_input": "one too many"})
        assert refused.status_code == 429  # not 503 after the store's 5 s timeout
        running.close()
    finally:
        release.set()
        redis_server.thaw()
        redis_server.stop()


def test_a_replica_killed_mid_turn_frees_its_conversation_for_the_others_within_seconds(
    model_dir: Path, tmp_path: Path, replica: Any, redis_url: str
) -> None:
    """A real process, SIGKILLed while it streams: its turn lock is not released by anyone, it
    expires (`lock_ttl`, 3 s), and the conversation goes on on the other replica, whose 409s
    meanwhile said when to retry."""
    port = free_port()
    killed = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatstream_asgi",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--session-store",
            redis_url,
            "--secret-key",
            SECRET,
            "--max-new-tokens",
            "3000",
            "--context-len",
            "4096",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _answers(f"{url}/ready") or killed.poll() is not None, timeout=60)
        with httpx.Client(base_url=url) as client:
            client.post("/chat_stream", json={"user_input": "hello", "max_new_tokens": 2})
            cookie = f"chatstream_session={client.cookies['chatstream_session']}"
        running = open_chat(url, "a long one", cookie=cookie)
        read_first_text(running)
        killed.kill()
        killed.wait(HANG_GUARD)
    finally:
        killed.kill()
    survivor, _ = replica(redis_url, prefix="chatstream:")  # the CLI's prefix
    started, busy = time.monotonic(), 0
    with survivor.client(headers={"Cookie": cookie}) as client:
        while (answer := client.post("/chat_stream", json={"user_input": "after the crash"})).status_code == 409:
            busy += 1
            time.sleep(float(answer.headers["retry-after"]))
        recovered = time.monotonic() - started
        assert answer.status_code == 200
        history = client.get("/get_history").json()["messages"]
    assert [m["content"] for m in history if m["role"] == "user"] == ["hello", "after the crash"]  # the cut turn is not
    assert busy >= 1 and recovered < 5.0, (busy, recovered)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def test_ready_says_the_session_store_is_unavailable_while_redis_is_down(
    make_chat_stream: Any, serve: Any, redis_prefix: str, own_redis: RedisServer
) -> None:
    store = RedisStore(own_redis.url, prefix=redis_prefix, timeout=0.5)
    app = ChatStreamMiddleware(
        Starlette(), chat_stream=make_chat_stream(), serve=True, health=True, session_store=store, secret_key=SECRET
    )
    server = serve(app)
    with server.client() as client:
        assert client.get("/ready").json()["status"] == "ready"
        own_redis.stop()
        down = client.get("/ready")
        assert down.status_code == 503 and down.json()["status"] == "session_store_unavailable"
        assert client.get("/health").status_code == 200  # the process itself is fine: no restart
        own_redis.start()
        assert wait_until(lambda: client.get("/ready").status_code == 200)


def test_a_chat_endpoint_of_the_apps_own_keeps_its_turn_locked_past_the_lock_ttl(
    make_chat_stream: Any, serve: Any, hooks: ModelHooks, redis_url: str, redis_prefix: str
) -> None:
    """Without the middleware watching (the app's own path), the response keeps the lock alive."""
    chat_stream = make_chat_stream(max_new_tokens=60)

    async def my_chat(request: StarletteRequest) -> Any:
        return await chat_stream.handle_chat_stream_request(request)

    store = RedisStore(redis_url, prefix=redis_prefix, lock_ttl=0.3, timeout=0.5)
    app = Starlette(routes=[Route("/my_chat", my_chat, methods=["POST"])])
    server = serve(ChatStreamMiddleware(app, chat_stream=chat_stream, session_store=store, secret_key=SECRET))
    with server.client() as client:
        first = client.post("/my_chat", json={"user_input": "hello", "max_new_tokens": 2})
        cookie = f"chatstream_session={first.cookies['chatstream_session']}"
    hooks.step_delay = 0.05  # the turn lasts about 3 s: ten lock lifetimes
    running = _open_path(server.url, "/my_chat", "a long one", cookie)
    read_first_text(running)
    time.sleep(1.0)  # three lifetimes of a lock nobody refreshed
    with server.client(headers={"Cookie": cookie}) as client:
        busy = client.post("/my_chat", json={"user_input": "meanwhile"})
    running.close()
    assert busy.status_code == 409 and busy.json()["error"] == "session_busy"


def _open_path(url: str, path: str, user_input: str, cookie: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=HANG_GUARD)
    body = json.dumps({"user_input": user_input}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock
