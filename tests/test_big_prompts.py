"""A megabyte of prompt does not stall the chats already streaming (issue 20, item 1).

Each request's prompt is cut to the newest characters that can reach the model before it is
rendered or tokenized, and it is prepared on a thread of its own, not on the engine thread that runs
every chat's decode steps. Over real HTTP, a running reply's gaps between chunks are measured
while ~1 MB prompts arrive on /chat_stream and /v1 (one big message; 20,000 small system
messages), against its own steady gaps measured before in the same test.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware
from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.core.prompt import ChatPrompt, fit_prompt, keep_newest_text
from chatstream_asgi.engine.batching import BatchingEngine
from chatstream_asgi.engine.local import LocalEngine, LocalJob

from .conftest import HANG_GUARD, ModelHooks, open_chat, read_first_text, wait_until

CONTEXT_LEN = 512
MEGABYTE = 1_000_000
STEP_DELAY = 0.1  # seconds a decode step takes: the victim's steady pace, well above a busy machine's noise


class _Arrivals:
    """Reads a chunked reply on a thread of its own, noting when each piece arrives."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.times: list[float] = []
        self.data = b""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self.data.endswith(b"0\r\n\r\n"):
            chunk = self.sock.recv(65536)
            if not chunk:
                return
            self.times.append(time.perf_counter())
            self.data += chunk

    def gaps(self, start: float, end: float) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False) if start <= b <= end]

    def join(self) -> None:
        self._thread.join(HANG_GUARD)


def _megabyte_words() -> str:
    words = " ".join(f"w{i % 97}" for i in range(MEGABYTE // 3))
    return words[-MEGABYTE:] + " tell me a story"


def test_megabyte_prompts_do_not_stall_a_running_stream(make_chat_stream: Any, serve: Any, hooks: ModelHooks) -> None:
    hooks.step_delay = STEP_DELAY
    # Small fixed prefill chunks: each costs about a decode step even on a busy machine, so what
    # is measured is preparing the prompts (chunking has its own tests: test_chunked_prefill.py).
    chat_stream = make_chat_stream(
        num_of_concurrent_executions=4, max_new_tokens=300, context_len=CONTEXT_LEN, prefill_chunk_tokens=64
    )
    app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, openai=True, max_body_size=4 << 20)
    live = serve(app)
    big = _megabyte_words()
    bodies = {  # built before the clock starts: the test's own JSON work shares this process
        name: json.dumps({"model": chat_stream.name, "messages": messages, "max_tokens": 2, "temperature": 0})
        for name, messages in {
            "v1_big_message": [{"role": "user", "content": big}],
            "v1_many_systems": [
                {"role": "system", "content": f"You are assistant number {i}, be kind and brief."}
                for i in range(20_000)
            ]
            + [{"role": "user", "content": "tell me a story"}],
        }.items()
    }
    assert all(len(body) > MEGABYTE for body in bodies.values())
    victim_sock = open_chat(live.url, "tell me a story")
    read_first_text(victim_sock)
    victim = _Arrivals(victim_sock)
    time.sleep(4.5)  # its steady pace, before any big prompt (as long as the attack, about)
    steady_end = time.perf_counter()
    steady = victim.gaps(steady_end - 4.0, steady_end)
    assert len(steady) > 15, steady
    answers: dict[str, Any] = {}
    attacker = open_chat(live.url, big)  # /chat_stream: the reply starts, from the prompt's tail
    answers["chat_stream"] = read_first_text(attacker)
    attacker.close()
    with httpx.Client(base_url=live.url, timeout=HANG_GUARD) as client:
        for name, body in bodies.items():
            answers[name] = client.post(
                "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
            )
    attack_end = time.perf_counter()
    assert not victim.data.endswith(b"0\r\n\r\n"), "the victim's reply ended before the attack did"
    under_attack = victim.gaps(steady_end, attack_end)
    victim_sock.shutdown(socket.SHUT_RDWR)
    victim.join()
    victim_sock.close()

    assert answers["chat_stream"].startswith(b"HTTP/1.1 200")
    for name in ("v1_big_message", "v1_many_systems"):
        response = answers[name]
        assert response.status_code == 200, response.text
        # The reply follows the newest tokens that fit: the context less the reply's room.
        assert response.json()["usage"]["prompt_tokens"] == CONTEXT_LEN - 2
    # Its steady gap: the slowest of them, so the noise of a busy machine is in the baseline too.
    baseline = max(steady)
    assert max(under_attack) < 3 * baseline, (baseline, sorted(under_attack)[-5:])


def _cases() -> dict[str, list[dict[str, str]]]:
    big = _megabyte_words()
    return {
        "one big message": [{"role": "user", "content": big}],
        "a big system text": [{"role": "system", "content": big}, {"role": "user", "content": "hi"}],
        "20,000 system messages": [{"role": "system", "content": f"rule {i}: be brief."} for i in range(20_000)]
        + [{"role": "user", "content": "tell me a story"}],
        "system messages after the request": [{"role": "user", "content": "tell me a story"}]
        + [{"role": "system", "content": f"rule {i}: be brief."} for i in range(20_000)],
        "a big old turn": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": big},
            {"role": "user", "content": "second"},
            {"role": "assistant", "content": "a short answer"},
            {"role": "user", "content": "third"},
        ],
        "a big old request": [
            {"role": "user", "content": big},
            {"role": "assistant", "content": "a short answer"},
            {"role": "user", "content": "again"},
        ],
        "a big system text and short turns": [{"role": "system", "content": big}]
        + [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}] * 3
        + [{"role": "user", "content": "bye"}],
        "short turns": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}] * 3
        + [{"role": "user", "content": "bye"}],
        "30,000 empty turns": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}] * 15_000
        + [{"role": "user", "content": "bye"}],
        "30,000 empty requests in a row": [{"role": "user", "content": ""}] * 30_000
        + [{"role": "user", "content": "bye"}],
    }


