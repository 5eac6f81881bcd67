"""Each figure of the suite, with the baseline it is divided by, measured in the same run."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import torch
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from bench import client
from bench.client import MODES, PROMPT
from bench.harness import RawChat, percentile, rss_bytes, running_server
from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.core.detokenize import IncrementalDetokenizer
from chatstream_asgi.engine import MockEngine, resolve_device


class InProcessModel:
    """The model itself, called directly: the physical limit every server figure is held against."""

    def __init__(self, path: Path) -> None:
        device = resolve_device(os.environ.get("BENCH_DEVICE", "auto"))  # where the server runs it too
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval().to(device)
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
        )
        self.prompt_ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)

    def generate_seconds(self, batch: int, new_tokens: int, mode: str = "greedy") -> float:
        """Wall time of `model.generate` for `batch` copies of the prompt, sampled as in `mode`."""
        ids = self.prompt_ids.repeat(batch, 1)
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                **_generate_settings(mode),
            )
            elapsed = time.perf_counter() - start
        assert out.shape[1] == ids.shape[1] + new_tokens
        return elapsed

    def first_text_seconds(self) -> float:
        """Time until `model.generate` has produced the first complete character of its reply
        (a first token may hold only part of one): what a first byte over HTTP can at best match."""
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        seen: list[float] = []
        start = time.perf_counter()

        class FirstText(BaseStreamer):
            prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                elif not seen and detokenizer.add(value.reshape(-1).tolist()):
                    seen.append(time.perf_counter() - start)

            def end(self) -> None:
                pass

        with torch.inference_mode():
            ids = self.prompt_ids
            self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=16,
                do_sample=False,
                streamer=FirstText(),
            )
        if not seen:
            raise RuntimeError("the model produced no complete character in 16 tokens")
        return seen[0]

    def continuous_batching_tokens_per_second(self, requests: int, new_tokens: int, mode: str) -> dict[str, float]:
        """transformers' own continuous batching, streaming, after a warm-up: tokens/s, start seconds."""
        config = GenerationConfig(
            max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=0, **_generate_settings(mode)
        )
        started = time.perf_counter()
        manager = self.model.init_continuous_batching(generation_config=config)
        manager.start()
        try:
            self._run_cb(manager, 1, new_tokens)  # warm-up
            start_seconds = time.perf_counter() - started
            elapsed = self._run_cb(manager, requests, new_tokens)
        finally:
            manager.stop(block=True)
        return {"tokens_per_second": requests * new_tokens / elapsed, "start_seconds": start_seconds}

    def _run_cb(self, manager: Any, requests: int, new_tokens: int) -> float:
        ids = self.prompt_ids[0].tolist()
        start = time.perf_counter()
        pending = set(manager.add_requests([ids] * requests, max_new_tokens=new_tokens, streaming=True))
        while pending:
            result = manager.get_result(timeout=60)
            if result is None:
                raise RuntimeError("transformers' continuous batching stopped answering")
            if result.is_finished():
                pending.discard(result.request_id)
        return time.perf_counter() - start


def _generate_settings(mode: str) -> dict[str, Any]:
    """`model.generate`'s arguments for a mode of `bench.client.MODES`."""
    settings = MODES[mode]
    if settings["temperature"] == 0:
        return {"do_sample": False}
    return {"do_sample": True, **settings}


async def _finished_tokens(url: str, count: int) -> int:
    """Completion tokens of the last `count` generations the server finished (what it really made:
    a sampled reply may end early on the end token)."""
    async with httpx.AsyncClient(base_url=url) as client:
        finished = (await client.get("/bench/finished")).json()
    return sum(f["completion_tokens"] for f in finished[-count:])


