"""Issue 21's figures: prompt lookup (`lookup`) and long conversations (`growth`), each beside
`model.generate` measured in the same run.

`lookup`: replies that quote their prompt (repeat a paragraph, edit one word of it) and a
free-form one, greedy, one chat and eight, over HTTP, beside plain `model.generate`, beside
`model.generate(prompt_lookup_num_tokens=10)` (transformers' own prompt lookup) and beside this
server with prompt lookup off. Both servers run without the conversation cache: every round asks
the same prompts, and `model.generate` prefills every time. Tokens/s count what the model wrote
until it stopped by itself (or hit the limit), since a real model ends its quote where the quote
ends.

`growth`: 1, 4 and 8 chats whose prompts are about 100, 1,000 and 4,000 tokens: each chat's
decode tokens/s (its tokens after the first ÷ the time between its first and last chunk) and
its first byte, beside `model.generate` on a static batch of the same prompts (decode: the time
of N tokens less the time of 1; first byte: the time of 1), and beside `transformers serve
--continuous-batching` (transformers' own OpenAI-compatible server, serving the same model
folder) where it starts. Both servers are driven by the same OpenAI-style streaming client
(`/v1/chat/completions`, `stream: true`, greedy); a reply's tokens are counted by tokenizing its
text, the same way for both.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import anyio
import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench import client
from bench.harness import running_server
from chatstream_asgi.engine import resolve_device

PARAGRAPH = (
    "The river runs past the old mill every morning, carrying leaves and the smell of rain down to "
    "the town. Children wait on the bridge to watch the boats, and the baker opens his window when "
    "the bells ring at seven. In the evening the river is quiet again, and the lamps along the bank "
    "light up one by one while the last boats come home."
)
LOOKUP_PROMPTS = {
    "quote": f"Repeat the following paragraph exactly, word for word:\n\n{PARAGRAPH}",
    "edit": f"Rewrite the following paragraph, replacing the word 'river' with 'stream':\n\n{PARAGRAPH}",
    "free": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


class _Local:
    """The model in this process: what every server figure is held against."""

    def __init__(self, path: Path) -> None:
        import os

        device = resolve_device(os.environ.get("BENCH_DEVICE", "auto"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval().to(device)
        self.device = device

    def ids(self, texts: list[str]) -> torch.Tensor:
        """The chat-template ids of one-turn chats, left-padded to one batch (same-length texts here)."""
        rendered = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
            )
            for t in texts
        ]
        rows = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id or 0
        return torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=self.device)

    def generate(self, ids: torch.Tensor, new_tokens: int, **settings: Any) -> tuple[int, float]:
        """(tokens written per row until the end token, seconds) of greedy `model.generate`."""
        mask = (ids != (self.tokenizer.pad_token_id or 0)).long() if ids.shape[0] > 1 else torch.ones_like(ids)
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **settings
            )
            seconds = time.perf_counter() - start
        written = out[0, ids.shape[1] :].tolist()
        eos = self.model.generation_config.eos_token_id
        ends = set(eos if isinstance(eos, list) else [eos])
        count = next((i + 1 for i, token in enumerate(written) if token in ends), len(written))
        return count, seconds

    def static_batch(self, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
        """(prefill seconds, decode tokens/s per row) of a static batch, stepped as `model.generate`
        steps it (transformers' own cache, greedy), the decode timed apart from the prefill."""
        mask = (ids != (self.tokenizer.pad_token_id or 0)).long() if ids.shape[0] > 1 else torch.ones_like(ids)
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
                logits_to_keep=1,
            )
            prefill = time.perf_counter() - start
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                out = self.model(
                    input_ids=token,
                    attention_mask=mask,
                    position_ids=mask.sum(-1, keepdim=True) - 1,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            decode = time.perf_counter() - start
        return prefill, (new_tokens - 1) / decode


async def _chats(url: str, texts: list[str], new_tokens: int) -> list[client.Reply]:
    replies = [client.Reply(started=0.0) for _ in texts]
    async with anyio.create_task_group() as group:
        for text, reply in zip(texts, replies, strict=True):
            body = client.body("greedy", new_tokens, text)
            group.start_soon(lambda b=body, r=reply: client.chat(url, b, reply=r))
    return replies


async def _finished(url: str, count: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url) as http:
        finished: list[dict[str, Any]] = (await http.get("/bench/finished")).json()
    return finished[-count:]


def bench_lookup(path: Path, new_tokens: int, reps: int) -> dict[str, Any]:
    """Tokens/s of one chat (and eight) on quoting and free-form prompts, with prompt lookup and
    without, beside `model.generate` with and without transformers' prompt lookup."""
    local = _Local(path)
    local.generate(local.ids(["warm up"]), 4)
    results: dict[str, Any] = {}
    for name, text in LOOKUP_PROMPTS.items():
        ids = local.ids([text])
        plain = [local.generate(ids, new_tokens) for _ in range(reps)]
        lookup = [local.generate(ids, new_tokens, prompt_lookup_num_tokens=10) for _ in range(reps)]
        batch = local.ids([text] * 8)
        static8 = [local.generate(batch, new_tokens) for _ in range(reps)]
        results[name] = {
            "tokens": plain[0][0],
            "generate_tokens_per_second": statistics.median(t / s for t, s in plain),
            "generate_lookup_tokens_per_second": statistics.median(t / s for t, s in lookup),
            "static_batch8_tokens_per_second": statistics.median(8 * t / s for t, s in static8),
        }
    for label, setting in (("server", -1), ("server_lookup_off", 0)):
        # Without the conversation cache: every round asks the same prompts, and a round must not
        # borrow the last one's prefill (`model.generate` prefills every time).
        settings = {"concurrency": 8, "queue": 8, "max_new_tokens": new_tokens, "prompt_lookup": setting}
        settings["conversation_cache_bytes"] = 0
        with running_server(path, **settings) as (url, _):
            anyio.run(_chats, url, ["warm up"], 4)
            for name, text in LOOKUP_PROMPTS.items():
                rates, drafted = [], []
                for _ in range(reps):
                    (reply,) = anyio.run(_chats, url, [text], new_tokens)
                    (done,) = anyio.run(_finished, url, 1)
                    rates.append(done["completion_tokens"] / reply.seconds)
                    drafted.append(done["drafted_tokens"] / max(1, done["completion_tokens"]))
                results[name][f"{label}_tokens_per_second"] = statistics.median(rates)
                results[name][f"{label}_drafted_share"] = statistics.median(drafted)
                eight = []
                for _ in range(reps):
                    started = time.perf_counter()
                    anyio.run(_chats, url, [text] * 8, new_tokens)
                    seconds = time.perf_counter() - started
                    eight.append(sum(d["completion_tokens"] for d in anyio.run(_finished, url, 8)) / seconds)
                results[name][f"{label}_8_chats_tokens_per_second"] = statistics.median(eight)
    for result in results.values():
        result["ratio_to_generate"] = result["server_tokens_per_second"] / result["generate_tokens_per_second"]
        result["ratio_to_generate_lookup"] = (
            result["server_tokens_per_second"] / result["generate_lookup_tokens_per_second"]
        )
        result["ratio_to_lookup_off"] = (
            result["server_tokens_per_second"] / result["server_lookup_off_tokens_per_second"]
        )
        result["8_chats_ratio_to_static_batch8"] = (
            result["server_8_chats_tokens_per_second"] / result["static_batch8_tokens_per_second"]
        )
        result["8_chats_ratio_to_lookup_off"] = (
            result["server_8_chats_tokens_per_second"] / result["server_lookup_off_8_chats_tokens_per_second"]
        )
    return results


def bench_draft_length(path: Path, lengths: list[int], new_tokens: int) -> dict[str, Any]:
    """Tokens/s of one chat and of eight on each lookup prompt, in process (`BatchingEngine` alone,
    no HTTP), for each most-drafted length in `lengths`, beside the same engine drafting nothing:
    what `DEFAULT_LOOKUP_TOKENS` was chosen from."""
    from chatstream_asgi.core.params import GenerationParams
    from chatstream_asgi.core.prompt import ChatPrompt
    from chatstream_asgi.engine import BatchingEngine

    local = _Local(path)

    async def chats(engine: BatchingEngine, text: str, count: int) -> float:
        written: list[int] = []

        async def one() -> None:
            prompt = ChatPrompt.from_messages([{"role": "user", "content": text}])
            params = GenerationParams(max_new_tokens=new_tokens, temperature=0)
            async with engine.generate(prompt, params, context_len=4096) as generation:
                while await generation.next_text(60) is not None:
                    pass
            written.append(generation.stats.completion_tokens)

        started = time.perf_counter()
        async with anyio.create_task_group() as group:
            for _ in range(count):
                group.start_soon(one)
        return sum(written) / (time.perf_counter() - started)

    results: dict[str, Any] = {}
    for most in [0, *lengths]:
        engine = BatchingEngine(
            local.model, local.tokenizer, device=local.device, max_batch_size=8, conversation_cache_bytes=0,
            prompt_lookup_num_tokens=most,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not engine.ready and time.monotonic() < deadline:
                time.sleep(0.05)
            for name, text in LOOKUP_PROMPTS.items():
                for count in (1, 8):
                    rate = anyio.run(chats, engine, text, count)
                    results.setdefault(f"{name}_{count}", {})[str(most)] = rate
        finally:
            engine.close()
    for cell in results.values():
        cell["ratios_to_off"] = {most: rate / cell["0"] for most, rate in cell.items() if most != "0"}
    return results


def _prompt_of(local: _Local, tokens: int, seed: int) -> str:
    """A user message of about `tokens` tokens, its words its own (no two chats share a prefix)."""
    words = "the a server stream token reply model cache turn user question answer long short river "
    words += "mountain city night morning story engine window light green blue quiet loud fast slow"
    vocabulary = words.split()
    text = " ".join(vocabulary[(seed * 7 + i * 13 + i // 5) % len(vocabulary)] for i in range(tokens))
    ids = local.tokenizer(f"{seed}: {text}", add_special_tokens=False)["input_ids"][:tokens]
    decoded: str = local.tokenizer.decode(ids)
    return decoded


async def _v1_chat(url: str, model: str, text: str, new_tokens: int) -> client.Reply:
    """One streamed `/v1/chat/completions` reply, greedy, read as an OpenAI client reads it."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "stream": True,
        "max_tokens": new_tokens,
        "temperature": 0,
    }
    reply = client.Reply(started=time.perf_counter())
    async with (
        httpx.AsyncClient(base_url=url, timeout=900) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[len("data: ") :]).get("choices") or [{}]
            delta = (choices[0].get("delta") or {}).get("content")
            if delta:
                reply.chunk_times.append(time.perf_counter())
                reply.text += delta
    reply.ended = time.perf_counter()
    return reply


async def _v1_chats(url: str, model: str, texts: list[str], new_tokens: int) -> list[client.Reply]:
    replies: list[client.Reply] = [client.Reply(started=0.0)] * len(texts)

    async def one(index: int) -> None:
        replies[index] = await _v1_chat(url, model, texts[index], new_tokens)

    async with anyio.create_task_group() as group:
        for index in range(len(texts)):
            group.start_soon(one, index)
    return replies


@contextmanager
def transformers_serve(path: Path) -> Iterator[tuple[str, str] | None]:
    """`transformers serve --continuous-batching` serving `path` on 127.0.0.1; yields its URL and
    model name, or None where it does not start (a transformers without `serve`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(Path(sys.executable).parent / "transformers"), "serve", str(path), "--continuous-batching"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", os.environ.get("BENCH_DEVICE", "auto")]
    log = tempfile.TemporaryFile()
    try:
        process = subprocess.Popen(command, stdout=log, stderr=log)
    except OSError:
        yield None
        return
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            log.seek(0)
            print("transformers serve did not start:\n" + log.read().decode()[-2000:], file=sys.stderr)
            yield None
            return
        yield url, str(path)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _decode_rates(local: _Local, replies: list[client.Reply]) -> list[float]:
    """Each reply's decode tokens/s: its tokens after the first ÷ the time from its first chunk to
    its last (tokens counted by tokenizing its text: a real model's text re-tokenizes as written)."""
    return [
        (len(local.tokenizer(reply.text, add_special_tokens=False)["input_ids"]) - 1)
        / max(1e-9, reply.chunk_times[-1] - reply.chunk_times[0])
        for reply in replies
    ]


def _served(local: _Local, url: str, model: str, texts: list[str], new_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    replies = anyio.run(_v1_chats, url, model, texts, new_tokens)
    seconds = time.perf_counter() - started
    tokens = sum(len(local.tokenizer(reply.text, add_special_tokens=False)["input_ids"]) for reply in replies)
    return {
        "decode_tokens_per_second_per_chat": statistics.median(_decode_rates(local, replies)),
        "first_byte_ms": statistics.median(reply.first_byte for reply in replies) * 1e3,
        "aggregate_tokens_per_second": tokens / seconds,
    }


def bench_growth(
    path: Path, counts: list[int], lengths: list[int], new_tokens: int, *, against_serve: bool = True
) -> dict[str, Any]:
    """Per-chat decode tokens/s and first byte of `count` chats of `length`-token prompts, beside
    a static batch of the same prompts in `model.generate` and (`against_serve`) `transformers
    serve --continuous-batching`."""
    local = _Local(path)
    local.generate(local.ids(["warm up"]), 4)
    cells = [(count, length) for length in lengths for count in counts]
    texts = {cell: [_prompt_of(local, cell[1], 100 * n + i) for i in range(cell[0])] for n, cell in enumerate(cells)}
    results: dict[str, Any] = {}
    for count, length in cells:
        ids = local.ids(texts[count, length])
        prefill, decode = local.static_batch(ids, new_tokens)
        results[f"{count}x{length}"] = {
            "prompt_tokens": int(ids.shape[1]),
            "static_decode_tokens_per_second_per_chat": decode,
            "static_first_token_ms": prefill * 1e3,
        }
    settings = {"concurrency": max(counts), "queue": max(counts), "max_new_tokens": new_tokens, "context_len": 8192}
    with running_server(path, **settings) as (url, _):
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        anyio.run(_v1_chats, url, model, ["warm up"], 4)
        for count, length in cells:
            results[f"{count}x{length}"] |= _served(local, url, model, texts[count, length], new_tokens)
    with transformers_serve(path) if against_serve else nullcontext() as theirs:
        if theirs is not None:
            their_url, their_model = theirs
            anyio.run(_v1_chats, their_url, their_model, ["warm up"], 4)
            for count, length in cells:
                measured = _served(local, their_url, their_model, texts[count, length], new_tokens)
                results[f"{count}x{length}"] |= {f"serve_cb_{key}": value for key, value in measured.items()}
    for cell in results.values():
        cell["decode_ratio"] = (
            cell["decode_tokens_per_second_per_chat"] / cell["static_decode_tokens_per_second_per_chat"]
        )
        if "serve_cb_aggregate_tokens_per_second" in cell:
            cell["aggregate_ratio_to_serve_cb"] = (
                cell["aggregate_tokens_per_second"] / cell["serve_cb_aggregate_tokens_per_second"]
            )
    return results