@pytest.mark.anyio  # (a job's channel belongs to an event loop)
async def test_cutting_a_prompt_before_tokenizing_keeps_the_tokens_the_whole_prompt_ends_with(
    model: Any, tokenizer: Any
) -> None:
    """The ids prepared from the cut text are the ones the whole text, rendered and fitted as
    before, ends with: the cut saves work, not what the model sees."""
    engine = LocalEngine(model, tokenizer, device="cpu")
    params = GenerationParams(max_new_tokens=24, temperature=0)
    budget = CONTEXT_LEN - params.max_new_tokens

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for name, messages in _cases().items():
        whole = ChatPrompt.from_messages(messages)
        whole.set_tokenizer(tokenizer)
        expected = tokenizer(fit_prompt(whole, count_tokens, budget), add_special_tokens=False)["input_ids"][-budget:]
        ids = engine.encode_prompt(LocalJob(ChatPrompt.from_messages(messages), params, CONTEXT_LEN))
        assert ids[0].tolist() == expected, name


@pytest.mark.parametrize("name", ["30,000 empty turns", "30,000 empty requests in a row"])
def test_empty_messages_are_cut_to_what_a_context_can_hold_before_rendering(name: str, tokenizer: Any) -> None:
    """Empty messages cost no characters, but each renders as a token at least: thirty thousand of
    them in a 900 kB body are cut to one context's worth of messages before anything is rendered."""
    prompt = ChatPrompt.from_messages(_cases()[name])
    budget = CONTEXT_LEN - 24
    keep_newest_text(prompt, budget, longest_token=16)
    assert 0 < len(prompt.chat_contents) <= budget
    assert [content.message for content in prompt.chat_contents[-2:]] == ["bye", None]  # (the reply to come)


class _HeldPrompt(ChatPrompt):
    """A prompt whose rendering waits for `release`: it holds the preparing thread."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release
        self.held = threading.Event()  # set while a rendering waits for `release`
        self.let_go = threading.Event()  # set once one has gone on

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        self.held.set()
        self.release.wait(HANG_GUARD)
        self.let_go.set()
        return super().create_prompt(opts)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the engine's side is backend-neutral)
async def test_a_request_that_leaves_while_its_prompt_waits_to_be_prepared_lets_go_at_once(
    model: Any, tokenizer: Any
) -> None:
    """Another prompt holds the preparing thread; a request queued behind it leaves. Its
    generation ends now (its slot is free), not once the thread got round to dropping it."""
    engine = BatchingEngine(model, tokenizer, device="cpu", max_batch_size=4)
    assert wait_until(lambda: engine.ready)
    release = threading.Event()
    params = GenerationParams(max_new_tokens=4, temperature=0)
    try:
        held = _HeldPrompt(release)
        held.add_requester_msg("hello")
        held.add_responder_msg(None)
        leaving = ChatPrompt.from_messages([{"role": "user", "content": "hi"}])
        async with engine.generate(held, params, context_len=CONTEXT_LEN) as first:
            with anyio.fail_after(HANG_GUARD):  # (set by the preparing thread, which has no loop to wake)
                while not held.held.is_set():  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            async with engine.generate(leaving, params, context_len=CONTEXT_LEN) as second:
                pass
            # (Before, the exit waited for the preparing thread to reach it and drop it.)
            assert not held.let_go.is_set() and second.stats.finish_reason == "cancelled"
            release.set()
            while await first.next_text(HANG_GUARD) is not None:  # the held prompt goes on as usual
                pass
            assert first.stats.finish_reason == "length"
    finally:
        release.set()
        engine.close()
