"""The batching engine: concurrent generations share forward passes and still each get exactly
their own reply."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import httpx
import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from chatstream_asgi import ChatPrompt, ChatStream
from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.engine import BatchingEngine, GenerationStats, TransformersEngine, supports_batching
from chatstream_asgi.engine.prefill import PrefillChunks

from .conftest import ModelHooks, greedy_reply, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the engine's thread side is backend-neutral; one backend is enough here


@pytest.fixture
def engine(model: Any, tokenizer: Any) -> Any:
    engine = BatchingEngine(model, tokenizer, device="cpu", max_batch_size=8)
    assert wait_until(lambda: engine.ready)
    yield engine
    engine.close()


async def _reply(engine: Any, text: str, **params: Any) -> tuple[str, GenerationStats]:
    prompt = ChatPrompt()
    prompt.add_requester_msg(text)
    prompt.add_responder_msg(None)
    reply = ""
    async with engine.generate(prompt, GenerationParams(**{"temperature": 0, **params}), context_len=2048) as gen:
        while (piece := await gen.next_text(5.0)) is not None:
            reply += piece
    return reply, gen.stats


async def _replies_together(engine: Any, texts: list[str], **params: Any) -> dict[str, str]:
    """Each text's reply, all asked at the same moment."""
    replies: dict[str, str] = {}

    async def ask(text: str) -> None:
        replies[text] = (await _reply(engine, text, **params))[0]

    async with anyio.create_task_group() as tg:
        for text in texts:
            tg.start_soon(ask, text)
    return replies


async def test_concurrent_replies_each_equal_what_generate_says_alone(engine: Any, model: Any, tokenizer: Any) -> None:
    texts = [f"question {i} " * (i + 1) for i in range(6)]  # different lengths: padded rows
    replies = await _replies_together(engine, texts, max_new_tokens=30)
    for text in texts:
        assert replies[text] == greedy_reply(model, tokenizer, text, 30)


async def test_forward_passes_are_shared_by_concurrent_requests(engine: Any, model: Any) -> None:
    hooks = ModelHooks(model)

    async def ask(index: int) -> None:
        await _reply(engine, f"hello {index}", max_new_tokens=20)

    async with anyio.create_task_group() as tg:
        for index in range(4):
            tg.start_soon(ask, index)
    # Four replies of 20 tokens alone would take 4 prefills + 4 x 19 decode steps.
    assert hooks.prefills <= 4
    assert hooks.forward_calls - hooks.prefills < 4 * 19


async def test_a_short_request_leaves_while_a_long_one_goes_on(engine: Any, model: Any, tokenizer: Any) -> None:
    results: dict[str, tuple[str, GenerationStats]] = {}

    async def ask(name: str, tokens: int) -> None:
        results[name] = await _reply(engine, name, max_new_tokens=tokens)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "long one", 60)
        tg.start_soon(ask, "short", 3)
    assert results["short"][1].completion_tokens == 3 and results["short"][1].finish_reason == "length"
    assert results["long one"][1].completion_tokens == 60
    assert results["long one"][0] == greedy_reply(model, tokenizer, "long one", 60)


async def test_each_row_keeps_its_own_parameters(engine: Any, model: Any, tokenizer: Any) -> None:
    full = greedy_reply(model, tokenizer, "stop me", 40)
    stop = full[8:11]
    results: dict[str, str] = {}

    async def ask(name: str, params: dict[str, Any]) -> None:
        results[name] = (await _reply(engine, "stop me", **params))[0]

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "plain", {"max_new_tokens": 40})
        tg.start_soon(ask, "stopped", {"max_new_tokens": 40, "stop": (stop,)})
        tg.start_soon(ask, "sampled", {"max_new_tokens": 40, "temperature": 1.5, "top_k": 5, "top_p": 0.8, "seed": 3})
    assert results["plain"] == full
    assert results["stopped"] == full[: full.index(stop)]
    assert results["sampled"] != full  # hot sampling with a seed: a different, reproducible reply


async def test_a_seeded_sample_is_the_same_alone_or_in_company(engine: Any) -> None:
    params = {"max_new_tokens": 30, "temperature": 1.2, "top_k": 20, "seed": 1234}
    alone = (await _reply(engine, "roll the dice", **params))[0]
    together: dict[str, str] = {}

    async def ask(name: str, text: str, extra: dict[str, Any]) -> None:
        together[name] = (await _reply(engine, text, **extra))[0]

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "noise", "noise", {"max_new_tokens": 30, "temperature": 1.0})
        tg.start_soon(ask, "seeded", "roll the dice", params)
    assert together["seeded"] == alone