def bench_overhead(path: Path, reps: int, new_tokens: int) -> dict[str, dict[str, float]]:
    """One chat streamed over HTTP vs `model.generate` in-process, greedy and sampled: tokens/s,
    and first byte vs first text."""
    local = InProcessModel(path)
    local.generate_seconds(1, 4)  # warm-up
    first_token = [local.first_text_seconds() for _ in range(reps)]
    results = {}
    with running_server(path, concurrency=1, queue=2, max_new_tokens=new_tokens) as (url, _):

        async def served(mode: str) -> list[tuple[float, float]]:
            await client.chat(url, client.body(mode, 4))  # warm-up
            measured = []
            for _ in range(reps):
                reply = await client.chat(url, client.body(mode, new_tokens))
                tokens = await _finished_tokens(url, 1)
                measured.append((tokens / reply.seconds, reply.first_byte))
            return measured

        for mode in MODES:
            direct = [new_tokens / local.generate_seconds(1, new_tokens, mode) for _ in range(reps)]
            over_http = anyio.run(served, mode)
            results[mode] = {
                "generate_tokens_per_second": statistics.median(direct),
                "http_tokens_per_second": statistics.median(t for t, _ in over_http),
                "ratio": statistics.median(t for t, _ in over_http) / statistics.median(direct),
                "model_first_text_ms": statistics.median(first_token) * 1e3,
                "http_first_byte_ms": statistics.median(f for _, f in over_http) * 1e3,
                "first_byte_extra_ms": (statistics.median(f for _, f in over_http) - statistics.median(first_token))
                * 1e3,
            }
    return results


async def _health_latencies(url: str, count: int) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(base_url=url) as http:
        await http.get("/health")  # open the connection outside the measurement
        for _ in range(count):
            start = time.perf_counter()
            await http.get("/health")
            latencies.append(time.perf_counter() - start)
    return latencies


def bench_event_loop(path: Path, samples: int) -> dict[str, float]:
    """p50/p99 of GET /health with every slot generating (and one more queued) ÷ the server idle;
    the streams are read chunk by chunk by the same client meanwhile."""
    slots = 2

    async def measure() -> tuple[list[float], list[float], bool]:
        idle = await _health_latencies(url, samples)
        async with anyio.create_task_group() as streams:
            for _ in range(slots + 1):
                streams.start_soon(client.chat, url, client.body("greedy", 3000))
            await _wait_for(url, lambda state: state["processing"] == slots and state["waiting"] == 1)
            loaded = await _health_latencies(url, samples)
            still_busy = (await _load(url))["processing"] == slots
            streams.cancel_scope.cancel()  # the clients leave
        return idle, loaded, still_busy

    with running_server(path, concurrency=slots, queue=2, max_new_tokens=3000) as (url, _):
        idle, loaded, still_busy = anyio.run(measure)
    if not still_busy:
        raise RuntimeError("generations ended during the loaded measurement: raise max_new_tokens")
    return {
        "idle_p50_ms": statistics.median(idle) * 1e3,
        "idle_p99_ms": percentile(idle, 0.99) * 1e3,
        "loaded_p50_ms": statistics.median(loaded) * 1e3,
        "loaded_p99_ms": percentile(loaded, 0.99) * 1e3,
        "p50_ratio": statistics.median(loaded) / statistics.median(idle),
        "p99_ratio": percentile(loaded, 0.99) / percentile(idle, 0.99),
    }


async def _load(url: str) -> dict[str, int]:
    async with httpx.AsyncClient(base_url=url) as http:
        state: dict[str, int] = (await http.get("/ready")).json()["load"]
    return state


async def _wait_for(url: str, condition: Callable[[dict[str, int]], bool], timeout: float = 120.0) -> None:
    """Poll the server's load until `condition` holds."""
    with anyio.fail_after(timeout):
        while True:
            if condition(await _load(url)):
                return
            await anyio.sleep(0.002)  # the server's state, not ours: polling is the only way


