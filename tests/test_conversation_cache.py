"""The conversation cache: a chat's next turn prefills only what is new, and replies exactly as
it would without the cache (multi-turn, regenerate, history cut to fit the context)."""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Any

import anyio
import httpx
import pytest
import torch
from starlette.applications import Starlette

from chatstream_asgi import ChatPrompt, ChatStreamMiddleware
from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.engine import BatchingEngine, GenerationStats, conversation_cache
from chatstream_asgi.engine.conversation_cache import (
    BLOCK_TOKENS,
    DEFAULT_CACHE_BYTES,
    DEFAULT_MAX_ENTRIES,
    CacheScope,
    ConversationCache,
)

from .conftest import wait_until

GREEDY = GenerationParams(max_new_tokens=12, temperature=0)
QUESTIONS = ["tell me about the sea", "and the mountains?", "which one is older", "say it again shorter"]


@pytest.fixture
def engines(model: Any, tokenizer: Any) -> Any:
    cached = BatchingEngine(model, tokenizer, device="cpu", max_batch_size=4)
    plain = BatchingEngine(model, tokenizer, device="cpu", max_batch_size=4, conversation_cache_bytes=0)
    assert wait_until(lambda: cached.ready and plain.ready)
    yield cached, plain
    cached.close()
    plain.close()


def _ask(engine: Any, prompt: ChatPrompt, context_len: int = 2048) -> tuple[str, GenerationStats]:
    async def run() -> tuple[str, GenerationStats]:
        reply = ""
        async with engine.generate(prompt.clone(), GREEDY, context_len=context_len) as gen:
            while (piece := await gen.next_text(5.0)) is not None:
                reply += piece
        return reply, gen.stats

    return anyio.run(run)


def _converse(engine: Any, questions: list[str], context_len: int = 2048) -> list[tuple[str, GenerationStats]]:
    prompt = ChatPrompt()
    turns = []
    for question in questions:
        prompt.add_requester_msg(question)
        prompt.add_responder_msg(None)
        reply, stats = _ask(engine, prompt, context_len)
        prompt.set_responder_last_msg(reply)
        turns.append((reply, stats))
    return turns


def test_each_turn_of_a_conversation_replies_as_without_the_cache(engines: Any) -> None:
    cached, plain = engines
    with_cache = _converse(cached, QUESTIONS)
    without = _converse(plain, QUESTIONS)
    assert [reply for reply, _ in with_cache] == [reply for reply, _ in without]
    assert without[-1][1].cached_prompt_tokens == 0


def test_the_next_turn_prefills_only_what_is_new(engines: Any) -> None:
    cached, _ = engines
    turns = _converse(cached, QUESTIONS)
    assert turns[0][1].cached_prompt_tokens == 0
    for (_, before), (_, stats) in itertools.pairwise(turns):
        # The whole previous prompt (and the reply, as far as it re-tokenizes the same) came from the cache.
        assert stats.cached_prompt_tokens >= before.prompt_tokens


def test_a_regenerated_reply_is_the_same_with_and_without_the_cache(engines: Any) -> None:
    cached, plain = engines
    replies = []
    for engine in (cached, plain):
        prompt = ChatPrompt()
        for question in QUESTIONS[:2]:
            prompt.add_requester_msg(question)
            prompt.add_responder_msg(None)
            reply, _ = _ask(engine, prompt)
            prompt.set_responder_last_msg(reply)
        prompt.clear_last_responder_message()  # what regenerate does
        again, stats = _ask(engine, prompt)
        replies.append((reply, again, stats))
    assert replies[0][:2] == replies[1][:2]
    assert replies[0][1] == replies[0][0]  # greedy: the same reply again
    assert replies[0][2].cached_prompt_tokens == replies[0][2].prompt_tokens - 1  # all but the last token


def test_a_conversation_cut_to_fit_the_context_replies_as_without_the_cache(engines: Any) -> None:
    cached, plain = engines
    questions = [f"question number {i} about something long and winding" for i in range(6)]
    context_len = 130  # the oldest turns are dropped as the conversation grows
    with_cache = _converse(cached, questions, context_len)
    without = _converse(plain, questions, context_len)
    assert [reply for reply, _ in with_cache] == [reply for reply, _ in without]
    assert with_cache[-1][1].prompt_tokens <= context_len - GREEDY.max_new_tokens


def test_concurrent_conversations_each_reply_as_without_the_cache(engines: Any) -> None:
    cached, plain = engines
    results: dict[str, list[str]] = {}

    async def converse(engine: Any, name: str, questions: list[str]) -> None:
        results[name] = [reply for reply, _ in await anyio.to_thread.run_sync(_converse, engine, questions)]

    async def all_at_once() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(converse, cached, "a", QUESTIONS)
            tg.start_soon(converse, cached, "b", QUESTIONS[::-1])

    anyio.run(all_at_once)
    assert results["a"] == [reply for reply, _ in _converse(plain, QUESTIONS)]
    assert results["b"] == [reply for reply, _ in _converse(plain, QUESTIONS[::-1])]