async def test_cancelling_one_row_stops_it_within_a_step_and_spares_the_others(
    engine: Any, model: Any, tokenizer: Any
) -> None:
    hooks = ModelHooks(model)
    hooks.step_delay = 0.01
    prompt = ChatPrompt()
    prompt.add_requester_msg("cancel me")
    prompt.add_responder_msg(None)
    other: dict[str, str] = {}

    async def bystander() -> None:
        other["reply"] = (await _reply(engine, "bystander", max_new_tokens=40))[0]

    async with anyio.create_task_group() as tg:
        tg.start_soon(bystander)
        async with engine.generate(
            prompt, GenerationParams(max_new_tokens=500, temperature=0), context_len=2048
        ) as gen:
            while not await gen.next_text(5.0):
                pass
            gen.cancel()
            while await gen.next_text(5.0) is not None:
                pass
    assert gen.stats.finish_reason == "cancelled" and gen.stats.steps_after_cancel <= 1
    assert gen.stats.completion_tokens < 500
    assert other["reply"] == greedy_reply(model, tokenizer, "bystander", 40)


def test_an_encoder_decoder_model_falls_back_to_one_generate_per_slot(tokenizer: Any) -> None:
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    t5 = T5ForConditionalGeneration(config)
    assert not supports_batching(t5)
    with pytest.raises(ValueError, match="batching=False"):
        ChatStream(model=t5, tokenizer=tokenizer, batching=True)


def test_chatstream_picks_the_batching_engine_when_it_can(model: Any, tokenizer: Any) -> None:
    batched = ChatStream(model=model, tokenizer=tokenizer)
    per_slot = ChatStream(model=model, tokenizer=tokenizer, batching=False)
    try:
        assert isinstance(batched.engine, BatchingEngine)
        assert isinstance(per_slot.engine, TransformersEngine)
    finally:
        batched.close()
        per_slot.close()


async def test_the_per_slot_engine_still_streams_what_generate_says(model: Any, tokenizer: Any) -> None:
    engine = TransformersEngine(model, tokenizer, device="cpu", workers=2)
    try:
        assert wait_until(lambda: engine.ready)
        reply, stats = await _reply(engine, "per slot", max_new_tokens=25)
        assert reply == greedy_reply(model, tokenizer, "per slot", 25) and stats.finish_reason == "length"
    finally:
        engine.close()


async def test_the_per_slot_engine_stops_within_a_step_when_cancelled(model: Any, tokenizer: Any) -> None:
    hooks = ModelHooks(model)
    hooks.step_delay = 0.01
    engine = TransformersEngine(model, tokenizer, device="cpu", workers=1)
    try:
        assert wait_until(lambda: engine.ready)
        prompt = ChatPrompt()
        prompt.add_requester_msg("go")
        prompt.add_responder_msg(None)
        async with engine.generate(
            prompt, GenerationParams(max_new_tokens=500, temperature=0), context_len=2048
        ) as gen:
            while not await gen.next_text(5.0):
                pass
        assert gen.stats.finish_reason == "cancelled" and gen.stats.steps_after_cancel <= 1
        assert gen.stats.completion_tokens < 500
        assert torch.is_inference_mode_enabled() is False  # the thread's mode never leaks to the caller
    finally:
        engine.close()


@pytest.mark.parametrize("failing_call", [1, 9], ids=["while joining", "while decoding"])
async def test_a_failure_outside_the_model_fails_its_requests_and_the_engine_goes_on(
    engine: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch, failing_call: int
) -> None:
    from chatstream_asgi.engine import GenerationFailed

    real_decode = tokenizer.decode
    calls = {"count": 0, "broken": True}

    def decode(*args: Any, **kwargs: Any) -> str:
        calls["count"] += 1
        if calls["broken"] and calls["count"] >= failing_call:
            raise RuntimeError("detokenizer bug")
        return str(real_decode(*args, **kwargs))

    monkeypatch.setattr(tokenizer, "decode", decode)
    with pytest.raises(GenerationFailed, match="detokenizer bug"):
        await _reply(engine, "first", max_new_tokens=10)
    calls["broken"] = False
    _, stats = await _reply(engine, "second", max_new_tokens=10)
    assert stats.finish_reason == "length" and stats.completion_tokens == 10