def bench_scaling(path: Path, counts: list[int], new_tokens: int, with_cb: bool, reps: int) -> dict[str, Any]:
    """Aggregate tokens/s with N concurrent chats ÷ one chat, greedy and sampled; the static-batch
    ceiling (`model.generate` on a batch of 8, same sampling) and transformers' continuous batching
    beside it."""
    local = InProcessModel(path)
    local.generate_seconds(8, 4)  # warm-up
    results: dict[str, Any] = {}
    with running_server(path, concurrency=max(counts), queue=max(counts), max_new_tokens=new_tokens) as (url, _):

        async def round_of(count: int, mode: str) -> float:
            start = time.perf_counter()
            async with anyio.create_task_group() as chats:
                for _ in range(count):
                    chats.start_soon(client.chat, url, client.body(mode, new_tokens))
            elapsed = time.perf_counter() - start
            return await _finished_tokens(url, count) / elapsed

        anyio.run(client.chat, url, client.body("greedy", 4))  # warm-up
        for mode in MODES:
            ceiling = statistics.median(
                8 * new_tokens / local.generate_seconds(8, new_tokens, mode) for _ in range(reps)
            )
            single = statistics.median(new_tokens / local.generate_seconds(1, new_tokens, mode) for _ in range(reps))
            aggregate = {
                count: statistics.median(anyio.run(round_of, count, mode) for _ in range(reps)) for count in counts
            }
            one = aggregate[counts[0]]
            result: dict[str, Any] = {
                "tokens_per_second": aggregate,
                "ratio_to_one_chat": {count: value / one for count, value in aggregate.items()},
                "generate_batch1_tokens_per_second": single,
                "static_batch8_tokens_per_second": ceiling,
                "static_batch8_ratio": ceiling / single,
            }
            if 8 in aggregate:
                result["eight_chats_vs_static_batch8"] = aggregate[8] / ceiling
            if with_cb:
                cb = local.continuous_batching_tokens_per_second(8, new_tokens, mode)
                result["transformers_cb8_tokens_per_second"] = cb["tokens_per_second"]
                result["transformers_cb_start_seconds"] = cb["start_seconds"]
                if 8 in aggregate:
                    result["eight_chats_vs_transformers_cb8"] = aggregate[8] / cb["tokens_per_second"]
            results[mode] = result
    return results


def _words(count: int, seed: int) -> str:
    """`count` plain English words, different for each `seed`: a user's message of known length."""
    vocabulary = "the a server stream token reply model cache turn user question answer long short river "
    vocabulary += "mountain city night morning story engine window light green blue quiet loud fast slow"
    words = vocabulary.split()
    return " ".join(words[(seed * 7 + i * 13) % len(words)] for i in range(count))


def bench_conversation(path: Path, turns: int, words: int, new_tokens: int, reps: int) -> dict[str, Any]:
    """Time to first byte of each turn of a conversation (`words`-word messages, default sampling),
    with the conversation cache and without it (`conversation_cache_bytes=0`): turn `turns` ÷ turn 1,
    each turn's median over `reps` conversations.

    Sampled, not greedy: a random-weight model's greedy reply can loop on byte tokens that never
    make a whole character, and its first byte then comes with its last.
    """

    async def converse(url: str, rep: int) -> list[float]:
        """One conversation; its messages are its own, so no turn finds another conversation's cache."""
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:  # one visitor: one session
            return [
                (
                    await client.chat(
                        url, client.body("sampled", new_tokens, _words(words, 100 * rep + turn)), client=http
                    )
                ).first_byte
                for turn in range(turns)
            ]

    results: dict[str, Any] = {}
    for label, cache_bytes in (("with_cache", -1), ("without_cache", 0)):
        settings = {"concurrency": 1, "queue": 1, "max_new_tokens": new_tokens, "conversation_cache_bytes": cache_bytes}
        with running_server(path, **settings) as (url, _):
            anyio.run(client.chat, url, client.body("greedy", 2, "warm up"))
            runs = [anyio.run(converse, url, rep) for rep in range(reps)]
        first_bytes = [statistics.median(run[turn] for run in runs) for turn in range(turns)]
        results[label] = {
            "first_byte_ms": [value * 1e3 for value in first_bytes],
            "last_over_first": first_bytes[-1] / first_bytes[0],
        }
    # Turn 10 with the cache ÷ turn 10 without: what the cache saves where the history is long.
    results["cache_speedup_last_turn"] = (
        results["without_cache"]["first_byte_ms"][-1] / results["with_cache"]["first_byte_ms"][-1]
    )
    return results


