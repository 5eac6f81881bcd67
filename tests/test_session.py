"""Sessions: signed ids, a bounded expiring memory store, JSON-only data."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatstream_asgi import ChatPrompt, MemoryStore, Session
from chatstream_asgi.sessions.signing import CookieSigner

pytestmark = pytest.mark.anyio


def test_signed_id_round_trips_and_a_forged_one_is_refused() -> None:
    signer = CookieSigner("secret")
    session_id = signer.new_session_id()
    assert signer.unsign(signer.sign(session_id)) == session_id
    assert signer.unsign(session_id + ".forged") is None
    assert signer.unsign("no-signature") is None
    assert CookieSigner("other").unsign(signer.sign(session_id)) is None


def test_session_ids_are_unguessable_and_distinct() -> None:
    ids = {CookieSigner.new_session_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) >= 32 for i in ids)


def test_secret_key_comes_from_the_environment_when_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSTREAM_SECRET_KEY", "shared")
    assert CookieSigner(None).sign("abc") == CookieSigner("shared").sign("abc")


async def test_memory_store_forgets_the_least_recently_used_past_its_bound() -> None:
    store = MemoryStore(max_sessions=2)
    await store.save("a", {"n": 1})
    await store.save("b", {"n": 2})
    await store.load("a")
    await store.save("c", {"n": 3})
    assert await store.load("b") is None
    assert await store.load("a") == {"n": 1}
    assert len(store) == 2


async def test_memory_store_expires_sessions_after_their_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    import chatstream_asgi.sessions.memory as session_module

    now = [1000.0]
    monkeypatch.setattr(session_module.time, "monotonic", lambda: now[0])
    store = MemoryStore(ttl=60)
    await store.save("a", {"n": 1})
    now[0] += 59
    assert await store.load("a") == {"n": 1}  # use refreshes the TTL
    now[0] += 59
    assert await store.load("a") == {"n": 1}
    now[0] += 61
    assert await store.load("a") is None


async def test_loaded_data_is_a_copy_until_saved() -> None:
    store = MemoryStore()
    await store.save("a", {"items": [1]})
    loaded = await store.load("a")
    assert loaded is not None
    loaded["items"].append(2)
    assert await store.load("a") == {"items": [1]}


async def test_chat_prompt_is_stored_as_json_and_comes_back_as_a_prompt(tokenizer: Any) -> None:
    store = MemoryStore()

    def restore(data: dict[str, Any]) -> ChatPrompt:
        prompt = ChatPrompt.from_dict(data)
        prompt.set_tokenizer(tokenizer)
        return prompt

    session = await Session.open(None, store, restore)
    prompt = ChatPrompt()
    prompt.add_requester_msg("Hi")
    session.get_session()["chat_prompt"] = prompt
    session.save_session()
    await session.persist()
    raw = store._entries[session.session_id][1]
    assert json.loads(raw)["chat_prompt"]["chat_contents"][0]["message"] == "Hi"
    again = await Session.open(session.session_id, store, restore)
    assert not again.is_new
    assert again.get_session()["chat_prompt"].get_requester_last_msg() == "Hi"


async def test_no_session_id_starts_a_new_session() -> None:
    session = await Session.open(None, MemoryStore(), ChatPrompt.from_dict)
    assert session.is_new and session.get_session() == {}


async def test_signed_id_unknown_to_the_store_keeps_its_id_with_empty_data() -> None:
    session = await Session.open("expired-id", MemoryStore(), ChatPrompt.from_dict)
    assert not session.is_new and session.session_id == "expired-id" and session.get_session() == {}


async def test_unsaved_session_is_not_written() -> None:
    store = MemoryStore()
    session = await Session.open(None, store, ChatPrompt.from_dict)
    await session.persist()
    assert len(store) == 0
