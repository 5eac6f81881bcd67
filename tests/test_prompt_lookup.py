"""Prompt-lookup decoding inside the running batch (issue 21, item 2).

Each row drafts the tokens that followed its last few tokens where they occurred before in its
prompt or reply; one forward pass runs every row's step and draft; each row keeps the drafted
tokens the model agrees with, then the model's own. Greedy rows write exactly what plain decoding
writes (`model.generate`), with rows joining, leaving and being cancelled mid-draft; sampled
rows keep plain sampling's distribution; seeded rows stay reproducible; stop strings, limits and
outcomes are exact. The tiny random model loops on its own output, which its drafts then quote.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import torch

from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.core.prompt import ChatPrompt
from chatstream_asgi.engine import BatchingEngine, GenerationStats
from chatstream_asgi.engine.lookup import Drafter, DraftLength
from chatstream_asgi.engine.sampling import BatchSampling

from .conftest import ModelHooks, greedy_reply, wait_until

pytestmark = pytest.mark.anyio

#: Prompts whose greedy replies on the tiny model repeat themselves, so drafts are taken.
TEXTS = [f"question {i} " * (i + 1) for i in range(6)] + ["hello hello hello", "a b c a b c a b"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the engine's thread side is backend-neutral; one backend is enough here


@pytest.fixture
def engine(model: Any, tokenizer: Any) -> Any:
    engine = BatchingEngine(model, tokenizer, device="cpu", max_batch_size=8, conversation_cache_bytes=0)
    assert wait_until(lambda: engine.ready)
    yield engine
    engine.close()


async def _reply(engine: Any, text: str, **params: Any) -> tuple[str, GenerationStats]:
    prompt = ChatPrompt.from_messages([{"role": "user", "content": text}])
    reply = ""
    async with engine.generate(prompt, GenerationParams(**{"temperature": 0, **params}), context_len=2048) as gen:
        while (piece := await gen.next_text(10.0)) is not None:
            reply += piece
    return reply, gen.stats


def test_a_draft_is_what_followed_the_latest_earlier_occurrence_of_the_last_tokens() -> None:
    ids = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6]
    drafter = Drafter(ids)
    assert drafter.draft(3) == [7, 1, 2]  # "5 6" last occurred before the end at 5..6, then 7 1 2
    ids.append(7)  # the row writes on: the index catches up
    assert drafter.draft(10) == [1, 2, 5, 6, 7]  # "5 6 7" latest at 5..7 (the longest n-gram wins)
    assert Drafter([1, 2, 3, 4]).draft(5) == []  # its tail never occurred before
    assert drafter.draft(0) == []


def test_a_rows_draft_length_follows_how_its_drafts_fared() -> None:
    length = DraftLength(10)
    assert length.next() == 10  # from the limit
    length.took(10, 3)
    assert length.next() == 3  # what was taken
    length.took(3, 3)
    assert length.next() == 10  # taken whole: back to the limit
    length.took(10, 3)
    length.took(3, 0)
    pauses = []
    for _ in range(4):  # refused outright, again and again: it waits longer each time, then probes with 1
        waited = 0
        while (offered := length.next()) == 0:
            waited += 1
        assert offered == 1
        pauses.append(waited)
        length.took(1, 0)
    assert pauses == [1, 2, 4, 8]
    one_kept = DraftLength(10)
    one_kept.took(10, 1)  # one token for ten columns: a loss where compute is the limit
    assert one_kept.next() == 0
    assert DraftLength(0).next() == 0


async def test_greedy_replies_with_drafts_are_generates_for_rows_joining_and_leaving(
    engine: Any, model: Any, tokenizer: Any
) -> None:
    replies: dict[str, tuple[str, GenerationStats]] = {}

    async def ask(index: int, text: str) -> None:
        await anyio.sleep(0.05 * (index % 3))  # some join a batch already running
        replies[text] = await _reply(engine, text, max_new_tokens=20 + 7 * index)  # and leave at different steps

    async with anyio.create_task_group() as group:
        for index, text in enumerate(TEXTS):
            group.start_soon(ask, index, text)
    for index, text in enumerate(TEXTS):
        assert replies[text][0] == greedy_reply(model, tokenizer, text, 20 + 7 * index), text
    assert sum(stats.drafted_tokens for _, stats in replies.values()) > 20  # the drafts were used


async def test_a_reply_alone_takes_fewer_forward_passes_than_tokens(engine: Any, model: Any, tokenizer: Any) -> None:
    hooks = ModelHooks(model)
    reply, stats = await _reply(engine, "hello hello hello", max_new_tokens=60)
    passes = hooks.forward_calls
    assert reply == greedy_reply(model, tokenizer, "hello hello hello", 60)
    assert stats.completion_tokens == 60 and stats.drafted_tokens > 10
    assert passes == 60 - stats.drafted_tokens  # the prefill wrote one token; each step one, plus drafts kept


async def test_prompt_lookup_off_drafts_nothing(model: Any, tokenizer: Any) -> None:
    engine = BatchingEngine(model, tokenizer, device="cpu", prompt_lookup_num_tokens=0)
    assert wait_until(lambda: engine.ready)
    try:
        reply, stats = await _reply(engine, "hello hello hello", max_new_tokens=40)
    finally:
        engine.close()
    assert reply == greedy_reply(model, tokenizer, "hello hello hello", 40) and stats.drafted_tokens == 0
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        BatchingEngine(model, tokenizer, device="cpu", prompt_lookup_num_tokens=-1)


async def test_a_draft_never_writes_past_the_limit_or_a_stop_string(engine: Any, model: Any, tokenizer: Any) -> None:
    text = "a b c a b c a b"
    full = greedy_reply(model, tokenizer, text, 60)
    for limit in (1, 2, 7, 33):
        reply, stats = await _reply(engine, text, max_new_tokens=limit)
        assert reply == greedy_reply(model, tokenizer, text, limit)
        assert stats.completion_tokens == limit and stats.finish_reason == "length"
    stop = full[30:34]
    reply, stats = await _reply(engine, text, max_new_tokens=60, stop=(stop,))
    assert reply == full[: full.index(stop)] and stats.finish_reason == "stop"


async def test_a_row_cancelled_mid_draft_stops_within_a_step_and_spares_the_others(
    engine: Any, model: Any, tokenizer: Any
) -> None:
    hooks = ModelHooks(model)
    hooks.step_delay = 0.01
    others: dict[str, str] = {}

    async def bystander(text: str) -> None:
        others[text] = (await _reply(engine, text, max_new_tokens=50))[0]

    prompt = ChatPrompt.from_messages([{"role": "user", "content": "hello hello hello"}])
    params = GenerationParams(max_new_tokens=200, temperature=0)
    async with anyio.create_task_group() as group:
        for text in TEXTS[:3]:
            group.start_soon(bystander, text)
        async with engine.generate(prompt, params, context_len=2048) as generation:
            while generation.stats.drafted_tokens == 0 and generation.stats.completion_tokens < 150:
                await generation.next_text(10.0)
            generation.cancel()
            while await generation.next_text(10.0) is not None:
                pass
    assert generation.stats.finish_reason == "cancelled" and generation.stats.steps_after_cancel <= 1
    for text in TEXTS[:3]:
        assert others[text] == greedy_reply(model, tokenizer, text, 50)


async def test_a_seeded_sampled_reply_with_drafts_is_the_same_alone_and_in_company(engine: Any) -> None:
    params = {"max_new_tokens": 40, "temperature": 0.7, "top_k": 5, "seed": 99}
    alone = (await _reply(engine, "hello hello hello", **params))[0]
    again = (await _reply(engine, "hello hello hello", **params))[0]
    together: dict[str, str] = {}

    async def ask(name: str, text: str, extra: dict[str, Any]) -> None:
        together[name] = (await _reply(engine, text, **extra))[0]

    async with anyio.create_task_group() as group:
        group.start_soon(ask, "noise", "a b c a b c a b", {"max_new_tokens": 40})
        group.start_soon(ask, "seeded", "hello hello hello", params)
    assert alone == again == together["seeded"]


def test_verifying_a_draft_keeps_plain_samplings_distribution() -> None:
    """Speculative sampling's rule with a one-token draft: keep it with its probability, else
    draw from the rest. Over 20,000 rows, each drafting the same token, the first token written
    is distributed as the model's own (seeded: the same counts every run)."""
    torch.manual_seed(0)
    vocabulary, rows = 6, 20_000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, 0.5])
    expected = logits.softmax(-1)
    params = GenerationParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=4)
    sampling = BatchSampling.concat([BatchSampling.for_row(params, torch.tensor([0]), vocabulary) for _ in range(rows)])
    sampling.seen.zero_()
    for draft in (1, 4):  # a likely token, and an unlikely one
        drafts = torch.full((rows, 1), draft)
        taken, tokens = sampling.verify(logits.expand(rows, 2, vocabulary), drafts, torch.ones(rows, dtype=torch.long))
        first = tokens[:, 0]
        observed = torch.bincount(first, minlength=vocabulary).double() / rows
        assert torch.allclose(observed, expected.double(), atol=0.015), (draft, observed, expected)
        assert int(taken.sum()) == int((first == draft).sum())  # a kept draft is the token written
        # A row that kept its draft then writes the model's own next token: a draw of the same law
        # (over the ~5,000 rows that kept the likely token: 4 standard deviations, at most, off).
        following = tokens[taken == 1, 1]
        if draft == 1:
            observed_next = torch.bincount(following, minlength=vocabulary).double() / len(following)
            assert torch.allclose(observed_next, expected.double(), atol=0.025), observed_next


def test_a_greedy_row_keeps_exactly_the_draft_tokens_that_are_the_argmax() -> None:
    params = GenerationParams(temperature=0, max_new_tokens=8)
    sampling = BatchSampling.concat([BatchSampling.for_row(params, torch.tensor([0]), 5) for _ in range(3)])
    logits = torch.full((3, 4, 5), -1.0)
    best = torch.tensor([[1, 2, 3, 4], [1, 0, 3, 4], [2, 2, 2, 2]])
    logits.scatter_(2, best[:, :, None], 5.0)
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    taken, tokens = sampling.verify(logits, drafts, torch.tensor([3, 3, 0]))
    assert taken.tolist() == [3, 1, 0]
    assert tokens[0].tolist() == [1, 2, 3, 4]  # every draft token kept, then the model's own
    assert tokens[1, :2].tolist() == [1, 0]  # kept the first, then the model's choice instead of 2
    assert tokens[2, 0].item() == 2  # no draft: the model's own token