def bench_prefill_stall(path: Path, streams: int, prompt_words: int, reps: int) -> dict[str, Any]:
    """Inter-token latency of `streams` running chats while a long prompt joins the batch: the p99
    of their gaps during its prefill ÷ the p99 of their steady gaps (and ÷ the steady median),
    each round a fresh set of chats and a prompt not seen before (the conversation cache must not
    help), with chunked prefill (the default) and with each prompt prefilled whole.

    The gaps are between chunks of text as the client reads them. A random-weight model's reply
    is full of byte tokens that make no whole character, so some of its text comes only with a
    later token: its steady p99 is several steps, not one. The same holds while a prompt joins,
    so p99 ÷ p99 is the like-for-like measure of the stall.
    """

    seeds = iter(range(1000, 2000))

    async def round_of(url: str) -> dict[str, Any]:
        await _wait_for(url, lambda load: load["processing"] == 0)  # the last round's chats are gone
        replies = [client.Reply(started=time.perf_counter()) for _ in range(streams)]
        joined = client.Reply(started=0.0)
        async with anyio.create_task_group() as chats:
            for reply in replies:
                chats.start_soon(lambda r=reply: client.chat(url, client.body("sampled", 400), reply=r))
            with anyio.fail_after(120):
                while True:  # until all stream, past their start-up; the client's own state: polled
                    if min(len(reply.chunk_times) for reply in replies) >= 40:
                        break
                    await anyio.sleep(0.005)
            steady_from = max(reply.chunk_times[10] for reply in replies)
            join_at = time.perf_counter()
            await client.chat(url, client.body("greedy", 2, _words(prompt_words, next(seeds))), reply=joined)
            chats.cancel_scope.cancel()  # the running chats have shown what they had to
        joined_at = joined.chunk_times[0]
        steady: list[float] = []
        during: list[float] = []
        for reply in replies:
            for start, end in zip(reply.chunk_times, reply.chunk_times[1:], strict=False):
                if steady_from <= start and end <= join_at:
                    steady.append(end - start)
                elif start < joined_at and end > join_at:  # any part of it while the prompt joined
                    during.append(end - start)
        return {"steady": steady, "during": during, "join_seconds": joined_at - join_at}

    results: dict[str, Any] = {}
    for label, chunk in (("chunked", 0), ("whole", 1 << 20)):
        settings = {"concurrency": streams + 1, "queue": 0, "max_new_tokens": 400, "prefill_chunk_tokens": chunk}
        with running_server(path, **settings) as (url, _):
            anyio.run(round_of, url)  # warm-up: long attention paths, and chunk sizes settle
            rounds = [anyio.run(round_of, url) for _ in range(reps)]
            prompt_tokens = anyio.run(_finished_prompt_tokens, url)
            chunk_tokens = httpx.get(f"{url}/bench/prefill-chunk").json()["tokens"]
        steady = [gap for r in rounds for gap in r["steady"]]
        during = [gap for r in rounds for gap in r["during"]]
        results[label] = {
            "prompt_tokens": prompt_tokens,
            "steady_itl_ms": statistics.median(steady) * 1e3,
            "steady_itl_p99_ms": percentile(steady, 0.99) * 1e3,
            "join_itl_ms": statistics.median(during) * 1e3,
            "join_itl_p99_ms": percentile(during, 0.99) * 1e3,
            "join_itl_max_ms": max(during) * 1e3,
            "p99_over_steady_p99": percentile(during, 0.99) / percentile(steady, 0.99),
            "p99_over_steady": percentile(during, 0.99) / statistics.median(steady),
            "join_first_byte_ms": statistics.median(r["join_seconds"] for r in rounds) * 1e3,
            "chunk_tokens": chunk_tokens,
        }
    results["chunks_alone"] = _chunked_prefill_cost(path, prompt_words, results["chunked"]["chunk_tokens"])
    return results


