"""Chunked prefill: a long prompt joins the batch a chunk at a time, between decode steps, so the
streams already running keep streaming while it does, and every reply is still exactly its own."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette

from chatstream_asgi import ChatPrompt, ChatStreamMiddleware
from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.engine import BatchingEngine, GenerationStats
from chatstream_asgi.engine.prefill import PrefillChunks

from .conftest import HANG_GUARD, ModelHooks, greedy_reply, open_chat, wait_until

pytestmark = pytest.mark.anyio

CHUNK = 8
LONG = " ".join(f"word{i}" for i in range(60))  # a prompt of many chunks


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the engine's thread side is backend-neutral; one backend is enough here


@pytest.fixture
def engine(model: Any, tokenizer: Any) -> Any:
    # Without drafts, a decode step is a pass of one token per row, which the tests tell from a chunk
    # (prompt lookup, which steps several tokens per row, has its own tests: test_prompt_lookup.py).
    engine = BatchingEngine(
        model, tokenizer, device="cpu", max_batch_size=8, prefill_chunk_tokens=CHUNK, prompt_lookup_num_tokens=0
    )
    assert wait_until(lambda: engine.ready)
    yield engine
    engine.close()


class ForwardLog:
    """The number of input tokens of every forward pass, in order: a prefill chunk is a pass of
    one row over several tokens; a decode step is a pass over one token per row."""

    def __init__(self, model: Any) -> None:
        self.passes: list[tuple[int, int]] = []  # (rows, tokens)
        self._lock = threading.Lock()
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        rows, tokens = kwargs["input_ids"].shape
        with self._lock:
            self.passes.append((int(rows), int(tokens)))

    def remove(self) -> None:
        self._handle.remove()


def _prompt(text: str) -> ChatPrompt:
    prompt = ChatPrompt()
    prompt.add_requester_msg(text)
    prompt.add_responder_msg(None)
    return prompt


async def _reply(engine: Any, text: str, **params: Any) -> tuple[str, GenerationStats]:
    reply = ""
    params = {"temperature": 0, **params}
    async with engine.generate(_prompt(text), GenerationParams(**params), context_len=2048) as gen:
        while (piece := await gen.next_text(5.0)) is not None:
            reply += piece
    return reply, gen.stats


async def test_a_prompt_prefilled_in_chunks_replies_exactly_as_generate_does(
    engine: Any, model: Any, tokenizer: Any
) -> None:
    log = ForwardLog(model)
    try:
        reply, stats = await _reply(engine, LONG, max_new_tokens=30)
    finally:
        log.remove()
    assert stats.prompt_tokens > 4 * CHUNK
    assert reply == greedy_reply(model, tokenizer, LONG, 30)
    chunks = [tokens for rows, tokens in log.passes if tokens > 1]
    assert max(chunks) == CHUNK and len(chunks) >= stats.prompt_tokens // CHUNK


async def test_running_streams_get_a_decode_step_between_the_chunks_of_a_joining_prompt(
    engine: Any, model: Any, tokenizer: Any
) -> None:
    results: dict[str, str] = {}
    joining = anyio.Event()
    log = ForwardLog(model)

    async def running() -> None:
        reply = ""
        async with engine.generate(
            _prompt("keep streaming"), GenerationParams(max_new_tokens=120, temperature=0), context_len=2048
        ) as gen:
            while (piece := await gen.next_text(5.0)) is not None:
                reply += piece
                joining.set()  # the long prompt arrives once this stream runs
        results["running"] = reply

    async def join() -> None:
        await joining.wait()
        results["joining"] = (await _reply(engine, LONG, max_new_tokens=10))[0]

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(running)
            tg.start_soon(join)
    finally:
        log.remove()
    chunk_passes = [index for index, (rows, tokens) in enumerate(log.passes) if rows == 1 and tokens == CHUNK]
    assert len(chunk_passes) >= 4
    between = [log.passes[a + 1 : b] for a, b in itertools.pairwise(chunk_passes)]
    assert all(any(tokens == 1 for _, tokens in passes) for passes in between), log.passes
    assert results["running"] == greedy_reply(model, tokenizer, "keep streaming", 120)
    assert results["joining"] == greedy_reply(model, tokenizer, LONG, 10)


async def test_a_client_leaving_mid_prefill_stops_it_after_the_chunk_in_flight(engine: Any, model: Any) -> None:
    hooks = ModelHooks(model)
    hooks.prefill_delay = 0.05  # each chunk takes a while: the cancel lands between two of them
    async with engine.generate(
        _prompt(LONG), GenerationParams(max_new_tokens=10, temperature=0), context_len=2048
    ) as gen:
        assert hooks.prefill_started.wait(HANG_GUARD)
        gen.cancel()
        while await gen.next_text(5.0) is not None:
            pass
    assert gen.stats.finish_reason == "cancelled"
    assert gen.stats.completion_tokens == 0
    assert hooks.prefills <= 2  # the chunk in flight when it left, and perhaps the one just starting
    assert hooks.prefills * CHUNK < gen.stats.prompt_tokens


async def test_a_failing_chunk_fails_only_its_own_request(engine: Any, model: Any, tokenizer: Any) -> None:
    calls = {"chunks": 0}

    def fail_third_chunk(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs["input_ids"].shape == (1, CHUNK):
            calls["chunks"] += 1
            if calls["chunks"] == 3:
                raise RuntimeError("simulated failure in a prefill chunk")

    handle = model.register_forward_pre_hook(fail_third_chunk, with_kwargs=True)
    failed: list[BaseException] = []
    results: dict[str, str] = {}

    async def doomed() -> None:
        try:
            await _reply(engine, LONG, max_new_tokens=10)
        except Exception as error:
            failed.append(error)

    async def bystander() -> None:
        results["bystander"] = (await _reply(engine, "bystander", max_new_tokens=40))[0]

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(bystander)
            tg.start_soon(doomed)
    finally:
        handle.remove()
    assert len(failed) == 1 and "simulated failure in a prefill chunk" in str(failed[0])
    assert results["bystander"] == greedy_reply(model, tokenizer, "bystander", 40)
    assert (await _reply(engine, LONG, max_new_tokens=10))[0] == greedy_reply(model, tokenizer, LONG, 10)


def test_chunks_settle_where_one_costs_about_one_and_a_half_decode_steps() -> None:
    chunks = PrefillChunks()
    assert chunks.budget(running=0, waiting=[1000]) == PrefillChunks.largest  # nobody to stall
    chunks.step_took(0.010)
    for _ in range(20):  # a device where a chunk costs 1 ms per 10 tokens: 150 tokens cost 1.5 steps
        size = chunks.budget(running=4, waiting=[1000])
        chunks.chunk_took(size, size * 0.0001)
    assert 140 <= chunks.budget(running=4, waiting=[1000]) <= 160


def test_chunks_grow_on_a_device_where_prefill_is_cheap() -> None:
    chunks = PrefillChunks()
    chunks.step_took(0.010)
    for _ in range(20):
        size = chunks.budget(running=4, waiting=[1000])
        chunks.chunk_took(size, size * 0.000001)
    assert chunks.budget(running=4, waiting=[1000]) == PrefillChunks.largest


def test_chunks_never_go_below_the_size_where_chunking_stops_paying() -> None:
    chunks = PrefillChunks()
    chunks.step_took(0.001)
    for _ in range(20):
        size = chunks.budget(running=4, waiting=[1000])
        chunks.chunk_took(size, 0.5)
    assert chunks.budget(running=4, waiting=[1000]) == PrefillChunks.smallest


def test_a_fixed_chunk_size_is_kept_whatever_the_timings() -> None:
    chunks = PrefillChunks(64)
    chunks.step_took(0.001)
    chunks.chunk_took(64, 1.0)
    assert chunks.budget(running=4, waiting=[1000]) == chunks.budget(running=0, waiting=[1000]) == 64


def test_prompts_that_outnumber_the_running_streams_go_through_whole() -> None:
    chunks = PrefillChunks()
    chunks.step_took(0.010)
    chunks.chunk_took(64, 0.1)  # chunks must shrink to cost 1.5 steps: the bound is tight
    assert chunks.budget(running=4, waiting=[120] * 4) < PrefillChunks.largest
    assert chunks.budget(running=1, waiting=[120] * 7) == PrefillChunks.largest  # chats that arrived together


def test_prompts_too_long_for_one_pass_join_by_chunks_however_many_wait() -> None:
    chunks = PrefillChunks()
    chunks.step_took(0.010)
    chunks.chunk_took(64, 0.1)
    # Through whole, each would stall the running stream for a whole long prefill, one after another.
    assert chunks.budget(running=1, waiting=[1000] * 7) < PrefillChunks.largest


def test_a_chunk_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="prefill_chunk_tokens must be at least 1"):
        PrefillChunks(0)


def test_a_client_leaving_while_its_prompt_waits_behind_a_long_prefill_frees_its_slot_before_that_ends(
    make_chat_stream: Any, serve: Any, hooks: ModelHooks
) -> None:
    chat_stream = make_chat_stream(num_of_concurrent_executions=2, prefill_chunk_tokens=CHUNK, max_new_tokens=4)
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True))
    hooks.prefill_delay = 0.05  # a slow model: the long prompt takes many slow chunks
    hooks.forward_calls = hooks.prefills = 0
    long_prompt = " ".join(f"word{i}" for i in range(120))
    long = open_chat(server.url, long_prompt)
    assert wait_until(lambda: hooks.prefills >= 2)
    waiting = open_chat(server.url, "a short question")
    assert wait_until(lambda: chat_stream.load()["processing"] == 2)
    queued_by = hooks.prefills
    assert wait_until(lambda: hooks.prefills >= queued_by + 3)  # the engine took it in behind the long prompt
    waiting.close()
    assert wait_until(lambda: chat_stream.load()["processing"] <= 1)
    assert hooks.forward_calls == hooks.prefills  # freed while the long prompt is still in prefill
    hooks.prefill_delay = 0
    long.close()
