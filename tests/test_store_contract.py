"""One contract, two stores: the embedded MemoryStore and RedisStore against a real redis-server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from chatstream_asgi import MemoryStore, RedisStore

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, anyio_backend: str, redis_prefix: str) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield MemoryStore(max_turns=3)
        return
    if anyio_backend != "asyncio":
        pytest.skip("redis-py's asyncio client runs on asyncio only")
    redis_store = RedisStore(request.getfixturevalue("redis_url"), prefix=redis_prefix, max_turns=3, lock_ttl=5.0)
    yield redis_store
    await redis_store.close()


def _conversation(turns: int) -> dict[str, Any]:
    contents = []
    for turn in range(turns):
        contents.append({"role": "user", "role_type": "REQUESTER", "message": f"q{turn}", "message_id": None})
        contents.append(
            {"role": "assistant", "role_type": "RESPONDER", "message": f"a{turn}", "message_id": f"m{turn}"}
        )
    return {"chat_prompt": {"system": "", "chat_contents": contents, "requester": "user", "responder": "assistant"}}


async def test_unknown_session_loads_as_none(store: Any) -> None:
    assert await store.load("nobody") is None


async def test_saved_data_loads_back_equal(store: Any) -> None:
    data = {"generation_params": {"temperature": 0.2}, "note": "日本語 😀"}
    await store.save("s1", data)
    assert await store.load("s1") == data


async def test_save_replaces_and_delete_forgets(store: Any) -> None:
    await store.save("s1", {"n": 1})
    await store.save("s1", {"n": 2})
    assert await store.load("s1") == {"n": 2}
    await store.delete("s1")
    assert await store.load("s1") is None


async def test_conversation_past_max_turns_keeps_the_newest_turns(store: Any) -> None:
    await store.save("s1", _conversation(5))
    loaded = await store.load("s1")
    messages = [c["message"] for c in loaded["chat_prompt"]["chat_contents"]]
    assert messages == ["q2", "a2", "q3", "a3", "q4", "a4"]
    assert [c["message"] for c in loaded["chat_prompt"]["requester_messages"]] == ["q2", "q3", "q4"]


async def test_turn_lock_is_exclusive_until_released(store: Any) -> None:
    token = await store.lock_turn("s1")
    assert token is not None
    assert await store.lock_turn("s1") is None
    assert await store.lock_turn("s2") is not None  # other sessions are not affected
    await store.unlock_turn("s1", token)
    assert await store.lock_turn("s1") is not None


async def test_a_stale_token_does_not_release_someone_elses_lock(store: Any) -> None:
    token = await store.lock_turn("s1")
    assert token is not None
    await store.unlock_turn("s1", "not-the-token")
    assert await store.lock_turn("s1") is None
    await store.refresh_turn("s1", token)
    assert await store.lock_turn("s1") is None


async def test_every_redis_key_starts_with_the_prefix_and_data_is_json(
    redis_url: str, redis_prefix: str, anyio_backend: str
) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("redis-py's asyncio client runs on asyncio only")
    import redis.asyncio

    store = RedisStore(redis_url, prefix=redis_prefix, ttl=600, lock_ttl=7.0)
    await store.save("s1", {"n": 1})
    await store.lock_turn("s1")
    raw = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    keys = sorted(await raw.keys(f"{redis_prefix}*"))
    assert keys == [f"{redis_prefix}lock:s1", f"{redis_prefix}session:s1"]
    assert json.loads(await raw.get(f"{redis_prefix}session:s1")) == {"n": 1}
    assert 0 < await raw.pttl(f"{redis_prefix}lock:s1") <= 7000  # a dead replica's lock expires
    await raw.expire(f"{redis_prefix}session:s1", 5)
    await store.load("s1")
    assert await raw.ttl(f"{redis_prefix}session:s1") > 500  # reading refreshed the TTL
    await raw.aclose()
    await store.close()


async def test_redis_that_does_not_answer_is_reported_as_unavailable(anyio_backend: str) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("redis-py's asyncio client runs on asyncio only")
    import socket

    from chatstream_asgi.errors import SessionStoreUnavailable

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = RedisStore(f"redis://:hunter2@127.0.0.1:{port}/0", timeout=0.5)
    with pytest.raises(SessionStoreUnavailable) as caught:
        await store.load("s1")
    assert caught.value.status_code == 503 and caught.value.code == "session_store_unavailable"
    assert "hunter2" not in caught.value.detail
    await store.close()


async def test_a_store_answers_ping_while_it_is_up(store: Any) -> None:
    await store.ping()  # no exception: /ready would say "ready"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py's asyncio client
async def test_a_turn_lock_nobody_refreshes_expires_after_lock_ttl(anyio_backend: str, redis_url: str) -> None:
    """What frees the conversations of a replica that died mid-turn: its locks' TTL."""
    store = RedisStore(redis_url, prefix="expiry:", lock_ttl=0.3)
    try:
        held = await store.lock_turn("dead-replicas-conversation")
        assert held is not None and await store.lock_turn("dead-replicas-conversation") is None
        await anyio.sleep(0.5)
        assert await store.lock_turn("dead-replicas-conversation") is not None
    finally:
        await store.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py's asyncio client
async def test_a_refreshed_turn_lock_outlives_its_ttl(anyio_backend: str, redis_url: str) -> None:
    import redis.asyncio

    store = RedisStore(redis_url, prefix="refresh:", lock_ttl=10.0)
    direct = redis.asyncio.Redis.from_url(redis_url)
    try:
        token = await store.lock_turn("running")
        assert token is not None
        await direct.pexpire("refresh:lock:running", 1000)  # as if most of its life had gone by
        await store.refresh_turn("running", token)
        assert await direct.pttl("refresh:lock:running") > 5000  # a whole lock_ttl again
        assert await store.lock_turn("running") is None
    finally:
        await store.close()
        await direct.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py's asyncio client
async def test_redis_store_takes_a_client_of_your_own(anyio_backend: str, redis_url: str) -> None:
    """Sentinel's `master_for(...)` gives such a client; so does any redis.asyncio.Redis."""
    import redis.asyncio

    store = RedisStore(prefix="own-client:", client=redis.asyncio.Redis.from_url(redis_url, decode_responses=True))
    try:
        await store.save("s", {"note": "kept"})
        assert await store.load("s") == {"note": "kept"}
    finally:
        await store.close()
    with pytest.raises(ValueError, match="decode_responses=True"):
        RedisStore(client=redis.asyncio.Redis.from_url(redis_url))