def test_a_decode_failure_of_one_row_fails_only_that_chat(
    make_chat_stream: Any, serve: Any, model: Any, tokenizer: Any, hooks: ModelHooks
) -> None:
    from starlette.applications import Starlette

    from chatstream_asgi import ChatStreamMiddleware

    from .conftest import Outcomes, open_chat, read_first_text, read_until

    # Lengths within 2x of each other, so the two rows share one group (one batched step).
    short, long = "tell me a story", "tell me a story about the sea"

    def prompt_length(text: str) -> int:
        messages = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    poison = prompt_length(short) + 1  # the short chat's second decode step; the long one never gets there
    assert poison < prompt_length(long) < 2 * prompt_length(short)
    failed_batch_rows: list[int] = []

    def fail_at_poison(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        positions = kwargs.get("position_ids")
        if positions is not None and kwargs["input_ids"].shape[1] == 1 and bool((positions == poison).any()):
            failed_batch_rows.append(int(kwargs["input_ids"].shape[0]))
            raise RuntimeError("simulated failure of one row")

    model.register_forward_pre_hook(fail_at_poison, with_kwargs=True)
    hooks.step_delay = 0.02
    chat_stream = make_chat_stream(num_of_concurrent_executions=2, max_new_tokens=30)
    outcomes = Outcomes()
    live = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, callback=outcomes))
    survivor = open_chat(live.url, long)
    read_first_text(survivor)  # streaming, so the short chat joins its batch
    with live.client() as client, pytest.raises(httpx.RemoteProtocolError):  # a cut reply, as cut
        client.post("/chat_stream", json={"user_input": short})
    read_until(survivor, b"0\r\n\r\n")
    survivor.close()
    outcomes.wait(2)
    history = {outcome: request.state.session.get_session()["chat_prompt"] for request, outcome in outcomes.calls}
    assert failed_batch_rows[0] == 2  # the failing step held both rows: the retry told them apart
    assert sorted(history) == ["success", "unknown_error_occurred"]
    assert history["success"].get_requester_last_msg() == long  # the failed one left no history
    assert history["success"].get_responder_last_msg() == greedy_reply(model, tokenizer, long, 30)


def _group_of(lengths: list[int], config: Any) -> Any:
    """A group whose rows hold `lengths` tokens, right-aligned (only its shape matters here)."""
    from chatstream_asgi.engine.batch import Batch as _Batch

    group = _Batch(config)
    width = max(lengths)
    group.rows = [object() for _ in lengths]  # type: ignore[misc]
    group.mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    group.positions = torch.tensor([[n] for n in lengths])
    return group


def test_a_row_of_a_similar_length_joins_the_running_group(model: Any) -> None:
    from chatstream_asgi.engine.grouping import group_for as _group_for

    groups = [_group_of([180, 150, 200], model.config)]
    assert _group_for(groups, 260, model.config) is groups[0] and len(groups) == 1


def test_a_row_many_times_longer_runs_in_a_group_of_its_own(model: Any) -> None:
    from chatstream_asgi.engine.grouping import group_for as _group_for

    groups = [_group_of([180, 150, 200], model.config)]
    joined = _group_for(groups, 1500, model.config)
    assert joined is not groups[0] and groups == [groups[0], joined] and not joined.rows


def test_past_the_most_groups_a_row_joins_the_one_it_pads_least(model: Any) -> None:
    from chatstream_asgi.engine.grouping import MAX_GROUPS as _MAX_GROUPS
    from chatstream_asgi.engine.grouping import group_for as _group_for

    groups = [_group_of([10 * 4**i], model.config) for i in range(_MAX_GROUPS)]
    assert _group_for(groups, 9000, model.config) is groups[-1] and len(groups) == _MAX_GROUPS