def test_a_zero_byte_cache_keeps_nothing(engines: Any) -> None:
    _, plain = engines
    turns = _converse(plain, QUESTIONS[:2])
    assert len(plain.conversations) == 0 and turns[1][1].cached_prompt_tokens == 0


def _layers(tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(1, 2, tokens, 4), torch.zeros(1, 2, tokens, 4))]


def _ids(*parts: list[int]) -> torch.Tensor:
    return torch.tensor([token for part in parts for token in part])


TEXT = list(range(100, 160))  # 60 tokens: three whole blocks and a part of a fourth


def test_the_longest_common_prefix_wins_and_the_last_prompt_token_is_left_to_the_model() -> None:
    cache = ConversationCache(1 << 20)
    cache.put(_ids(TEXT[:20]), _layers(20))
    cache.put(_ids(TEXT[:40]), _layers(40))
    cache.put(_ids(TEXT[:1], [9] * 39), _layers(40))
    hit = cache.match(_ids(TEXT[:37], [7, 7]))
    assert hit is not None and hit.length == 37 and hit.layers[0][0].shape[2] == 37  # into the partial block
    whole = cache.match(_ids(TEXT[:40]))
    assert whole is not None and whole.length == 39
    assert cache.match(_ids([7], TEXT[:30])) is None


def test_a_prompt_sharing_less_than_one_block_borrows_nothing() -> None:
    cache = ConversationCache(1 << 20)
    cache.put(_ids(TEXT[:40]), _layers(40))
    assert cache.match(_ids(TEXT[: BLOCK_TOKENS - 1], [7] * 30)) is None
    hit = cache.match(_ids(TEXT[:BLOCK_TOKENS], [7] * 30))
    assert hit is not None and hit.length == BLOCK_TOKENS


def test_an_entry_covered_by_the_one_built_from_it_is_dropped() -> None:
    cache = ConversationCache(1 << 20)
    cache.put(_ids(TEXT[:20]), _layers(20))
    hit = cache.match(_ids(TEXT[:21]))
    cache.put(_ids(TEXT[:30]), _layers(30), extends=hit)
    assert len(cache) == 1


def test_a_prompt_borrows_only_its_own_tenants_entries_and_anyones_public_beginning() -> None:
    cache = ConversationCache(1 << 20)
    cache.put(_ids(TEXT[:40]), _layers(40), scope=CacheScope("a", public=20))
    prompt = _ids(TEXT[:40], [1])
    assert cache.match(prompt, CacheScope("b")) is None
    public = cache.match(prompt, CacheScope("b", public=20))
    assert public is not None and public.length == 20  # the public beginning, and not a token more
    own = cache.match(prompt, CacheScope("a", public=20))
    assert own is not None and own.length == 40

    cache.put(_ids(TEXT[:24]), _layers(24), scope=CacheScope("a", public=24))
    public = cache.match(_ids(TEXT[:24], [1]), CacheScope("b", public=24))
    assert public is not None and public.length == 24  # all of a's public entry
    cache.put(_ids(TEXT[:24], [3] * 30), _layers(54), scope=CacheScope("b", public=24), extends=public)
    assert len(cache) == 3  # b's entry covers a's, but a's is not b's to drop


def test_another_tenants_entry_is_not_lent_even_where_their_hashes_meet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: were two tenants' index seeds ever the same (a bug), a match still lends
    only the prompt's own tenant's entries, and anyone's public beginning."""
    monkeypatch.setattr(conversation_cache, "_seed", lambda tenant: b"one seed for all")
    cache = ConversationCache(1 << 20)
    cache.put(_ids(TEXT[:40]), _layers(40), scope=CacheScope("a", public=16))
    prompt = _ids(TEXT[:40], [1])
    public = cache.match(prompt, CacheScope("b", public=16))
    assert public is not None and public.length == 16
    own = cache.match(prompt, CacheScope("a"))
    assert own is not None and own.length == 40


def _distinct(first: int, tokens: int = 20) -> torch.Tensor:
    return _ids([first], [0] * (tokens - 1))


def test_the_least_recently_used_entries_go_first_when_bytes_run_out() -> None:
    entry_bytes = sum(k.nbytes + v.nbytes for k, v in _layers(20))
    cache = ConversationCache(3 * entry_bytes)
    for first in (1, 2, 3):
        cache.put(_distinct(first), _layers(20))
    assert cache.match(_distinct(1, 21)) is not None  # 1 is now the most recent
    cache.put(_distinct(4), _layers(20))
    assert cache.nbytes <= cache.capacity_bytes and len(cache) == 3
    assert cache.match(_distinct(2, 21)) is None
    assert cache.match(_distinct(1, 21)) is not None


def test_the_least_recently_used_entries_go_first_past_the_entry_count() -> None:
    cache = ConversationCache(1 << 20, max_entries=3)
    for first in (1, 2, 3):
        cache.put(_distinct(first), _layers(20))
    assert cache.match(_distinct(1, 21)) is not None
    cache.put(_distinct(4), _layers(20))
    assert len(cache) == 3
    assert cache.match(_distinct(2, 21)) is None
    assert all(cache.match(_distinct(first, 21)) is not None for first in (1, 3, 4))


