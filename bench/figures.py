"""Each figure of the suite, with the baseline it is divided by, measured in the same run."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import torch
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from bench.harness import RawChat, load, percentile, rss_bytes, running_server, wait_for
from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.detokenize import IncrementalDetokenizer
from chatstream_asgi.engine import MockEngine, resolve_device

PROMPT = "Tell me a long story about servers that stream text."


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

    def generate_seconds(self, batch: int, new_tokens: int) -> float:
        """Wall time of greedy `model.generate` for `batch` copies of the prompt."""
        ids = self.prompt_ids.repeat(batch, 1)
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
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

    def continuous_batching_tokens_per_second(self, requests: int, new_tokens: int) -> dict[str, float]:
        """transformers' own continuous batching, streaming, after a warm-up: tokens/s, start seconds."""
        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
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


def _chat(url: str, new_tokens: int, path: str = "/chat_stream", **extra: Any) -> RawChat:
    body = {"user_input": PROMPT, "max_new_tokens": new_tokens, **extra}
    if path.startswith("/v1"):
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": new_tokens, "stream": True}
    return RawChat(url, path, body)


def bench_overhead(path: Path, reps: int, new_tokens: int) -> dict[str, float]:
    """One chat streamed over HTTP vs `model.generate` in-process: tokens/s, and first byte vs first token."""
    local = InProcessModel(path)
    local.generate_seconds(1, 4)  # warm-up
    direct = [local.generate_seconds(1, new_tokens) for _ in range(reps)]
    first_token = [local.first_text_seconds() for _ in range(reps)]
    served, first_byte = [], []
    with running_server(path, concurrency=1, queue=2, max_new_tokens=new_tokens) as (url, _):
        _chat(url, 4).to_the_end()  # warm-up
        for _ in range(reps):
            chat = _chat(url, new_tokens)
            first_byte.append(chat.first_byte() - chat.started_at)
            served.append(chat.to_the_end() - chat.started_at)
    return {
        "generate_tokens_per_second": new_tokens / statistics.median(direct),
        "http_tokens_per_second": new_tokens / statistics.median(served),
        "ratio": statistics.median(direct) / statistics.median(served),
        "model_first_text_ms": statistics.median(first_token) * 1e3,
        "http_first_byte_ms": statistics.median(first_byte) * 1e3,
        "first_byte_extra_ms": (statistics.median(first_byte) - statistics.median(first_token)) * 1e3,
    }


def _health_latencies(url: str, count: int) -> list[float]:
    latencies = []
    with httpx.Client(base_url=url) as client:
        client.get("/health")  # open the connection outside the measurement
        for _ in range(count):
            start = time.perf_counter()
            client.get("/health")
            latencies.append(time.perf_counter() - start)
    return latencies


def bench_event_loop(path: Path, samples: int) -> dict[str, float]:
    """p50/p99 of GET /health with every slot generating (and one more queued) ÷ the server idle."""
    slots = 2
    with running_server(path, concurrency=slots, queue=2, max_new_tokens=3000) as (url, _):
        idle = _health_latencies(url, samples)
        chats = [_chat(url, 3000) for _ in range(slots + 1)]
        wait_for(lambda: load(url)["processing"] == slots and load(url)["waiting"] == 1)
        for chat in chats[:slots]:
            chat.first_byte()
        loaded = _health_latencies(url, samples)
        still_busy = load(url)["processing"] == slots
        for chat in chats:
            chat.leave()
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


def bench_scaling(path: Path, counts: list[int], new_tokens: int, with_cb: bool) -> dict[str, Any]:
    """Aggregate tokens/s with N concurrent chats ÷ one chat; the static-batch ceiling and
    transformers' continuous batching beside it."""
    local = InProcessModel(path)
    local.generate_seconds(8, 4)  # warm-up
    ceiling = 8 * new_tokens / min(local.generate_seconds(8, new_tokens) for _ in range(2))
    single_generate = new_tokens / min(local.generate_seconds(1, new_tokens) for _ in range(2))
    cb = local.continuous_batching_tokens_per_second(8, new_tokens) if with_cb else None
    aggregate: dict[int, float] = {}
    with running_server(path, concurrency=max(counts), queue=max(counts), max_new_tokens=new_tokens) as (url, _):
        _chat(url, 4).to_the_end()  # warm-up
        for count in counts:
            best = 0.0
            for _ in range(2):
                start = time.perf_counter()
                chats = [_chat(url, new_tokens) for _ in range(count)]
                ended = max(chat.to_the_end() for chat in chats)
                best = max(best, count * new_tokens / (ended - start))
            aggregate[count] = best
    one = aggregate[counts[0]]
    result: dict[str, Any] = {
        "tokens_per_second": aggregate,
        "ratio_to_one_chat": {count: value / one for count, value in aggregate.items()},
        "generate_batch1_tokens_per_second": single_generate,
        "static_batch8_tokens_per_second": ceiling,
        "static_batch8_ratio": ceiling / single_generate,
    }
    if 8 in aggregate:
        result["eight_chats_vs_static_batch8"] = aggregate[8] / ceiling
    if cb is not None:
        result["transformers_cb8_tokens_per_second"] = cb["tokens_per_second"]
        result["transformers_cb_start_seconds"] = cb["start_seconds"]
        if 8 in aggregate:
            result["eight_chats_vs_transformers_cb8"] = aggregate[8] / cb["tokens_per_second"]
    return result


def bench_disconnect(path: Path, trials: int) -> dict[str, float]:
    """Decode steps after a client leaves; how soon a waiting request then streams (÷ an idle first byte)."""
    with running_server(path, concurrency=1, queue=2, max_new_tokens=3000) as (url, _):
        idle_first_byte = []
        for _ in range(trials):
            chat = _chat(url, 3000)
            idle_first_byte.append(chat.first_byte() - chat.started_at)
            chat.leave()
            wait_for(lambda: load(url)["processing"] == 0)
        handoffs = []
        for _ in range(trials):
            running = _chat(url, 3000)
            running.first_byte()
            waiting = _chat(url, 3000)
            wait_for(lambda: load(url)["waiting"] == 1)
            left_at = running.leave()
            handoffs.append(waiting.first_byte() - left_at)
            waiting.leave()
            wait_for(lambda: load(url)["processing"] == 0)
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


def bench_bytes(path: Path, new_tokens: int) -> dict[str, dict[str, float]]:
    """Bytes on the wire (head, chunk framing and all) ÷ the reply's own UTF-8 bytes, per format."""
    results = {}
    with running_server(path, concurrency=1, queue=2, max_new_tokens=new_tokens) as (url, _):
        reference = _chat(url, new_tokens)
        reference.to_the_end()
        reply_bytes = len(reference.body())
        for name, route in (
            ("delta", "/chat_stream"),
            ("chatstream", "/chat_stream?format=chatstream"),
            ("sse", "/chat_stream?format=sse"),
            ("openai", "/v1/chat/completions"),
        ):
            chat = _chat(url, new_tokens, route)
            chat.to_the_end()
            results[name] = {"wire_bytes": len(chat.received), "ratio": len(chat.received) / reply_bytes}
    return results


def bench_memory(path: Path, sessions: int) -> dict[str, float]:
    """Resident memory of the server beyond a process that only loads the model: idle, then with
    `sessions` stored conversations."""
    only_model = subprocess.run(
        [sys.executable, "-c", _MODEL_ONLY, str(path)], capture_output=True, text=True, check=True
    ).stdout
    model_rss = int(only_model.strip())
    with running_server(path, concurrency=2, queue=sessions, max_new_tokens=2) as (url, pid):
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