def _chunked_prefill_cost(path: Path, prompt_words: int, chunk_tokens: int) -> dict[str, float]:
    """The joining prompt's prefill alone, in process: whole in one pass, and in chunks of the
    size the server settled on while chats streamed. Each pass has a cost of its own (reading the
    weights, the layers' Python), so chunks cost more than one pass: the joining prompt's first
    byte pays that on top of the decode steps between its chunks."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer(_words(prompt_words, 0), return_tensors="pt").input_ids

    def seconds(chunk: int, tokens: int = ids.shape[1]) -> float:
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        for at in range(0, tokens, chunk):
            model(input_ids=ids[:, at : min(at + chunk, tokens)], cache=cache, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start

    with torch.inference_mode():
        seconds(ids.shape[1])  # warm-up
        whole = statistics.median(seconds(ids.shape[1]) for _ in range(3))
        chunked = statistics.median(seconds(chunk_tokens) for _ in range(3))
        one = statistics.median(seconds(1, 1) for _ in range(20))  # a pass of one token: what any pass costs
    return {
        "prompt_tokens": int(ids.shape[1]),
        "chunk_tokens": chunk_tokens,
        "whole_ms": whole * 1e3,
        "chunked_ms": chunked * 1e3,
        "one_token_pass_ms": one * 1e3,
        "chunked_over_whole": chunked / whole,
    }


async def _finished_prompt_tokens(url: str) -> int:
    """Prompt tokens of the longest prompt the server has finished (the long one that joined)."""
    async with httpx.AsyncClient(base_url=url) as http:
        return max(int(finished["prompt_tokens"]) for finished in (await http.get("/bench/finished")).json())


def bench_disconnect(path: Path, trials: int) -> dict[str, float]:
    """Decode steps after a client leaves; how soon a waiting request then streams (÷ an idle first byte)."""

    request = client.body("greedy", 3000)

    async def handoff() -> float:
        """A client leaves while another waits for its slot: seconds until the waiting one's first byte."""
        waiting: list[client.Reply] = []

        async def wait_in_line() -> None:
            waiting.append(await client.chat(url, request, leave_after_first_chunk=True))

        async with (
            httpx.AsyncClient(base_url=url, timeout=300) as http,
            http.stream("POST", "/chat_stream", json=request) as running,
        ):
            chunks = running.aiter_text()  # kept, not left by `break`: that would close the stream
            while not await anext(chunks):
                pass
            async with anyio.create_task_group() as line:
                line.start_soon(wait_in_line)
                await _wait_for(url, lambda state: state["waiting"] == 1)
                left_at = time.perf_counter()
                await running.aclose()  # unread: the connection closes, the client left
        await _wait_for(url, lambda state: state["processing"] == 0)
        return waiting[0].chunk_times[0] - left_at

    async def measure() -> tuple[list[float], list[float]]:
        idle_first_byte = []
        for _ in range(trials):
            reply = await client.chat(url, request, leave_after_first_chunk=True)
            idle_first_byte.append(reply.first_byte)
            await _wait_for(url, lambda state: state["processing"] == 0)
        return idle_first_byte, [await handoff() for _ in range(trials)]

    with running_server(path, concurrency=1, queue=2, max_new_tokens=3000) as (url, _):
        idle_first_byte, handoffs = anyio.run(measure)
        finished = httpx.get(f"{url}/bench/finished").json()
    left = [f for f in finished if f["outcome"] == "client_disconnected_while_streaming"]
    steps = [f["steps_after_cancel"] for f in left]
    return {
        "disconnects": len(left),
        "steps_after_cancel_max": max(steps),
        "steps_after_cancel_mean": statistics.mean(steps),
        "idle_first_byte_ms": statistics.median(idle_first_byte) * 1e3,
        "handoff_first_byte_ms": statistics.median(handoffs) * 1e3,
        "handoff_ratio": statistics.median(handoffs) / statistics.median(idle_first_byte),
    }