async def test_a_long_conversation_steps_apart_from_short_chats_and_all_reply_exactly(
    engine: Any, model: Any, tokenizer: Any
) -> None:
    passes: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: passes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    long_text = " ".join(f"word{i}" for i in range(80))
    results: dict[str, str] = {}

    async def short(name: str) -> None:
        results[name] = (await _reply(engine, name, max_new_tokens=60))[0]

    async def long() -> None:
        results["long"] = (await _reply(engine, long_text, max_new_tokens=20))[0]

    try:
        async with anyio.create_task_group() as tg:
            for name in ("one", "two", "three"):
                tg.start_soon(short, name)
            tg.start_soon(long)
    finally:
        handle.remove()
    assert (4, 1) not in passes  # never one step padding the short rows to the long one
    assert (1, 1) in passes and (3, 1) in passes  # the long row's own step beside the short rows'
    for name in ("one", "two", "three"):
        assert results[name] == greedy_reply(model, tokenizer, name, 60)
    assert results["long"] == greedy_reply(model, tokenizer, long_text, 20)


async def test_prompts_that_arrive_together_are_prefilled_in_one_pass_and_reply_exactly(
    engine: Any, model: Any, tokenizer: Any
) -> None:
    passes: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: passes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    texts = ["what is a river", "name a green thing", "tell me about mountains at night"]
    try:
        replies = await _replies_together(engine, texts, max_new_tokens=25)
    finally:
        handle.remove()
    prefill_passes = [shape for shape in passes if shape[1] > 1]
    assert prefill_passes and prefill_passes[0][0] == 3, passes  # three prompts, one pass, padded
    for text in texts:
        assert replies[text] == greedy_reply(model, tokenizer, text, 25)


async def test_prompts_that_outnumber_the_running_streams_join_in_one_pass_not_chunk_by_chunk(
    engine: Any, model: Any, tokenizer: Any
) -> None:
    """Chats that arrive together over HTTP land a few milliseconds apart: the first is streaming
    before the others reach the engine. They must not then join one by one, a stall-bounded
    chunk between every decode step (issue 21: each came 0.6 s after the last)."""
    texts = [" ".join(f"{name}{i}" for i in range(40)) for name in ("river", "stone", "cloud")]
    streaming = threading.Event()
    passes: list[tuple[int, int]] = []

    def record(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        rows, tokens = kwargs["input_ids"].shape
        is_prefill = tokens > 1 and kwargs.get("logits_to_keep", 1) == 1
        if is_prefill:
            passes.append((int(rows), int(tokens)))
        elif streaming.is_set():  # a decode step: the three arrive while it runs, and wait together
            assert wait_until(lambda: engine._jobs.qsize() >= len(texts) or len(passes) > 1)

    async def running() -> None:
        prompt = ChatPrompt()
        prompt.add_requester_msg("keep streaming")
        prompt.add_responder_msg(None)
        async with engine.generate(prompt, GenerationParams(max_new_tokens=60, temperature=0), context_len=2048) as gen:
            while await gen.next_text(5.0) is not None:
                streaming.set()

    async def arrive(text: str) -> None:
        await anyio.to_thread.run_sync(streaming.wait)
        replies[text] = await _reply(engine, text, max_new_tokens=10)

    replies: dict[str, tuple[str, GenerationStats]] = {}
    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(running)
            for text in texts:
                tg.start_soon(arrive, text)
    finally:
        handle.remove()
    shortest = min(stats.prompt_tokens for _, stats in replies.values())
    assert shortest > PrefillChunks().budget(running=1, waiting=[shortest])  # held to the bound, they'd be chunked
    assert passes[1:] == [(len(texts), max(stats.prompt_tokens for _, stats in replies.values()))], passes
    for text in texts:
        assert replies[text][0] == greedy_reply(model, tokenizer, text, 10)


async def test_when_a_shared_prefill_fails_each_prompt_is_tried_alone(engine: Any, model: Any, tokenizer: Any) -> None:
    shared_attempts: list[int] = []

    def fail_shared_passes(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        rows, tokens = kwargs["input_ids"].shape
        if rows > 1 and tokens > 1 and kwargs["cache"].get_seq_length() == 0:  # (not a decode step with drafts)
            shared_attempts.append(rows)
            raise RuntimeError("simulated failure of a shared prefill")

    handle = model.register_forward_pre_hook(fail_shared_passes, with_kwargs=True)
    texts = ["first of two", "second of two"]
    try:
        replies = await _replies_together(engine, texts, max_new_tokens=15)
    finally:
        handle.remove()
    assert shared_attempts == [2]  # tried together once, then each alone
    for text in texts:
        assert replies[text] == greedy_reply(model, tokenizer, text, 15)