def test_an_entry_unused_for_its_ttl_is_dropped_and_a_used_one_stays() -> None:
    now = [0.0]
    cache = ConversationCache(1 << 20, ttl=60.0, clock=lambda: now[0])
    cache.put(_distinct(1), _layers(20))
    cache.put(_distinct(2), _layers(20))
    now[0] = 50.0
    assert cache.match(_distinct(1, 21)) is not None  # used: its 60 s start again
    now[0] = 100.0
    assert cache.match(_distinct(2, 21)) is None and len(cache) == 1
    assert cache.match(_distinct(1, 21)) is not None
    now[0] = 200.0
    cache.put(_distinct(3), _layers(20))
    assert len(cache) == 1 and cache.nbytes == sum(k.nbytes + v.nbytes for k, v in _layers(20))


def test_a_match_among_50000_entries_takes_well_under_a_millisecond() -> None:
    """Entries share a 32-token system prompt, as a server's do; each then has its own text. A
    match hashes the prompt's blocks and compares a few entries, whatever their number (the old
    linear scan: ~9 ms per 1,000 entries here, ~450 ms at 50,000)."""
    count = 50_000
    generator = torch.Generator().manual_seed(0)
    system = list(range(1, 33))
    cache = ConversationCache(1 << 30, max_entries=count)
    prompts = []
    for _ in range(count):
        own = torch.randint(1000, 30000, (40,), generator=generator).tolist()
        cache.put(_ids(system, own), [(torch.zeros(1, 1, 72, 1), torch.zeros(1, 1, 72, 1))])  # tiny, but real
        prompts.append(_ids(system, own, [5, 6, 7]))
    assert len(cache) == count
    timings = []
    for prompt in prompts[:: count // 25]:
        started = time.perf_counter()
        hit = cache.match(prompt)
        timings.append(time.perf_counter() - started)
        assert hit is not None and hit.length == 72  # its own entry, whole
    for _ in range(5):  # a new chat: it shares only the system prompt, with all 50,000 entries
        started = time.perf_counter()
        hit = cache.match(_ids(system, [7] * 40))
        timings.append(time.perf_counter() - started)
        assert hit is not None and hit.length >= len(system)
    assert statistics.median(timings) < 1e-3, timings


def test_chatstream_sizes_the_cache_to_at_most_a_gibibyte_unless_told(make_chat_stream: Any) -> None:
    assert 0 < make_chat_stream().engine.conversations.capacity_bytes <= DEFAULT_CACHE_BYTES
    assert make_chat_stream(conversation_cache_bytes=0).engine.conversations.capacity_bytes == 0
    with pytest.raises(ValueError, match="conversation_cache_bytes"):
        make_chat_stream(conversation_cache_bytes=-1)


def _chat_seconds(client: httpx.Client, user_input: str) -> float:
    """Seconds one new chat (no cookie: a session of its own) takes over HTTP, reply included."""
    client.cookies.clear()
    started = time.perf_counter()
    response = client.post("/chat_stream", json={"user_input": user_input})
    assert response.status_code == 200 and response.text
    return time.perf_counter() - started


def test_a_new_chat_is_not_slowed_by_many_kept_conversations(make_chat_stream: Any, serve: Any, tokenizer: Any) -> None:
    """Two servers on one model: one with an empty cache, one holding far more conversations than
    it keeps (its own chats over HTTP, and 30,000 put straight into its cache before it serves,
    while its engine thread waits for work). A probe chat costs the same on both (the old linear
    scan added ~8 ms per 1,000 entries to every new chat: ~0.25 s here)."""
    plain = make_chat_stream(max_new_tokens=4)
    loaded = make_chat_stream(max_new_tokens=4)
    chat = [{"role": "user", "content": "x"}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    vocab = len(tokenizer)
    first = (tokenizer(rendered, add_special_tokens=False)["input_ids"][0] + 1) % vocab  # no chat starts so
    generator = torch.Generator().manual_seed(0)
    for _ in range(30_000):
        ids = torch.randint(0, vocab, (48,), generator=generator)
        ids[0] = first
        loaded.engine.conversations.put(ids, [(torch.zeros(1, 1, 48, 1), torch.zeros(1, 1, 48, 1))])
    servers = [serve(ChatStreamMiddleware(Starlette(), chat_stream=cs, serve=True)) for cs in (plain, loaded)]
    with servers[0].client() as plain_client, servers[1].client() as loaded_client:
        for number in range(20):
            _chat_seconds(loaded_client, f"a distinct chat, number {number}")
        probe = "how far is the moon?"
        seconds: dict[str, list[float]] = {"plain": [], "loaded": []}
        for _ in range(7):  # interleaved, so a busy moment of the machine hits both alike
            seconds["plain"].append(_chat_seconds(plain_client, probe))
            seconds["loaded"].append(_chat_seconds(loaded_client, probe))
    assert len(loaded.engine.conversations) <= DEFAULT_MAX_ENTRIES
    assert statistics.median(seconds["loaded"]) < 3 * statistics.median(seconds["plain"]), seconds