def _raw_chat(url: str, new_tokens: int, path: str = "/chat_stream") -> RawChat:
    body: dict[str, Any] = client.body("greedy", new_tokens)
    if path.startswith("/v1"):
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": new_tokens, "stream": True}
    return RawChat(url, path, body)


def bench_bytes(path: Path, new_tokens: int) -> dict[str, dict[str, float]]:
    """Bytes on the wire (head, chunk framing and all) ÷ the reply's own UTF-8 bytes, per format
    (a bare socket: an HTTP client hides the framing this figure counts)."""
    results = {}
    with running_server(path, concurrency=1, queue=2, max_new_tokens=new_tokens) as (url, _):
        reference = _raw_chat(url, new_tokens)
        reference.to_the_end()
        reply_bytes = len(reference.body())
        for name, route in (
            ("delta", "/chat_stream"),
            ("chatstream", "/chat_stream?format=chatstream"),
            ("sse", "/chat_stream?format=sse"),
            ("openai", "/v1/chat/completions"),
        ):
            chat = _raw_chat(url, new_tokens, route)
            chat.to_the_end()
            results[name] = {"wire_bytes": len(chat.received), "ratio": len(chat.received) / reply_bytes}
    return results


def bench_memory(path: Path, sessions: int) -> dict[str, float]:
    """Resident memory of the server beyond a process that only loads the model: idle, then with
    `sessions` stored conversations. The conversation cache is off here: it holds what it is
    given (`conversation_cache_bytes`), and would hide what a session itself costs."""
    only_model = subprocess.run(
        [sys.executable, "-c", _MODEL_ONLY, str(path)], capture_output=True, text=True, check=True
    ).stdout
    model_rss = int(only_model.strip())
    settings = {"concurrency": 2, "queue": sessions, "max_new_tokens": 2, "conversation_cache_bytes": 0}
    with running_server(path, **settings) as (url, pid):
        idle = rss_bytes(pid)
        for _ in range(sessions):
            with httpx.Client(base_url=url) as client:  # a fresh client: a new session each time
                client.post("/chat_stream", json={"user_input": PROMPT, "max_new_tokens": 2})
        loaded = rss_bytes(pid)
    mib = 1024 * 1024
    return {
        "model_only_mib": model_rss / mib,
        "idle_extra_mib": (idle - model_rss) / mib,
        "sessions": sessions,
        "with_sessions_extra_mib": (loaded - model_rss) / mib,
        "per_session_kib": (loaded - idle) / sessions / 1024,
    }


_MODEL_ONLY = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
AutoTokenizer.from_pretrained(sys.argv[1]); model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[1, 2, 3]])
with torch.inference_mode():
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(int(line.split()[1]) * 1024)
"""


def bench_passthrough(iterations: int) -> dict[str, float]:
    """A route the middleware does not handle: in-process ASGI calls through it ÷ the bare app."""

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hello")

    bare = Starlette(routes=[Route("/hello", hello)])
    chat_stream = ChatStream(engine=MockEngine())
    wrapped = ChatStreamMiddleware(
        bare, chat_stream=chat_stream, serve=True, apis={"all": True}, openai=True, health=True
    )
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": "/hello", "raw_path": b"/hello", "root_path": "", "query_string": b"", "headers": [],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    async def timed(app: Any) -> float:
        start = time.perf_counter()
        for _ in range(iterations):
            await app(dict(scope), receive, send)
        return time.perf_counter() - start

    async def run() -> dict[str, float]:
        await timed(bare)
        await timed(wrapped)  # warm-up both
        bare_times = [await timed(bare) for _ in range(3)]
        wrapped_times = [await timed(wrapped) for _ in range(3)]
        return {
            "bare_us_per_request": min(bare_times) / iterations * 1e6,
            "wrapped_us_per_request": min(wrapped_times) / iterations * 1e6,
            "ratio": min(wrapped_times) / min(bare_times),
        }

    return anyio.run(run)
