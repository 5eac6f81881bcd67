"""The conversation cache: a chat's next turn prefills only what is new, and replies exactly as
it would without the cache (multi-turn, regenerate, history cut to fit the context)."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import pytest
import torch

from chatstream_asgi import ChatPrompt
from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.engine import BatchingEngine, GenerationStats
from chatstream_asgi.engine.conversation_cache import ConversationCache

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


def test_the_longest_common_prefix_wins_and_the_last_prompt_token_is_left_to_the_model() -> None:
    cache = ConversationCache(1 << 20)
    cache.put(torch.tensor([1, 2, 3]), _layers(3))
    cache.put(torch.tensor([1, 2, 3, 4, 5, 6]), _layers(6))
    cache.put(torch.tensor([1, 9, 9, 9, 9, 9, 9]), _layers(7))
    hit = cache.match(torch.tensor([1, 2, 3, 4, 5, 7]))
    assert hit is not None and hit.length == 5 and hit.layers[0][0].shape[2] == 5
    whole = cache.match(torch.tensor([1, 2, 3, 4, 5, 6]))
    assert whole is not None and whole.length == 5
    assert cache.match(torch.tensor([7, 1, 2])) is None


def test_an_entry_covered_by_the_one_built_from_it_is_dropped() -> None:
    cache = ConversationCache(1 << 20)
    cache.put(torch.tensor([1, 2, 3]), _layers(3))
    hit = cache.match(torch.tensor([1, 2, 3, 4]))
    cache.put(torch.tensor([1, 2, 3, 4, 5]), _layers(5), extends=hit)
    assert len(cache) == 1


def test_the_least_recently_used_entries_go_first_when_bytes_run_out() -> None:
    entry_bytes = sum(k.nbytes + v.nbytes for k, v in _layers(4))
    cache = ConversationCache(3 * entry_bytes)
    for first in (1, 2, 3):
        cache.put(torch.tensor([first, 0, 0, 0]), _layers(4))
    assert cache.match(torch.tensor([1, 0, 0, 0, 0])) is not None  # 1 is now the most recent
    cache.put(torch.tensor([4, 0, 0, 0]), _layers(4))
    assert cache.nbytes <= cache.capacity_bytes and len(cache) == 3
    assert cache.match(torch.tensor([2, 0, 0, 0, 0])) is None
    assert cache.match(torch.tensor([1, 0, 0, 0, 0])) is not None


def test_chatstream_sizes_the_cache_from_free_memory_unless_told(make_chat_stream: Any) -> None:
    assert make_chat_stream().engine.conversations.capacity_bytes > 0
    assert make_chat_stream(conversation_cache_bytes=0).engine.conversations.capacity_bytes == 0
    with pytest.raises(ValueError, match="conversation_cache_bytes"):
        make_chat_stream(conversation_cache_bytes=-1)
